"""Qwen3-Next (``qwen3_next``): Gated-DeltaNet linear attention in most layers, gated full attention every few
(``layer_types``), (1 + weight) RMSNorms, the Qwen MoE block (softmax top-k, sigmoid-gated shared expert).

Linear-attention layers keep a per-sequence recurrent state instead of KV entries: the batch's cache
(``runtime.hybrid_cache.HybridCache``) hands each sequence's state in at its chunk's ``ctx`` and takes the new one
back; a prompt chunk runs the chunked delta rule from that state, a decoded token the recurrent one, like
transformers (``gated_delta.py``). Without a cache (scoring blocks) every sequence starts from zeros.

Shapes: N tokens, D hidden, H / Hkv attention heads, Dh head dim; Hk / Hv linear key / value heads, dk / dv their
dims, C = 2 Hk dk + Hv dv conv channels, W conv width, B sequences.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig
from .gated_delta import causal_conv, chunk_gated_delta_rule, recurrent_gated_delta_rule
from .attention import attend
from .layers import Attention, RMSNorm, Rotary
from .partial_attention import rope_partial


class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight), computed in float32 before the cast back (Qwen3-Next)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the delta-rule output, then times SiLU(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        y = x.to(torch.float32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y.to(dt) * F.silu(z.to(torch.float32))).to(dt)


class GatedAttention(Attention):
    """Full attention whose q projection also yields a per-channel output gate: o * sigmoid(gate) before o_proj;
    per-head (1 + w) q/k norms, partial RoPE, biases on every projection when ``attention_bias``."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__(cfg, layer)
        D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, 2 * H * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.o_proj_bias)
        self.q_norm, self.k_norm = OffsetRMSNorm(Dh, cfg.rms_norm_eps), OffsetRMSNorm(Dh, cfg.rms_norm_eps)
        self.rd = cfg.rotary_dim or Dh

    def forward(self, x_ND: torch.Tensor, batch, rotary: Rotary) -> torch.Tensor:
        N = x_ND.shape[0]
        q, gate = self.q_proj(x_ND).view(N, self.H, 2 * self.Dh).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x_ND).view(N, self.Hkv, self.Dh))
        v = self.v_proj(x_ND).view(N, self.Hkv, self.Dh)
        q, k = rope_partial(rotary, q, batch.positions_N, self.rd), rope_partial(rotary, k, batch.positions_N, self.rd)
        o = attend(self, q, k, v, batch)
        o = o.reshape(N, self.H * self.Dh) * torch.sigmoid(gate.reshape(N, self.H * self.Dh))
        return self.o_proj(o)


