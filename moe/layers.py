"""Dense building blocks: RMSNorm, rotary embedding, GQA attention (run by ``attention.py``), the SwiGLU MLP.

Shapes: N tokens of a flattened batch, D hidden, H / Hkv heads, Dh head dim, T keys of one sequence.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .compute import fused, matmul
from .config import MoEConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = fused(x)
        if m is not None and self.weight.dtype is torch.float32:
            return m.rms_norm(x, self.weight, self.eps)
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class Rotary(nn.Module):
    """Non-interleaved RoPE; the cos/sin table is built the way Hugging Face builds it, so values match bit for bit."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, inv_freq: torch.Tensor | None = None,
                 scale: float = 1.0):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if inv_freq is not None:      # scaled RoPE (YaRN, see rope.py): precomputed frequencies
            inv = inv_freq.float()
        self.register_buffer("inv_freq", inv, persistent=False)
        self.scale = scale            # attention factor multiplied into cos/sin (YaRN)
        self.max_pos = 0
        self._checked = None
        self._rows = None             # (positions, table, dtype, cos rows, signed sin rows) of the last forward
        self._grow(max_pos)

    def _grow(self, n: int):
        freqs = torch.arange(n, dtype=torch.int64, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin, self.max_pos = emb.cos(), emb.sin(), n
        if self.scale != 1.0:
            self.cos, self.sin = self.cos * self.scale, self.sin * self.scale

    def ensure(self, pos_N: torch.Tensor, device):
        # Every layer passes the batch's same positions tensor: check it once per forward, not twice per layer
        # (``pos_N.max()`` is a host sync, costly on a GPU).
        if pos_N is self._checked and self.cos.device == device:
            return
        top = int(pos_N.max())
        if top >= self.max_pos or self.cos.device != device:
            self.inv_freq = self.inv_freq.to(device)
            self._grow(max(self.max_pos, top + 1))
        self._checked = pos_N

    def forward(self, x_NHD: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
        self.ensure(pos_N, x_NHD.device)
        # the rows of this batch's positions, gathered once per forward (every layer, q and k, passes the same
        # positions tensor), with the rotation's minus sign folded into the first half of sin: (-x2) * s1 is
        # x2 * (-s1) exactly
        c = self._rows
        if c is None or c[0] is not pos_N or c[1] is not self.cos or c[2] != x_NHD.dtype:
            h = self.cos.shape[-1] // 2
            cos = self.cos[pos_N].to(x_NHD.dtype).unsqueeze(-2)
            sin = self.sin[pos_N].to(x_NHD.dtype).unsqueeze(-2)
            c = self._rows = (pos_N, self.cos, x_NHD.dtype, cos, torch.cat((-sin[..., :h], sin[..., h:]), dim=-1))
        m = fused(x_NHD)
        if m is not None and x_NHD.dim() == 3 and x_NHD.stride(2) == 1 and x_NHD.stride(1) == x_NHD.shape[2]:
            return m.rope(x_NHD, c[3], c[4])
        h = x_NHD.shape[-1] // 2
        return x_NHD * c[3] + torch.cat((x_NHD[..., h:], x_NHD[..., :h]), dim=-1) * c[4]


DECODE_MAX_KEYS = 1024      # longer contexts: SDPA's blocked, vectorized kernel
_NO_MASK = torch.empty(0, dtype=torch.bool)


class Attention(nn.Module):
    """GQA attention (the ``moe.attention`` protocol: ``project``, ``core``, ``o_proj``; ``select_heads``)."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        H, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps), RMSNorm(Dh, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.rms_norm_eps), RMSNorm(Hkv * Dh, cfg.rms_norm_eps)
        self.clip = cfg.clip_qkv
        self.scale = Dh ** -0.5
        self.pick = None      # (q heads, kv heads) taken after a full-width q/k norm (a head subset, see select_heads)
        self.qkv = None       # q, k and v packed as one matrix (compute.fuse_qkv): one product, one quantized x

    def rope(self, rotary: Rotary, x_NHD, pos_N):
        return rotary(x_NHD, pos_N)

    def project(self, x_ND: torch.Tensor, pos_N: torch.Tensor, rotary: Rotary):
        N = x_ND.shape[0]
        if self.qkv is not None:
            q, k, v = matmul(x_ND, self.qkv).to(x_ND.dtype).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
        else:
            q, k, v = self.q_proj(x_ND), self.k_proj(x_ND), self.v_proj(x_ND)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        if self.pick is not None:
            qi, ki = self.pick
            q, k, v = q.view(N, -1, self.Dh)[:, qi], k.view(N, -1, self.Dh)[:, ki], v.view(N, -1, self.Dh)[:, ki]
        q, k, v = q.view(N, self.H, self.Dh), k.view(N, self.Hkv, self.Dh), v.view(N, self.Hkv, self.Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(rotary, q, pos_N), self.rope(rotary, k, pos_N), v

    def core(self, q_BHQD, k_BTHD, v_BTHD, mask=None, causal=False, qpos_BQ=None):
        if q_BHQD.shape[2] == 1 and not causal and k_BTHD.shape[1] <= DECODE_MAX_KEYS and \
                (mask is None or mask.dtype is torch.bool):
            m = fused(q_BHQD)       # decode on the CPU: one call (moe/csrc/ops.cpp) instead of SDPA's dispatch
            if m is not None and k_BTHD.shape == v_BTHD.shape and k_BTHD.stride(-1) == 1 and v_BTHD.stride(-1) == 1:
                return m.decode_attention(q_BHQD, k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2),
                                          _NO_MASK if mask is None else mask, self.scale)
        return F.scaled_dot_product_attention(q_BHQD, k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2),
                                              attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=self.H != self.Hkv)

    def forward(self, x_ND: torch.Tensor, batch, rotary: Rotary) -> torch.Tensor:
        return attention(self, x_ND, batch, rotary)

    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.Hkv, self.Dh, self.Hkv, self.Dh)

    def select_heads(self, q0: int, q1: int) -> "Attention":
        """This module restricted to query heads [q0, q1) and the KV heads they read (one KV head per query head
        when the subset's query heads do not split evenly over its KV heads)."""
        r = self.H // self.Hkv
        kv_of = [h // r for h in range(q0, q1)]
        kvs, h = sorted(set(kv_of)), q1 - q0
        even = h % len(kvs) == 0 and kv_of == [kvs[0] + i // (h // len(kvs)) for i in range(h)]
        ki = kvs if even else kv_of
        sub = module_copy(self)
        sub.H, sub.Hkv, sub.qkv = h, len(ki), None
        if self.qk_norm == "full":            # the norm spans every head: project all of them, then pick
            sub.pick = (list(range(q0, q1)), ki)
        else:
            sub.q_proj = linear_rows(self.q_proj, head_rows(range(q0, q1), self.Dh))
            sub.k_proj = linear_rows(self.k_proj, head_rows(ki, self.Dh))
            sub.v_proj = linear_rows(self.v_proj, head_rows(ki, self.Dh))
        return sub


def head_rows(heads, width: int) -> list[int]:
    """Output rows of a projection that produce ``heads`` (``width`` rows each)."""
    return [h * width + i for h in heads for i in range(width)]


def linear_rows(lin: nn.Linear, rows: list[int]) -> nn.Linear:
    """A linear layer computing only output ``rows`` of ``lin`` (weights copied)."""
    out = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    idx = torch.tensor(rows, dtype=torch.long, device=lin.weight.device)
    with torch.no_grad():
        out.weight.copy_(lin.weight[idx])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[idx])
    return out.requires_grad_(False)


def module_copy(m: nn.Module) -> nn.Module:
    """A shallow copy whose submodules and parameters can be replaced without touching ``m``."""
    c = copy.copy(m)
    c._modules, c._parameters, c._buffers = dict(m._modules), dict(m._parameters), dict(m._buffers)
    return c


class MLP(nn.Module):
    """Dense SwiGLU MLP (shared experts and dense layers)."""

    def __init__(self, D: int, F_: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
