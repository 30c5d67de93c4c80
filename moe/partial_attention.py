"""GQA attention with partial RoPE (GLM-4.5 ``glm4_moe``, MiniMax-M2 ``minimax_m2``).

Only the first ``rotary_dim`` channels of each query/key head are rotated (``partial_rotary_factor`` x head_dim;
MiniMax-M2's release says ``rotary_dim``); the rest pass through, as transformers' ``apply_rotary_pos_emb`` with a
shorter cos/sin table. GLM-4.5 has q/k/v biases and an optional per-head q/k RMSNorm (``use_qk_norm``);
MiniMax-M2 normalises the whole q and k projections (``qk_norm == "full"``, like OLMoE). Projection, cache and
attention are those of ``layers.Attention``; only the rotation differs.

Shapes: N tokens, H / Hkv heads, Dh head dim, rd rotated channels.
"""

from __future__ import annotations

import torch

from .config import MoEConfig
from .layers import Attention, Rotary


def rope_partial(rotary: Rotary, x_NHD: torch.Tensor, pos_N: torch.Tensor, rd: int) -> torch.Tensor:
    """RoPE on channels [:rd] of every head, channels [rd:] unchanged."""
    if rd == x_NHD.shape[-1]:
        return rotary(x_NHD, pos_N)
    return torch.cat((rotary(x_NHD[..., :rd], pos_N), x_NHD[..., rd:]), dim=-1)


class PartialRopeAttention(Attention):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__(cfg, layer)
        self.rd = cfg.rotary_dim or cfg.head_dim

    def rope(self, rotary: Rotary, x_NHD, pos_N):
        return rope_partial(rotary, x_NHD, pos_N, self.rd)
