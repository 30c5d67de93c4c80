"""The one attention entry point: every attention module (plain GQA, partial RoPE, sinks, MLA, gated) runs through
``attention`` / ``attend`` over a ``ForwardBatch``; modules differ only in three methods.

The protocol an attention module implements (``layers.Attention`` and its subclasses, ``mla.MLAttention``):
  ``project(x_ND, pos_N, rotary) -> (q_NHD, k_N.., v_N..)``  queries and the entries the cache stores (MLA: the
      compressed latent as the key, an empty value)
  ``core(q_BHQD, k_BT.., v_BT.., mask_B1QT, causal, qpos_BQ) -> o_BHQD``  attention of queries against cache
      entries as stored (MLA expands them; sinks use the query positions)
  ``o_proj(o_NX)``
and, for schemes that split heads across workers, ``select_heads(q0, q1)`` (a module computing only query heads
[q0, q1), sharing the full module's weights' values) and ``kv_shape()`` (per-token cache entry shape).

Expert-parallel schemes (``moeyard.comm``) call ``project`` / ``attend`` / ``o_proj`` themselves to replicate or
split what is written and gathered; the model calls ``attention``.

Shapes: N tokens, B sequences (or query groups), H query heads, Q queries per group, T keys.
"""

from __future__ import annotations

import torch


def attention(attn, x_ND: torch.Tensor, batch, rotary) -> torch.Tensor:
    """The model's attention: project, write the new entries, attend, output projection."""
    q, k, v = attn.project(x_ND, batch.positions_N, rotary)
    o = attend(attn, q, k, v, batch)
    return attn.o_proj(o.reshape(x_ND.shape[0], -1))


def attend(attn, q_NHD, k_N, v_N, batch, write: bool = True) -> torch.Tensor:
    """Attention output [N, H, Dv] of the batch's queries. With a cache, ``k_N`` / ``v_N`` are written first (unless
    ``write`` is False: a scheme already wrote them) and every query reads its sequence's entries; decode (one
    token per sequence) is one batched call, prompt chunks one call each."""
    kv, layer = batch.kv, attn.layer
    if kv is None:                                     # no cache: sequences of ``block_len`` tokens stacked
        T = batch.block_len
        B = q_NHD.shape[0] // T
        blk = lambda t: t.view(B, T, *t.shape[1:])     # noqa: E731
        qpos = torch.arange(T, device=q_NHD.device).expand(B, T)
        o = attn.core(blk(q_NHD).transpose(1, 2), blk(k_N), blk(v_N), None, True, qpos)   # [B, H, T, Dv]
        return o.transpose(1, 2).reshape(B * T, o.shape[1], o.shape[3])
    if write and len(batch.slots) == 1 and not batch.sparse:    # one sequence at positions ctx..: a slice copy
        kv.write_one(layer, batch.slots[0], batch.chunks[0][2], k_N, v_N)
    elif write:
        kv.write(layer, batch.slots_N, batch.positions_N, k_N, v_N)
    if batch.is_decode:
        if len(batch.slots) == 1:      # one sequence: views of its cache rows, no gather
            K, V = (t.unsqueeze(0) for t in kv.read_one(layer, batch.slots[0], batch.max_len))
        else:
            K, V = kv.read(layer, batch.slots_B, batch.max_len)              # [B, T, Hkv, Dh]
        o = attn.core(q_NHD.unsqueeze(2), K, V, batch.decode_mask, False, batch.positions_N[:, None])
        return o.squeeze(2)
    outs = []
    for i, (start, n, _) in enumerate(batch.chunks):
        K, V = kv.read_one(layer, batch.slots[i], batch.read_len(i))       # [T, Hkv, Dh]
        qq = q_NHD[start:start + n].transpose(0, 1).unsqueeze(0)            # [1, H, n, Dh]
        mask = batch.prefill_mask(i)
        o = attn.core(qq, K.unsqueeze(0), V.unsqueeze(0), mask, mask is None,
                      batch.positions_N[start:start + n][None])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