class GatedDeltaNet(nn.Module):
    """Linear attention: conv'd q/k/v, decay g = -exp(A_log) softplus(a + dt_bias), write strength beta = sigmoid(b),
    the delta rule over the sequence's state, a gated RMSNorm with z, out_proj."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv, W = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        D, Kd, Vd = cfg.hidden_size, self.Hk * self.dk, self.Hv * self.dv
        self.Kd, self.Vd = Kd, Vd
        self.conv1d = nn.Conv1d(2 * Kd + Vd, 2 * Kd + Vd, W, bias=False, groups=2 * Kd + Vd, padding=W - 1)
        self.in_proj_qkvz = nn.Linear(D, 2 * Kd + 2 * Vd, bias=False)
        self.in_proj_ba = nn.Linear(D, 2 * self.Hv, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(Vd, D, bias=False)

    def _split(self, x_ND):
        """(mixed q|k|v [N, C], z [N, Hv, dv], b [N, Hv], a [N, Hv]) from the projections, in transformers' head
        grouping (each key head's q, k, then its share of value heads' v and z)."""
        N, r = x_ND.shape[0], self.Hv // self.Hk
        qkvz = self.in_proj_qkvz(x_ND).view(N, self.Hk, 2 * self.dk + 2 * r * self.dv)
        ba = self.in_proj_ba(x_ND).view(N, self.Hk, 2 * r)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, r * self.dv, r * self.dv], dim=2)
        b, a = torch.split(ba, [r, r], dim=2)
        mixed = torch.cat((q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1)), dim=-1)
        return mixed, z.reshape(N, self.Hv, self.dv), b.reshape(N, self.Hv), a.reshape(N, self.Hv)

    def _rule(self, mixed_BTC, b_BTH, a_BTH, state, recurrent: bool):
        B, T = mixed_BTC.shape[:2]
        q, k, v = torch.split(mixed_BTC, [self.Kd, self.Kd, self.Vd], dim=-1)
        q, k = q.reshape(B, T, self.Hk, self.dk), k.reshape(B, T, self.Hk, self.dk)
        v = v.reshape(B, T, self.Hv, self.dv)
        beta = b_BTH.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a_BTH.float() + self.dt_bias)
        if recurrent:
            return recurrent_gated_delta_rule(q, k, v, g, beta, state)
        return chunk_gated_delta_rule(q, k, v, g, beta, state)

    def _run(self, mixed_BTC, b, a, prev_conv, prev_state, recurrent: bool):
        """One group of sequences: conv then delta rule; (out [B, T, Hv, dv], conv state, recurrent state)."""
        w = self.conv1d.weight.squeeze(1)
        conv_BCT, conv_state = causal_conv(mixed_BTC.transpose(1, 2), w, prev_conv)
        o, S = self._rule(conv_BCT.transpose(1, 2), b, a, prev_state, recurrent)
        return o, conv_state, S

    def forward(self, x_ND: torch.Tensor, batch, rotary=None) -> torch.Tensor:
        N = x_ND.shape[0]
        mixed, z, b, a = self._split(x_ND)
        kv = batch.kv
        if kv is None:                                   # blocks of block_len tokens, each from zeros
            T = batch.block_len
            f = lambda t: t.reshape(N // T, T, *t.shape[1:])      # noqa: E731
            o = self._run(f(mixed), f(b), f(a), None, None, False)[0].reshape(N, self.Hv, self.dv)
        else:
            o = x_ND.new_empty((N, self.Hv, self.dv))
            dec = [i for i, (_, n, ctx) in enumerate(batch.chunks) if n == 1 and ctx > 0]
            if dec:                                      # decoded tokens: one batched recurrent step
                rows = torch.tensor([batch.chunks[i][0] for i in dec], device=x_ND.device)
                slots, ctxs = [batch.slots[i] for i in dec], [batch.chunks[i][2] for i in dec]
                conv0, S0 = kv.states(self.layer, slots, ctxs)
                oo, conv1, S1 = self._run(mixed[rows, None], b[rows, None], a[rows, None], conv0, S0, True)
                kv.set_states(self.layer, slots, ctxs, [1] * len(dec), conv1, S1)
                o[rows] = oo[:, 0]
            for i, (start, n, ctx) in enumerate(batch.chunks):
                if n == 1 and ctx > 0:
                    continue
                sl = slice(start, start + n)             # a prompt chunk: chunked rule from the state at ctx
                conv0, S0 = kv.state(self.layer, batch.slots[i], ctx)
                oo, conv1, S1 = self._run(mixed[None, sl], b[None, sl], a[None, sl], conv0, S0, False)
                kv.set_states(self.layer, [batch.slots[i]], [ctx], [n], conv1, S1)
                o[sl] = oo[0]
        o = self.norm(o.reshape(-1, self.dv), z.reshape(-1, self.dv)).reshape(N, self.Vd)
        return self.out_proj(o)


class Qwen3NextDecoderLayer(nn.Module):
    """Named like transformers' layer: ``linear_attn`` or ``self_attn``, then the MoE block (or a dense MLP)."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        from .model import MLP, make_moe_block
        D = cfg.hidden_size
        self.input_layernorm = OffsetRMSNorm(D, cfg.rms_norm_eps)
        self.post_attention_layernorm = OffsetRMSNorm(D, cfg.rms_norm_eps)
        self.is_linear = cfg.is_linear_layer(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, layer)
        else:
            self.self_attn = GatedAttention(cfg, layer)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = make_moe_block(cfg, layer) if self.is_moe else MLP(D, cfg.dense_intermediate_size)

    def forward(self, x_ND, batch, rotary, experts, dispatcher):
        mixer = self.linear_attn if self.is_linear else self.self_attn
        x_ND = x_ND + mixer(self.input_layernorm(x_ND), batch, rotary)
        h = self.post_attention_layernorm(x_ND)
        return x_ND + (self.mlp(h, batch, experts, dispatcher) if self.is_moe else self.mlp(h))
