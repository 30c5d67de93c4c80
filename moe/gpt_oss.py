"""gpt-oss attention: q/k/v/o biases, learned per-head sinks, sliding-window layers (``layer_types``).

A sink is an extra logit per head in the softmax's denominator with no value (transformers' eager
``eager_attention_forward`` concatenates it to the scores and drops its probability). Scaled-dot-product kernels
have no such term, so attention is computed explicitly here. A sliding layer lets query position p see keys
``p - sliding_window < k <= p``; the cache keeps every position (positions are never evicted), the window is a
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

    def _sdpa(self, *a, **k):
        # plain scaled-dot-product attention would silently drop the sinks and the window
        raise NotImplementedError("gpt-oss attention has learned sinks and sliding windows: use SinkAttention's "
                                  "own paths (_attend), not a plain SDPA call")

    def _attend(self, q_BHQD, k_BTHD, v_BTHD, qpos_BQ):
        """Eager attention with sinks; keys are positions 0..T-1, query i of batch b is at ``qpos_BQ[b, i]``."""
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

    def _causal_blocks(self, q, k, v, batch):
        T = batch.block_len
        B = q.shape[0] // T
        f = lambda t: t.view(B, T, t.shape[1], self.Dh)
        qpos = torch.arange(T, device=q.device).expand(B, T)
        o = self._attend(f(q).transpose(1, 2), f(k), f(v), qpos)
        return o.transpose(1, 2).reshape(B * T, self.H, self.Dh)

    def _decode(self, q, k, v, batch):
        kv = batch.kv
        kv.write(self.layer, batch.slots_B, batch.positions_N, k, v)
        K, V = kv.read(self.layer, batch.slots_B, batch.max_len)         # [B, T, Hkv, Dh]
        o = self._attend(q.unsqueeze(2), K, V, batch.positions_N[:, None])
        return o.squeeze(2)

    def _prefill(self, q, k, v, batch):
        kv = batch.kv
        outs = []
        for i, (start, n, ctx) in enumerate(batch.chunks):
            pos = batch.positions_N[start:start + n]
            kv.write(self.layer, batch.slot_tensor(i, n), pos, k[start:start + n], v[start:start + n])
            K, V = kv.read_one(self.layer, batch.slots[i], ctx + n)
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0)           # [1, H, n, Dh]
            o = self._attend(qq, K.unsqueeze(0), V.unsqueeze(0), pos[None])
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
