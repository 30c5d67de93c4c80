"""Write a model as a Hugging Face checkpoint, Mixtral or DeepSeek-V3 format (used by training, tools and
benchmarks)."""

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


def deepseek_v3_config_dict(*, vocab_size, hidden_size, num_layers, num_heads, num_experts, top_k,
                            moe_intermediate_size, dense_intermediate_size, n_shared_experts, first_k_dense=1,
                            kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim, q_lora_rank=None,
                            n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                            max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                            rope_interleave=True, bos_token_id=None, eos_token_id=None,
                            dtype="bfloat16") -> dict:
    """config.json of a ``DeepseekV3ForCausalLM`` (the fields transformers writes; no multi-token prediction)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": dense_intermediate_size,
        "moe_intermediate_size": moe_intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_heads, "n_shared_experts": n_shared_experts,
        "n_routed_experts": num_experts, "num_experts_per_tok": top_k, "routed_scaling_factor": routed_scaling_factor,
        "kv_lora_rank": kv_lora_rank, "q_lora_rank": q_lora_rank, "qk_rope_head_dim": qk_rope_head_dim,
        "qk_nope_head_dim": qk_nope_head_dim, "v_head_dim": v_head_dim, "n_group": n_group,
        "topk_group": topk_group, "first_k_dense_replace": first_k_dense, "norm_topk_prob": norm_topk_prob,
        "hidden_act": "silu", "max_position_embeddings": max_position_embeddings, "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}, "rope_interleave": rope_interleave,
        "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "initializer_range": 0.02, "dtype": dtype, "torch_dtype": dtype,
    }


# architecture -> (prefix of a layer's routed experts, names of their gate/up/down matrices, dense-name rewrite)
_LAYOUT = {
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"), (".mlp.gate.", ".block_sparse_moe.gate.")),
    "deepseek_v3": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), None),
}


def save_checkpoint(state: dict[str, torch.Tensor], experts, cfg: MoEConfig, config_dict: dict, path: str,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 2 << 30) -> None:
    """Save dense ``state`` (our parameter names) and ``experts.get(l, e)`` in the per-expert layout of the
    config's architecture (Mixtral or DeepSeek-V3). DeepSeek-V3's ``e_score_correction_bias`` stays float32, as
    DeepSeek publishes it. Shards above ``max_shard_bytes`` get a ``model.safetensors.index.json``."""
    prefix, names, rename = _LAYOUT[cfg.model_type]
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.startswith("experts.") or name.startswith("rotary."):
            continue
        if rename:
            name = name.replace(*rename)
        keep = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        tensors[name] = t.detach().to(keep).contiguous()
    if config_dict.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for l in cfg.moe_layers:
        for e in range(cfg.num_experts):
            w = experts.get(l, e)
            p = f"model.layers.{l}.{prefix}.{e}"
            for n, t in zip(names, (w.gate, w.up, w.down)):
                tensors[f"{p}.{n}.weight"] = t.detach().to(dtype).contiguous()
    _write(tensors, config_dict, path, max_shard_bytes)


save_mixtral = save_checkpoint   # the name older callers use


def _write(tensors: dict, config_dict: dict, path: str, max_shard_bytes: int) -> None:
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
