"""Write a model as a Hugging Face Mixtral-format checkpoint (used by training and benchmarks)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .config import MoEConfig


def mixtral_config_dict(*, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, num_experts, top_k,
                        intermediate_size, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, dtype="bfloat16",
                        head_dim=None) -> dict:
    d = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta, "num_local_experts": num_experts, "num_experts_per_tok": top_k,
        "tie_word_embeddings": tie_word_embeddings, "sliding_window": None, "router_aux_loss_coef": 0.02,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "dtype": dtype, "torch_dtype": dtype,
    }
    return d


def save_mixtral(state: dict[str, torch.Tensor], experts, cfg: MoEConfig, config_dict: dict, path: str,
                 dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 2 << 30) -> None:
    """Save dense ``state`` (our parameter names) and ``experts.get(l, e)`` in Mixtral's per-expert layout.

    Shards above ``max_shard_bytes`` get a ``model.safetensors.index.json``.
    """
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.startswith("experts.") or name.startswith("rotary."):
            continue
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        tensors[name] = t.detach().to(dtype).contiguous()
    if config_dict.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for l in cfg.moe_layers:
        for e in range(cfg.num_experts):
            w = experts.get(l, e)
            p = f"model.layers.{l}.block_sparse_moe.experts.{e}"
            tensors[f"{p}.w1.weight"] = w.gate.detach().to(dtype).contiguous()
            tensors[f"{p}.w3.weight"] = w.up.detach().to(dtype).contiguous()
            tensors[f"{p}.w2.weight"] = w.down.detach().to(dtype).contiguous()
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nb
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        wm = {}
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, os.path.join(path, fn), metadata={"format": "pt"})
            wm.update({n: fn for n in sh})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
