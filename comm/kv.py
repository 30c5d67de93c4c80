"""KV-cache traffic between expert-parallel workers: replicating new entries (context-coherent scheme) and moving
whole sequences (speculative shuffling form 1). Entries are whatever the model's attention caches: K/V heads, or
MLA's compressed latent (a fraction of a hidden row) with an empty value.

Shapes: R new entries here, Hk/Dk key heads/dim, Hv/Dv value heads/dim (Dv may be 0), L layers, T positions.
"""

from __future__ import annotations

import torch


def replicate_entries(ex, kv, layer: int, slot_R, pos_R, k_RHD, v_RHD):
    """Write this worker's new entries and every other worker's into layer ``layer`` of ``kv`` (all-gather,
    counted as ``kv`` bytes). ``slot_R`` / ``pos_R``: CPU long."""
    R = k_RHD.shape[0]
    wk = kv.Hkv * kv.Dh
    rows = torch.cat([k_RHD.reshape(R, wk), v_RHD.reshape(R, kv.Hv * kv.Dv)], 1)
    meta = torch.stack([slot_R, pos_R], 1)
    (got, gmeta), _ = ex.all_gather_rows([rows, meta], ["kv", "kv"])
    rows, meta = torch.cat([rows, got]), torch.cat([meta, gmeta]).to(rows.device)
    if rows.shape[0]:
        n = rows.shape[0]
        k, v = rows.split([wk, kv.Hv * kv.Dv], dim=1)
        kv.write(layer, meta[:, 0], meta[:, 1], k.reshape(n, kv.Hkv, kv.Dh), v.reshape(n, kv.Hv, kv.Dv))


def move_sequences(ex, kv, moves: list):
    """Move sequences' first T cached positions from worker src to dst (one exchange, counted as ``shuffle``
    bytes). ``moves``: ``(slot, src, dst, T)``, the same list on every worker; a move to itself moves nothing."""
    rows, meta, dest = [], [], []
    for slot, src, dst, T in moves:
        if src != ex.rank or dst == src or T <= 0:
            continue
        k, v = kv.export(slot, T)                                        # [L, T, Hk, Dk], [L, T, Hv, Dv]
        rows.append(torch.cat([k.transpose(0, 1).reshape(T, -1), v.transpose(0, 1).reshape(T, -1)], 1))
        meta.append(torch.stack([torch.full((T,), slot, dtype=torch.long), torch.arange(T)], 1))
        dest.append(torch.full((T,), dst, dtype=torch.long))
    wk, wv = kv.L * kv.Hkv * kv.Dh, kv.L * kv.Hv * kv.Dv
    if rows:
        rows_t, meta_t, dest_t = torch.cat(rows), torch.cat(meta), torch.cat(dest)
    else:
        rows_t = torch.empty((0, wk + wv), dtype=kv.dtype, device=kv.device)
        meta_t, dest_t = torch.empty((0, 2), dtype=torch.long), torch.empty(0, dtype=torch.long)
    (got, gmeta), _ = ex.exchange(dest_t, [rows_t, meta_t], ["shuffle", "shuffle"])
    if got.shape[0]:
        kv.ensure(int(gmeta[:, 1].max()) + 1)
        n = got.shape[0]
        k = got[:, :wk].reshape(n, kv.L, kv.Hkv, kv.Dh)
        v = got[:, wk:].reshape(n, kv.L, kv.Hv, kv.Dv)
        s_, p_ = gmeta[:, 0].to(kv.device), gmeta[:, 1].to(kv.device)
        for l in range(kv.L):
            kv.k[l][s_, p_] = k[:, l]
            kv.v[l][s_, p_] = v[:, l]
