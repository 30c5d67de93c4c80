"""Train the default model's byte-level BPE tokenizer on the training split of the shared corpus.

    .venv/bin/python tools/train_tokenizer.py --vocab-size 8192 --out runs/default_model/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import DOMAINS, EOT, SPECIAL_TOKENS, documents, split  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def train(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        for d in DOMAINS:
            yield from documents(d, split(d, "train"))

    tok.train_from_iterator(texts(), trainer=trainer)
    return tok


def tokenizer_config(max_len: int = 1024) -> dict:
    added = {}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None, "unk_token": None,
        "pad_token": EOT, "add_bos_token": False, "add_eos_token": False, "model_max_length": max_len,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, "added_tokens_decoder": added,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    tok = train(a.vocab_size)
    os.makedirs(a.out, exist_ok=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    cfg = tokenizer_config()
    cfg["added_tokens_decoder"] = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                                            "rstrip": False, "normalized": False,
                                                            "single_word": False} for t in SPECIAL_TOKENS}
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"vocab {tok.get_vocab_size()}, eos id {tok.token_to_id(EOT)} -> {a.out}")


if __name__ == "__main__":
    main()
