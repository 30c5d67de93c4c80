"""ExFlow's context-coherent expert parallelism, applied to a built model (``apply_coherent``).

After a MoE layer a token stays on the worker of its first-choice expert: its residual stream moves there, the
other experts' weighted outputs are sent there, and its next attention runs there. A (token, expert) pair served
on the token's new worker sends only its expert id, key and gate weight: the router input is the norm of the
residual stream that moves there anyway, recomputed (row by row, so bit for bit). Every worker keeps every
sequence's cache: each layer's new entries are all-gathered (``kv.replicate_entries``; for MLA the compressed
latent, a fraction of a hidden row). Final hidden states of sampled rows return home for the LM head.

The wrappers call the model's own pieces: the attention protocol (``project`` / ``attend`` / ``o_proj``), the
decoder layer's ``attention_block`` and norms, the MoE block's ``route`` / ``shared`` and ``run_experts``.

The token table ``tab`` [R, 5] (CPU long) travels with the resident tokens: slot, pos, key (index in the step's
flattened batch), home worker, sample flag. Shapes: R resident tokens, D hidden, K top-k, E experts, G workers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe.attention import attend
from ..moe.experts import run_experts
from ..moe.model import ForwardBatch
from .dispatch import dest_table, hold_table
from .kv import replicate_entries


def relayout(batch: ForwardBatch, tab: torch.Tensor, device):
    """Lay ``batch`` over the resident tokens of ``tab`` (sorted by key), in place: the model's layer loop keeps
    the same batch object while tokens move between workers."""
    fresh = ForwardBatch.of_tokens(tab[:, 0], tab[:, 1].to(device), batch.kv, batch.route_hooks)
    vars(batch).update(vars(fresh))
    batch.tab = tab


class CoherentAttention(nn.Module):
    """The model's attention with its new cache entries replicated on every worker."""

    def __init__(self, inner, ex):
        super().__init__()
        self.inner, self.ex, self.layer = inner, ex, inner.layer

    def forward(self, x_RD, batch, rotary):
        a, kv, R = self.inner, batch.kv, x_RD.shape[0]
        if R:
            q, k, v = a.project(x_RD, batch.positions_N, rotary)
        else:
            k = x_RD.new_empty((0, kv.Hkv, kv.Dh))
            v = x_RD.new_empty((0, kv.Hv, kv.Dv))
        replicate_entries(self.ex, kv, self.layer, batch.tab[:, 0], batch.tab[:, 1], k, v)
        if not R:
            return x_RD
        o = attend(a, q, k, v, batch, write=False)
        return a.o_proj(o.reshape(R, -1))


