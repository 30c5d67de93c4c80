"""Rotary embedding variants beyond plain RoPE: YaRN frequencies and attention factor, interleaved application.

The maths follows ``transformers.modeling_rope_utils._compute_yarn_parameters`` step by step (same float32 ops)
so cos/sin tables agree with Hugging Face's to the last bit where the ops allow it.

``cfg.rope_type``: "default" or "yarn"; ``cfg.rope_scaling``: the rope parameters as sorted (key, value) pairs;
``cfg.rotary_dim``: the rotated width (DeepSeek's ``qk_rope_head_dim``; 0 = ``head_dim``).
"""

from __future__ import annotations

import math

import torch

from .config import MoEConfig


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_dim(cfg: MoEConfig) -> int:
    return cfg.rotary_dim or cfg.head_dim


def rope_params(cfg: MoEConfig) -> dict:
    return dict(cfg.rope_scaling)


def yarn_inv_freq(dim: int, base: float, p: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) exactly as transformers computes them for ``rope_type: yarn``."""
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / orig
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def corr_dim(num_rot):
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ef = 1 - ramp
    return inter * (1 - ef) + extra * ef, float(attention_factor)


def make_rotary(cfg: MoEConfig, max_positions: int):
    """The model's rotary table: plain ``Rotary`` for the original architectures, YaRN-scaled when configured."""
    from .layers import Rotary
    dim = rope_dim(cfg)
    if cfg.rope_type == "default":
        return Rotary(dim, cfg.rope_theta, max_positions)
    if cfg.rope_type == "yarn":
        inv, scale = yarn_inv_freq(dim, cfg.rope_theta, rope_params(cfg), cfg.max_position_embeddings)
        return Rotary(dim, cfg.rope_theta, max_positions, inv_freq=inv, scale=scale)
    raise ValueError(f"rope type {cfg.rope_type!r} is not supported")


def apply_interleaved(rotary, x_NHD: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved RoPE (pairs (x0, x1), (x2, x3), ... rotated together; output de-interleaved), as
    ``apply_rotary_pos_emb_interleave`` in transformers."""
    rotary.ensure(pos_N, x_NHD.device)
    h = x_NHD.shape[-1] // 2
    cos = rotary.cos[pos_N].to(x_NHD.dtype)[..., :h].unsqueeze(-2)
    sin = rotary.sin[pos_N].to(x_NHD.dtype)[..., :h].unsqueeze(-2)
    x1, x2 = x_NHD[..., 0::2], x_NHD[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
