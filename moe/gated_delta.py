"""The gated delta rule and its causal depthwise convolution: pure-torch reference paths (Qwen3-Next).

The same operations, in the same order, as transformers' torch fallbacks (``torch_chunk_gated_delta_rule``,
``torch_recurrent_gated_delta_rule``, ``causal_conv1d_fn`` / ``causal_conv1d_update`` in
``models/qwen3_next/modeling_qwen3_next.py``), so results agree bit for bit where the shapes match: a prompt (or a
chunk of one continuing from a state) runs the chunked form, a single decoded token the recurrent form — the split
transformers makes.

Shapes: B sequences, T tokens, Hk / Hv key / value heads (Hv a multiple of Hk: grouped value attention), dk / dv
head dims, C conv channels, W conv kernel width. State S [B, Hv, dk, dv] (float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """Grouped heads repeated, [B, H, T, *] float32, q and k L2-normalised."""
    Hk, Hv = k.shape[2], v.shape[2]
    if Hk != Hv:
        q, k = q.repeat_interleave(Hv // Hk, dim=2), k.repeat_interleave(Hv // Hk, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    return l2norm(q), l2norm(k), v, g, beta


def chunk_gated_delta_rule(q_BTHD, k_BTHD, v_BTHD, g_BTH, beta_BTH, state=None, chunk: int = 64):
    """(out [B, T, Hv, dv] in q's dtype, final state [B, Hv, dk, dv]) of a whole sequence or chunk, from ``state``
    (None: zeros). The within-chunk updates are condensed by a unit-triangular solve (the UT transform); chunks run
    one after another."""
    dt, T = q_BTHD.dtype, k_BTHD.shape[1]
    q, k, v, g, beta = _prepare(q_BTHD, k_BTHD, v_BTHD, g_BTH, beta_BTH)
    B, Hv, _, dv = v.shape
    dk = k.shape[-1]
    q = q * dk ** -0.5
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (T + pad) // chunk
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(x.shape[0], x.shape[1], -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(g.shape[0], g.shape[1], -1, chunk)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=3)                                         # log decay from the chunk start
    pair = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, k_beta * cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    S = torch.zeros((B, Hv, dk, dv), dtype=new_v.dtype, device=new_v.device) if state is None else state.to(new_v)
    out = torch.zeros_like(new_v)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    decay = cum[..., -1].exp()[..., None, None]
    for i in range(n):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + intra[:, :, i] @ v_new
        S = S * decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, Hv, -1, dv)[:, :, :T]
    return out.transpose(1, 2).to(dt, memory_format=torch.contiguous_format), S


def recurrent_gated_delta_rule(q_BTHD, k_BTHD, v_BTHD, g_BTH, beta_BTH, state):
    """Token by token from ``state`` (decode): decay, delta-rule write, read. Same results as the chunked form up to
    rounding; transformers uses it for single decoded tokens."""
    dt = q_BTHD.dtype
    q, k, v, g, beta = _prepare(q_BTHD, k_BTHD, v_BTHD, g_BTH, beta_BTH)
    q = q / (q.shape[-1] ** 0.5)
    S = state.to(v)
    out = torch.zeros_like(v)
    for i in range(v.shape[2]):
        k_t = k[:, :, i]
        S = S * g[:, :, i].exp()[..., None, None]
        delta = (v[:, :, i] - (S * k_t.unsqueeze(-1)).sum(dim=-2)) * beta[:, :, i].unsqueeze(-1)
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, i] = (S * q[:, :, i].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dt), S


def causal_conv(x_BCT: torch.Tensor, w_CW: torch.Tensor, prev_BCW: torch.Tensor | None):
    """SiLU(depthwise causal conv) of T new inputs after the last W inputs ``prev`` (None: a sequence start); returns
    (out [B, C, T], the new conv state: the last W inputs). Inputs shorter than W are left-padded with zeros first,
    as transformers' cache does, so the kernel sees the same tensors."""
    T, W = x_BCT.shape[-1], w_CW.shape[-1]
    if prev_BCW is not None and T == 1:                           # decode: causal_conv1d_update
        full = torch.cat([prev_BCW, x_BCT], dim=-1).to(w_CW.dtype)
        out = F.conv1d(full, w_CW.unsqueeze(1), None, padding=0, groups=x_BCT.shape[1])[:, :, -T:]
        return F.silu(out).to(x_BCT.dtype), full[:, :, -W:]
    full = x_BCT if prev_BCW is None else torch.cat([prev_BCW, x_BCT], dim=-1)
    if full.shape[-1] < W:
        full = F.pad(full, (W - full.shape[-1], 0), value=0)
    out = F.conv1d(full.to(w_CW.dtype), w_CW.unsqueeze(1), None, padding=W - 1, groups=x_BCT.shape[1])
    out = F.silu(out[:, :, :full.shape[-1]]).to(x_BCT.dtype)
    return out[:, :, -T:], full[:, :, -W:]
