"""gpt-oss attention: q/k/v/o biases, learned per-head sinks, sliding-window layers (``layer_types``).

A sink is an extra logit per head in the softmax's denominator with no value (transformers' eager
``eager_attention_forward`` concatenates it to the scores and drops its probability). Scaled-dot-product kernels
have no such term, so ``core`` computes attention explicitly (projection and cache are ``layers.Attention``'s).
A sliding layer lets query position p see keys ``p - sliding_window < k <= p``; the cache keeps every position (positions are never evicted), the window is a
mask, so windowed and full layers share one cache layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import MoEConfig
from .layers import Attention


class SinkAttention(Attention):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__(cfg, layer)
        self.o_proj = nn.Linear(self.H * self.Dh, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.sinks = nn.Parameter(torch.zeros(self.H))
        self.window = cfg.sliding_window if cfg.is_sliding_layer(layer) else None

    def core(self, q_BHQD, k_BTHD, v_BTHD, mask=None, causal=False, qpos_BQ=None):
        """Eager attention with sinks; keys are positions 0..T-1, query i of group b is at ``qpos_BQ[b, i]`` (the
        causal mask and the window come from the positions)."""
        B, H, Q, _ = q_BHQD.shape
        T = k_BTHD.shape[1]
        rep = self.H // self.Hkv
        k = k_BTHD.transpose(1, 2).repeat_interleave(rep, dim=1)        # [B, H, T, Dh]
        v = v_BTHD.transpose(1, 2).repeat_interleave(rep, dim=1)
        s = torch.matmul(q_BHQD, k.transpose(2, 3)) * self.scale        # [B, H, Q, T]
        kpos = torch.arange(T, device=q_BHQD.device)
        ok = kpos[None, None, :] <= qpos_BQ[:, :, None]                  # [B, Q, T]
        if self.window is not None:
            ok = ok & (kpos[None, None, :] > qpos_BQ[:, :, None] - self.window)
        s = s.masked_fill(~ok[:, None], torch.finfo(s.dtype).min)
        sinks = self.sinks.to(s.dtype).reshape(1, H, 1, 1).expand(B, H, Q, 1)
        logits = torch.cat([s, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        p = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
        return torch.matmul(p, v)                                         # [B, H, Q, Dh]

    def select_heads(self, q0: int, q1: int) -> "SinkAttention":
        sub = super().select_heads(q0, q1)
        sub.sinks = nn.Parameter(self.sinks[q0:q1].detach().clone(), requires_grad=False)
        return sub
