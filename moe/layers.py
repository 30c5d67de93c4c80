"""Dense building blocks: RMSNorm, rotary embedding, attention over a KV cache, the SwiGLU MLP.

Shapes: N tokens of a flattened batch, D hidden, H / Hkv heads, Dh head dim, T keys of one sequence.
Attention reads the batch layout from a ``ForwardBatch`` (see ``model.py``): one sequence at a time for prefill
chunks, all sequences at once for single-token decode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        cos = self.cos[pos_N].to(x_NHD.dtype).unsqueeze(-2)
        sin = self.sin[pos_N].to(x_NHD.dtype).unsqueeze(-2)
        h = x_NHD.shape[-1] // 2
        rot = torch.cat((-x_NHD[..., h:], x_NHD[..., :h]), dim=-1)
        return x_NHD * cos + rot * sin


class Attention(nn.Module):
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

    def qkv(self, x_ND: torch.Tensor, pos_N: torch.Tensor, rotary: Rotary):
        N = x_ND.shape[0]
        q, k, v = self.q_proj(x_ND), self.k_proj(x_ND), self.v_proj(x_ND)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.view(N, self.H, self.Dh), k.view(N, self.Hkv, self.Dh), v.view(N, self.Hkv, self.Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return rotary(q, pos_N), rotary(k, pos_N), v

    def forward(self, x_ND: torch.Tensor, batch, rotary: Rotary) -> torch.Tensor:
        q_NHD, k_NHD, v_NHD = self.qkv(x_ND, batch.positions_N, rotary)
        if batch.kv is None:
            o = self._causal_blocks(q_NHD, k_NHD, v_NHD, batch)
        elif batch.is_decode:
            o = self._decode(q_NHD, k_NHD, v_NHD, batch)
        else:
            o = self._prefill(q_NHD, k_NHD, v_NHD, batch)
        return self.o_proj(o.reshape(x_ND.shape[0], self.H * self.Dh))

    def _sdpa(self, q_BHQD, k_BHTD, v_BHTD, mask=None, causal=False):
        return F.scaled_dot_product_attention(q_BHQD, k_BHTD, v_BHTD, attn_mask=mask, is_causal=causal,
                                              scale=self.scale, enable_gqa=self.H != self.Hkv)

    def _causal_blocks(self, q, k, v, batch):
        """No cache (training, oracle runs): sequences of equal length ``batch.block_len`` stacked along N."""
        T = batch.block_len
        B = q.shape[0] // T
        f = lambda t: t.view(B, T, t.shape[1], self.Dh).transpose(1, 2)
        o = self._sdpa(f(q), f(k), f(v), causal=True)  # [B, H, T, Dh]
        return o.transpose(1, 2).reshape(B * T, self.H, self.Dh)

    def _decode(self, q, k, v, batch):
        kv = batch.kv
        kv.write(self.layer, batch.slots_B, batch.positions_N, k, v)
        K, V = kv.read(self.layer, batch.slots_B, batch.max_len)      # [B, T, Hkv, Dh]
        o = self._sdpa(q.unsqueeze(2), K.transpose(1, 2), V.transpose(1, 2), mask=batch.decode_mask)
        return o.squeeze(2)

    def _prefill(self, q, k, v, batch):
        kv = batch.kv
        outs = []
        for i, (start, n, ctx) in enumerate(batch.chunks):
            slot = batch.slots[i]
            pos = batch.positions_N[start:start + n]
            kv.write(self.layer, batch.slot_tensor(i, n), pos, k[start:start + n], v[start:start + n])
            K, V = kv.read_one(self.layer, slot, ctx + n)               # [T, Hkv, Dh]
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0)          # [1, H, n, Dh]
            mask = batch.prefill_mask(i)
            o = self._sdpa(qq, K.transpose(0, 1).unsqueeze(0), V.transpose(0, 1).unsqueeze(0), mask=mask,
                           causal=mask is None)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class MLP(nn.Module):
    """Dense SwiGLU MLP (shared experts and dense layers)."""

    def __init__(self, D: int, F_: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
