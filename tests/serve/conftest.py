"""A tiny random Mixtral checkpoint WITH a byte-level BPE tokenizer and a chat template (session-scoped)."""

from __future__ import annotations

import json
import os

import pytest
import torch

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_TEXT = """The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts chosen by a small router network, so a large model costs little per token. Continuous batching admits
new requests while others decode; the key-value cache keeps one slot per running sequence. Servers stream
tokens to clients as server-sent events, and a client may disconnect at any time. Hello, world! How are you
today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. def main(): return 0
"""


def build_tokenizer(path: str, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 8, trainer=trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "bos_token": None, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, f)
    return tok


def build_checkpoint(path: str, seed: int = 0, max_positions: int = 1024, with_tokenizer: bool = True) -> str:
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.experts import ParamExperts
    from moeyard.moe.model import MoEForCausalLM
    from moeyard.moe.save import mixtral_config_dict, save_mixtral
    os.makedirs(path, exist_ok=True)
    vocab, eos_id = 384, None
    if with_tokenizer:
        tok = build_tokenizer(path)
        vocab, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS)
    torch.manual_seed(seed)
    d = mixtral_config_dict(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            num_experts=4, top_k=2, intermediate_size=64, max_position_embeddings=max_positions,
                            eos_token_id=eos_id, dtype="float32")
    cfg = MoEConfig.from_dict(d)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    experts = ParamExperts(cfg, init_std=0.2)
    save_mixtral(model.state_dict(), experts, cfg, d, path, dtype=torch.float32)
    return path


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("serve_ckpt")))


@pytest.fixture(scope="session")
def serve_ckpt_no_tok(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("serve_ckpt_notok")), with_tokenizer=False)
