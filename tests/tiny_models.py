"""Tiny random Hugging Face MoE checkpoints for tests (transformers is the test-only oracle)."""

from __future__ import annotations

import os

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_config(arch: str, **over):
    import transformers as tf
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                               sliding_window=None)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                num_experts_per_tok=2, shared_expert_intermediate_size=80, norm_topk_prob=False,
                                decoder_sparse_step=1, mlp_only_layers=[1], use_sliding_window=False)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=48,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[])
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_hf(arch: str, seed: int = 0, **over):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = hf_config(arch, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves tiny weights: scale the routers up so routing is decisive and not a near-tie.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    return model.eval()


def save_hf(model, path: str, fused: bool = False, max_shard_size=None) -> str:
    os.makedirs(path, exist_ok=True)
    kw = {}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, save_original_format=not fused, **kw)
    return path
