"""Tensor-parallel attention for expert-parallel workers (``apply_tp``), and speculative token shuffling form 2.

Every worker holds every token's residual stream (replicated) and a contiguous share of the query heads
(``attn.select_heads``: its heads' projections; the KV heads they read, or MLA's whole latent). Per layer:

* each worker projects q/k/v for its heads, writes its cache entries, attends: ``o_g`` [N, h_g * Dv];
* **baseline** (no shuffling): the head outputs are all-gathered, every worker applies the full ``o_proj`` (the
  exact equivalent of Megatron's row-parallel ``o_proj`` + all-reduce, sending half its bytes). A token's MoE
  output is owned by worker ``t % G``; every worker routes every token (the router input is replicated), runs its
  own experts on the tokens routed to them, and sends each weighted expert output to the token's owner; owners
  sum (in expert order, as local mode), add the shared experts and all-gather the new residual rows;
* **speculative shuffling** (form 2): before the attention of MoE layer l every worker predicts each token's
  experts of layer l with layer l's router applied to the pre-attention residual (identical inputs give identical
  predictions on every worker, so no message is needed) and picks the token's destination: the worker holding
  most of the predicted experts' gate weight, at most ``ceil(N / G * (1 + slack))`` tokens per worker. The head
  outputs go only to that destination (a scatter of [N, D] instead of a full all-gather), which applies
  ``o_proj`` and runs the model's MoE block for real (mispredicted experts take the standard all-to-all); then
  the new residual rows are all-gathered. Outputs are those of local mode whatever the prediction.

Bytes: baseline collectives are ``tp`` (head and residual all-gathers) plus ``moe``; with shuffling the head
scatter and residual all-gather are ``shuffle`` and mispredicted pairs ``moe``.
Shapes: N tokens of the step, D hidden, K top-k, E experts, G workers, h_g this worker's query heads.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..moe.attention import attend
from ..moe.errors import MoeyardError
from ..moe.experts import run_experts
from .dispatch import hold_table

COUNTERS = ("tokens", "pred_hits", "worker_hits", "pairs", "local_pairs", "busiest", "even")


def head_range(H: int, rank: int, world: int) -> tuple[int, int]:
    if H < world:
        raise MoeyardError(f"ep_scheme='tp' splits attention heads across workers: num_heads ({H}) < "
                           f"num_workers ({world})")
    if H % world:
        raise MoeyardError(f"ep_scheme='tp' gives every worker the same number of attention heads: num_heads ({H}) "
                           f"is not a multiple of num_workers ({world})")
    chunk = torch.tensor_split(torch.arange(H), world)[rank]
    return int(chunk[0]), int(chunk[-1]) + 1


def balanced_destinations(score_NG: torch.Tensor, slack: float) -> torch.Tensor:
    """Each token to its best-scoring worker, at most ceil(N / G * (1 + slack)) tokens per worker; tokens with the
    largest margin choose first. Deterministic (same scores -> same answer on every worker)."""
    N, G = score_NG.shape
    if N == 0:
        return torch.empty(0, dtype=torch.long)
    cap = max(1, math.ceil(N / G * (1.0 + slack)))
    best = score_NG.argmax(1)
    if int(torch.bincount(best, minlength=G).max()) <= cap:
        return best
    top2 = torch.topk(score_NG, min(2, G), dim=1).values
    order = torch.argsort(-(top2[:, 0] - top2[:, -1]), stable=True).tolist()
    pref = torch.argsort(-score_NG, dim=1, stable=True).tolist()
    dest, used = [0] * N, [0] * G
    for t in order:
        for g in pref[t]:
            if used[g] < cap:
                break
        dest[t] = g
        used[g] += 1
    return torch.tensor(dest, dtype=torch.long)


class TPLayer(nn.Module):
    """One decoder layer with this worker's heads; ``counters``: per MoE layer lists shared by the worker."""

    def __init__(self, inner, ex, heads, hold_EG, row, shuffle: bool, slack: float, counters: dict):
        super().__init__()
        self.inner, self.ex, self.heads = inner, ex, heads
        self.hold_EG, self.row, self.shuffle, self.slack, self.c = hold_EG, row, shuffle, slack, counters

    def forward(self, x_ND, batch, rotary, experts, dispatcher):
        L = self.inner
        q, k, v = self.heads.project(L.input_layernorm(x_ND), batch.positions_N, rotary)
        o = attend(self.heads, q, k, v, batch)
        o = o.reshape(o.shape[0], -1)                                       # [N, h_g * Dv]
        if self.shuffle:
            return self._shuffled(x_ND, o, batch, experts, dispatcher)
        return self._baseline(x_ND, o, batch, experts)

    def _gather_rows(self, rows_ND, dest_N, kind):
        """Every worker's rows (tokens ``dest_N == g`` of worker g) back into [N, D] on every worker."""
        blocks = self.ex.all_gather_blocks(rows_ND, kind, torch.bincount(dest_N, minlength=self.ex.world).tolist())
        new = torch.empty((dest_N.numel(), rows_ND.shape[1]), dtype=rows_ND.dtype, device=rows_ND.device)
        for g, b in enumerate(blocks):
            new[(dest_N == g).nonzero().squeeze(1).to(new.device)] = b
        return new

    def _baseline(self, x, o, batch, experts):
        L, ex = self.inner, self.ex
        G, rank, dev = ex.world, ex.rank, x.device
        N, D = x.shape
        x = x + L.self_attn.o_proj(torch.cat(ex.all_gather_blocks(o, "tp", [N] * G), 1))   # all heads, rank order
        h = L.post_attention_layernorm(x)
        if not L.is_moe:
            return x + L.mlp(h)
        block = L.mlp
        ids_NK, w_NK = block.route(h, batch)
        ids_NK = ids_NK.cpu()
        K = ids_NK.shape[1]
        hold = self.hold_EG
        owner_N = torch.arange(N) % G
        e_M, tok_M = ids_NK.reshape(-1), torch.arange(N).repeat_interleave(K)
        own_M = owner_N[tok_M]
        holder_M = torch.where(hold[e_M, own_M], own_M, hold[e_M].long().argmax(1)) if N else own_M
        # every worker routes every token, so each knows what every other sends to every owner: no sizes, no ids
        sel_g = [m[torch.argsort(e_M[m], stable=True)] for m in
                 ((holder_M == g).nonzero().squeeze(1) for g in range(G))]
        sel = sel_g[rank]
        nloc = int((own_M[sel] == rank).sum())
        self.c["pairs"][self.row] += int(sel.numel())
        self.c["local_pairs"][self.row] += nloc
        ex.count_pairs(nloc, int(sel.numel()))
        # my experts on the tokens routed to them (their router input is here already), outputs to the owners
        uids, counts = torch.unique_consecutive(e_M[sel], return_counts=True)
        y = run_experts(block.layer, h[tok_M[sel].to(dev)], uids.tolist(), counts.tolist(), experts)
        y = y * w_NK.reshape(-1)[sel.to(dev)].unsqueeze(-1).to(y.dtype)
        got = [s[own_M[s] == rank] for s in sel_g]
        (ry,), _ = ex.exchange(own_M[sel], [y], ["moe"], [len(s) for s in got])
        got = torch.cat(got)
        rmeta = torch.stack([tok_M[got], e_M[got]], 1)
        # owner: each token's expert outputs in expert order (as local mode), the shared experts, the residual
        own_idx = (owner_N == rank).nonzero().squeeze(1)
        eo = torch.argsort(rmeta[:, 1], stable=True)
        ry, rmeta = ry[eo.to(dev)], rmeta[eo]
        out = x.new_zeros((own_idx.numel(), D))
        if ry.shape[0]:
            out = out.index_add(0, (rmeta[:, 0] // G).to(dev), ry)      # owner_N = t % G: local row t // G
        if own_idx.numel():
            s = block.shared(h[own_idx.to(dev)])
            if s is not None:
                out = out + s
        return self._gather_rows(x[own_idx.to(dev)] + out, owner_N, "tp")

    def _shuffled(self, x, o, batch, experts, dispatcher):
        L, ex = self.inner, self.ex
        G, rank, dev = ex.world, ex.rank, x.device
        N = x.shape[0]
        if L.is_moe:          # predicted experts: this layer's router on the current residual
            pred_NK, pw_NK = L.mlp.select(L.post_attention_layernorm(x))
            pred_NK = pred_NK.cpu()
            score = (pw_NK.cpu().float().unsqueeze(-1) * self.hold_EG.float()[pred_NK]).sum(1)   # [N, G]
            dest_N = balanced_destinations(score, self.slack)
            self.c["busiest"][self.row] += int(torch.bincount(dest_N, minlength=G).max()) if N else 0
            self.c["even"][self.row] += N / G
        else:
            dest_N = torch.arange(N) % G
        # each token's heads go only to its destination (replaces the all-reduce)
        (got,), plan = ex.exchange(dest_N, [o], ["shuffle"])
        mine = (dest_N == rank).nonzero().squeeze(1)
        n = mine.numel()
        if any(c != n for c in plan.recv_counts):      # every worker must have made the same prediction
            raise RuntimeError(f"tensor-parallel shuffling: worker {rank} expected the heads of {n} tokens from "
                               f"every worker, got {plan.recv_counts} (workers disagree on destinations: "
                               f"non-deterministic router results?)")
        O = torch.cat(torch.split(got, plan.recv_counts), 1)              # [n, H * Dv]: all heads, rank order
        xm = x[mine.to(dev)] + L.self_attn.o_proj(O)
        h = L.post_attention_layernorm(xm)
        if not L.is_moe:
            xm = xm + L.mlp(h)
        else:
            seen = {}
            hooks = SimpleNamespace(route_hooks=[lambda l, x_, ids, w: seen.setdefault("ids", ids)]
                                    + list(batch.route_hooks))
            xm = xm + L.mlp(h, hooks, experts, dispatcher)            # mispredicted pairs: standard all-to-all
            ids_c = seen["ids"].cpu() if "ids" in seen else torch.empty((0, pred_NK.shape[1]), dtype=torch.long)
            held = self.hold_EG[ids_c, rank]
            c, r = self.c, self.row
            c["tokens"][r] += n
            c["pairs"][r] += int(ids_c.numel())
            c["local_pairs"][r] += int(held.sum())
            if n:
                p = pred_NK[mine]
                c["pred_hits"][r] += int((p[:, :, None] == ids_c[:, None, :]).any(-1).sum())
                c["worker_hits"][r] += int(held[:, 0].sum())
        return self._gather_rows(xm, dest_N, "shuffle")


def apply_tp(model, ex, placement, layer_index: dict[int, int], shuffle: bool = False, slack: float = 0.5):
    """Give every layer this worker's heads; returns (per-MoE-layer counters, the heads of layer 0: its cache
    entry shape sizes the worker's cache)."""
    layers = model.model.layers
    holds = hold_table(placement)
    counters = {k: [0] * placement.num_layers for k in COUNTERS}
    first = None
    for i, layer in enumerate(layers):
        a = layer.self_attn
        heads = a.select_heads(*head_range(a.H, ex.rank, ex.world))
        first = first or heads
        row = layer_index.get(i)
        layers[i] = TPLayer(layer, ex, heads, holds[row] if row is not None else None, row, shuffle, slack,
                            counters)
    return counters, first


def spec_stats(c: dict) -> dict:
    """Speculative shuffling's prediction accuracy (overall and ``*_per_layer``) from the summed per-layer
    counters (lists; form 2's here, form 1's in the planner)."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in c.items()}
    out = {}
    if float(t["tokens"].sum()):
        for name, hits, of in (("expert_precision", "pred_hits", "pairs"), ("worker_accuracy", "worker_hits", "tokens"),
                               ("local_fraction", "local_pairs", "pairs")):
            out[f"spec_{name}_per_layer"] = (t[hits] / t[of].clamp(min=1)).tolist()
            out[f"spec_{name}"] = float(t[hits].sum() / t[of].sum())
        # busiest destination's tokens / the even share, over MoE layers and steps (1 = balanced)
        out["shuffle_busiest_tokens"], out["shuffle_even_tokens"] = float(t["busiest"].sum()), float(t["even"].sum())
        out["shuffle_imbalance"] = out["shuffle_busiest_tokens"] / max(out["shuffle_even_tokens"], 1e-9)
    return out