class CoherentMoELayer(nn.Module):
    """A MoE decoder layer whose tokens end on their first-choice expert's worker."""

    def __init__(self, inner, ex, placement, row: int):
        super().__init__()
        self.inner, self.ex = inner, ex
        self.hold_EG = hold_table(placement)[row]
        self.dest_E = dest_table(placement, ex.rank)[row]

    def forward(self, x_RD, batch, rotary, experts, dispatcher):
        L, ex = self.inner, self.ex
        rank, dev, tab = ex.rank, x_RD.device, batch.tab
        x_RD = L.attention_block(x_RD, batch, rotary)
        h_RD = L.post_attention_layernorm(x_RD)
        block, li = L.mlp, L.mlp.layer
        R, D = x_RD.shape
        ids_RK, w_RK = block.route(h_RD, batch)
        ids_RK = ids_RK.cpu()
        log = getattr(batch, "routing_log", None)
        if log is not None:                      # speculative shuffling learns each token's routing by key
            log[li] = (tab[:, 2].clone(), ids_RK)
        K = ids_RK.shape[1]
        hold = self.hold_EG
        # 1. where each token goes next: the worker of its first-choice expert (itself if it holds a copy); each
        #    (token, expert) pair is served there when that worker holds the expert, else here, else by a holder
        newloc_R = self.dest_E[ids_RK[:, 0]]
        e_M = ids_RK.reshape(-1)
        nl_M = newloc_R.repeat_interleave(K)
        dest_M = torch.where(hold[e_M, nl_M], nl_M,
                             torch.where(hold[e_M, rank], torch.full_like(nl_M, rank), hold[e_M].long().argmax(1)))
        ex.count_pairs(int((dest_M == rank).sum()), int(dest_M.numel()))
        tok_M = torch.arange(R).repeat_interleave(K)
        key_M, w_M = tab[tok_M, 2], w_RK.reshape(-1, 1).to(h_RD.dtype)
        near = (dest_M == nl_M).nonzero().squeeze(1)      # served where the token goes (its first choice at least)
        far = (dest_M != nl_M).nonzero().squeeze(1)
        # 2. residual streams to the tokens' new workers; near pairs send only (expert, key, weight): the router
        #    input is the residual's norm, recomputed there; far pairs send the router input too
        ((mx, mtab), _), ((nw, nmeta), _), ((fx, fmeta), _) = ex.exchange_many([
            (newloc_R, [x_RD, tab], ["hidden", "meta"]),
            (nl_M[near], [w_M[near.to(dev)], torch.stack([e_M[near], key_M[near]], 1)], ["moe", "moe"]),
            (dest_M[far], [torch.cat([h_RD[tok_M[far].to(dev)], w_M[far.to(dev)]], 1),
                           torch.stack([e_M[far], key_M[far], nl_M[far]], 1)], ["moe", "moe"])])
        order = torch.argsort(mtab[:, 2])
        mtab, mx = mtab[order], mx[order.to(dev)]
        keys = mtab[:, 2].contiguous()
        hn = L.post_attention_layernorm(mx)
        # 3. this worker's experts on its pairs (near, then far), weighted; far outputs to their tokens' workers
        e_P = torch.cat([nmeta[:, 0], fmeta[:, 0]])
        x_P = torch.cat([hn[torch.searchsorted(keys, nmeta[:, 1].contiguous()).to(dev)], fx[:, :D]])
        perm = torch.argsort(e_P, stable=True)
        uids, counts = torch.unique_consecutive(e_P[perm], return_counts=True)
        y = run_experts(li, x_P[perm.to(dev)], uids.tolist(), counts.tolist(), experts)
        y_P = torch.empty_like(y)
        y_P[perm.to(dev)] = y
        y_P = y_P * torch.cat([nw, fx[:, D:]])
        n = nmeta.shape[0]
        (ry, rk), _ = ex.exchange(fmeta[:, 2], [y_P[n:], fmeta[:, [1, 0]]], ["moe", "meta"])
        # 4. the resident tokens, by key: sum expert outputs in expert order (as local mode), shared experts
        ry, rk = torch.cat([y_P[:n], ry]), torch.cat([nmeta[:, [1, 0]], rk])
        out = mx.new_zeros((keys.numel(), D))
        if ry.shape[0]:
            eo = torch.argsort(rk[:, 1], stable=True)
            ry, rk = ry[eo.to(dev)], rk[eo]
            out = out.index_add(0, torch.searchsorted(keys, rk[:, 0].contiguous()).to(dev), ry)
        if keys.numel():
            s = block.shared(hn)
            if s is not None:
                out = out + s
        relayout(batch, mtab, dev)
        return mx + out


def apply_coherent(model, ex, placement, layer_index: dict[int, int]):
    """Wrap every attention (replicated cache entries) and every MoE layer (tokens move to their experts)."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.self_attn = CoherentAttention(layer.self_attn, ex)
        if layer.is_moe:
            layers[i] = CoherentMoELayer(layer, ex, placement, layer_index[i])


def coherent_hidden(model, ids_R: torch.Tensor, tab: torch.Tensor, kv, ex, route_hooks=(),
                    routing_log: dict | None = None) -> torch.Tensor:
    """Final hidden states [B, D] of this worker's sampled rows, in key order (they come home from wherever
    their tokens ended). ``routing_log``: filled with layer -> (keys, ids [R, K]) of the tokens routed here."""
    dev = model.lm_head.weight.device
    batch = ForwardBatch.of_tokens(tab[:, 0], tab[:, 1].to(dev), kv, route_hooks)
    batch.tab, batch.routing_log = tab, routing_log
    x = model.hidden(ids_R.to(dev), batch)
    tab = batch.tab
    sel = tab[:, 4].bool()
    (hx, hk), _ = ex.exchange(tab[sel, 3], [x[sel.to(dev)], tab[sel, 2]], ["hidden", "meta"])
    return hx[torch.argsort(hk).to(dev)]
