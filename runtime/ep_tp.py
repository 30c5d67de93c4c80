"""Tensor-parallel attention for expert-parallel workers (``ep_scheme="tp"``), and speculative token shuffling
form 2 on top of it.

Every worker holds every token's residual stream (replicated) and a contiguous share of the attention heads (its
query heads and the KV heads they read; the KV cache holds only those). Per layer:

* each worker projects q/k/v for its heads, writes its K/V, attends: ``o_g`` [N, h_g * Dh];
* **baseline** (no shuffling): the head outputs are all-gathered, every worker applies the full ``o_proj`` (the
  exact equivalent of Megatron's row-parallel ``o_proj`` + all-reduce, sending half its bytes: one [N, D] copy to
  each other worker instead of a reduce-scatter plus an all-gather). A token's MoE output is owned by worker
  ``t % G``; every worker routes every token (the router input is replicated), runs its own experts on the tokens
  routed to them, and sends each weighted expert output to the token's owner; owners sum (in expert order, as
  local mode) and all-gather the new residual rows;
* **speculative shuffling** (form 2): before the attention of MoE layer l every worker predicts each token's
  experts of layer l with layer l's router applied to the pre-attention residual (``moe.predictors`` "router"
  predictor at distance 0; identical inputs give identical predictions on every worker, so no message is needed)
  and picks the token's destination: the worker holding most of the predicted experts' gate weight, at most
  ``ceil(N / G * (1 + slack))`` tokens per worker. The head outputs go only to that destination (this replaces the
  all-reduce: a scatter of [N, D] instead of a full all-gather), which applies ``o_proj`` and routes for real;
  experts it holds run locally, mispredicted ones take the normal all-to-all (dispatch and combine); then the new
  residual rows are all-gathered for the next layer's attention. Outputs are those of local mode whatever the
  prediction.

Bytes: baseline collectives are counted as ``tp`` (head all-gather and residual all-gather) plus ``moe`` (expert
outputs sent to owners); with shuffling the collectives that replace the all-reduce (head scatter, residual
all-gather) are ``shuffle`` and mispredicted pairs ``moe``. Everything is in ``a2a_bytes``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..moe.experts import run_experts
from ..runtime.kv_cache import KVCache
from .ep_worker import attend_cached


class TPHeads:
    """This worker's share of one attention layer: query heads [q0, q1), KV heads [k0, k1)."""

    def __init__(self, attn, rank: int, world: int):
        H, Hkv, Dh = attn.H, attn.Hkv, attn.Dh
        if H < world:
            raise ValueError(f"ep_scheme='tp' splits attention heads across workers: num_heads ({H}) < "
                             f"num_workers ({world})")
        chunk = torch.tensor_split(torch.arange(H), world)[rank]
        self.q0, self.q1 = int(chunk[0]), int(chunk[-1]) + 1
        r = H // Hkv
        kvh = chunk // r
        self.k0, self.k1 = int(kvh[0]), int(kvh[-1]) + 1
        self.kv_map = (kvh - self.k0)                       # my q head -> my kv head
        self.attn, self.Dh = attn, Dh
        self.h, self.hkv = self.q1 - self.q0, self.k1 - self.k0
        # sdpa's enable_gqa needs query heads in equal consecutive groups per KV head; else K/V are expanded
        self.gqa_ok = self.h % self.hkv == 0 and bool(
            (self.kv_map == torch.arange(self.h) // (self.h // self.hkv)).all())
        self.full_qk = attn.qk_norm == "full"               # norm over all heads: project everything, then slice
        if not self.full_qk:
            q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
            sl = lambda lin, a, b: (lin.weight[a * Dh:b * Dh].contiguous(),  # noqa: E731
                                    None if lin.bias is None else lin.bias[a * Dh:b * Dh].contiguous())
            self.wq, self.wk, self.wv = sl(q, self.q0, self.q1), sl(k, self.k0, self.k1), sl(v, self.k0, self.k1)

    def qkv(self, x_ND, pos_N, rotary):
        attn, Dh, N = self.attn, self.Dh, x_ND.shape[0]
        if self.full_qk:
            q, k, v = attn.qkv(x_ND, pos_N, rotary)
            return q[:, self.q0:self.q1], k[:, self.k0:self.k1], v[:, self.k0:self.k1]
        q, k, v = (F.linear(x_ND, *w) for w in (self.wq, self.wk, self.wv))
        if attn.clip is not None:
            q, k, v = (t.clamp(-attn.clip, attn.clip) for t in (q, k, v))
        q, k, v = q.view(N, self.h, Dh), k.view(N, self.hkv, Dh), v.view(N, self.hkv, Dh)
        if attn.qk_norm == "head":
            q, k = attn.q_norm(q), attn.k_norm(k)
        return rotary(q, pos_N), rotary(k, pos_N), v

    def sdpa(self, q_BHQD, k_BHTD, v_BHTD, mask=None, causal=False):
        if not self.gqa_ok:                                # uneven head groups: expand K/V per query head
            k_BHTD, v_BHTD = k_BHTD[:, self.kv_map], v_BHTD[:, self.kv_map]
        return F.scaled_dot_product_attention(q_BHQD, k_BHTD, v_BHTD, attn_mask=mask, is_causal=causal,
                                              scale=self.attn.scale,
                                              enable_gqa=self.h != k_BHTD.shape[1])


def tp_kv_cache(cfg, heads: list[TPHeads], slots: int, max_len: int, dtype, device) -> KVCache:
    return KVCache(cfg.num_layers, slots, heads[0].hkv, cfg.head_dim, max_len, dtype, device)


def balanced_destinations(score_NG: torch.Tensor, slack: float) -> torch.Tensor:
    """Each token to its best-scoring worker, at most ceil(N / G * (1 + slack)) tokens per worker; tokens with the
    largest margin choose first. Deterministic (same scores -> same answer on every worker)."""
    N, G = score_NG.shape
    if N == 0:
        return torch.empty(0, dtype=torch.long)
    cap = max(1, math.ceil(N / G * (1.0 + slack)))
    best = score_NG.argmax(1)
    count = torch.bincount(best, minlength=G)
    if int(count.max()) <= cap:
        return best
    top2 = torch.topk(score_NG, min(2, G), dim=1).values
    margin = top2[:, 0] - top2[:, -1]
    order = torch.argsort(-margin, stable=True).tolist()
    pref = torch.argsort(-score_NG, dim=1, stable=True).tolist()
    dest = [0] * N
    used = [0] * G
    for t in order:
        for g in pref[t]:
            if used[g] < cap:
                break
        dest[t] = g
        used[g] += 1
    return torch.tensor(dest, dtype=torch.long)


class TPRunner:
    """The ``tp`` scheme's forward pass on one worker (state lives in its ``EPWorker``)."""

    def __init__(self, worker, shuffle: bool = False, slack: float = 0.5):
        self.w, self.shuffle, self.slack = worker, shuffle, slack
        L = len(worker.moe_layers)
        self.counters = {k: [0] * L for k in ("tokens", "pred_hits", "worker_hits", "pairs", "local_pairs")}

    def stats(self) -> dict:
        d = {}
        for k, v in self.counters.items():
            for i, x in enumerate(v):
                d[f"tp_{k}_l{i}"] = x
        return d

    # -- collectives -------------------------------------------------------------------------------------------
    def _all_gather_rows(self, rows, kind):
        """Every worker's ``rows`` to every other worker; returns the list of blocks by rank (own block included)."""
        ex, G, rank = self.w.ex, self.w.world, self.w.rank
        n = rows.shape[0]
        others = [g for g in range(G) if g != rank]
        dest = torch.tensor(others, dtype=torch.long).repeat_interleave(n)
        (got,), plan = ex.exchange(dest, [rows.repeat(len(others), 1)], [kind])
        blocks = list(torch.split(got, plan.recv_counts))     # by source rank; nothing came from this rank
        blocks[rank] = rows
        return blocks

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, ids_N: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, D] after the final norm, identical on every worker. ``tab``: slot, pos, key columns."""
        w = self.w
        m, dev = w.model, w.device
        x = m.model.embed_tokens(ids_N.to(dev))
        pos = tab[:, 1].to(dev)
        for li, layer in enumerate(m.model.layers):
            o = self._attend(li, layer, x, pos, tab)                         # [N, h_g * Dh]
            if self.shuffle:
                x = self._shuffled_layer(li, layer, x, o)
            else:
                x = self._baseline_layer(li, layer, x, o)
        return m.model.norm(x)

    def _attend(self, li, layer, x, pos, tab):
        w = self.w
        heads = w.tp_heads[li]
        q, k, v = heads.qkv(layer.input_layernorm(x), pos, w.model.rotary)
        w.kv.write(li, tab[:, 0].to(w.device), pos, k, v)
        o = attend_cached(w.kv, li, q, tab, heads.sdpa, w.device)
        return o.reshape(o.shape[0], heads.h * heads.Dh)

    def _baseline_layer(self, li, layer, x, o):
        w = self.w
        G, rank, dev = w.world, w.rank, w.device
        N, D = x.shape
        attn = layer.self_attn
        O = torch.cat(self._all_gather_rows(o, "tp"), 1)               # [N, H * Dh]: all heads, in rank order
        x = x + attn.o_proj(O)
        h = layer.post_attention_layernorm(x)
        if not layer.is_moe:
            return x + layer.mlp(h)
        block = layer.mlp
        pl = w.layer_index[li]
        hold = w.hold_LEG[pl]                                           # [E, G]
        K = w.cfg.top_k
        _, ids_NK, w_NK = block.gate(h)
        ids_NK = ids_NK.cpu()
        owner_N = torch.arange(N) % G
        e_M = ids_NK.reshape(-1)
        tok_M = torch.arange(N).repeat_interleave(K)
        own_M = owner_N[tok_M]
        holder_M = torch.where(hold[e_M, own_M], own_M, hold[e_M].long().argmax(1)) if N else own_M
        mine = (holder_M == rank).nonzero().squeeze(1)
        self.counters["pairs"][pl] += int(mine.numel())
        nloc = int((own_M[mine] == rank).sum())
        self.counters["local_pairs"][pl] += nloc
        w.ex.local_assign += nloc
        w.ex.total_assign += int(mine.numel())
        # my experts on the tokens routed to them (their router input is here already)
        order = torch.argsort(e_M[mine], stable=True)
        sel = mine[order]
        uids, counts = torch.unique_consecutive(e_M[sel], return_counts=True)
        y = run_experts(li, h[tok_M[sel].to(dev)], uids.tolist(), counts.tolist(), w.model.experts)
        y = y * w_NK.reshape(-1)[sel.to(dev)].unsqueeze(-1).to(y.dtype)
        meta = torch.stack([tok_M[sel], e_M[sel]], 1)
        (ry, rmeta), _ = w.ex.exchange(own_M[sel], [y, meta], ["moe", "meta"])
        # owner: add each token's expert outputs in expert order (as local mode), then the residual
        own_idx = (owner_N == rank).nonzero().squeeze(1)
        eo = torch.argsort(rmeta[:, 1], stable=True)
        ry, rmeta = ry[eo.to(dev)], rmeta[eo]
        out = x.new_zeros((own_idx.numel(), D))
        if ry.shape[0]:
            out = out.index_add(0, (rmeta[:, 0] // G).to(dev), ry)   # owner_N = t % G: local row t // G
        if block.shared_expert is not None and own_idx.numel():
            hs = h[own_idx.to(dev)]
            out = out + torch.sigmoid(block.shared_expert_gate(hs)) * block.shared_expert(hs)
        mine_rows = x[own_idx.to(dev)] + out
        blocks = self._all_gather_rows(mine_rows, "tp")
        new = torch.empty_like(x)
        for g in range(G):
            new[torch.arange(N)[g::G].to(dev)] = blocks[g]
        return new

    def _shuffled_layer(self, li, layer, x, o):
        w = self.w
        G, rank, dev = w.world, w.rank, w.device
        N, D = x.shape
        attn = layer.self_attn
        if layer.is_moe:
            pl = w.layer_index[li]
            hold = w.hold_LEG[pl].to(x.dtype)                              # [E, G]
            _, pred_NK, pw_NK = layer.mlp.gate(layer.post_attention_layernorm(x))   # router on the current state
            pred_NK = pred_NK.cpu()
            score = (pw_NK.cpu().float().unsqueeze(-1) * hold[pred_NK].float()).sum(1)   # [N, G]
            dest_N = balanced_destinations(score, self.slack)
        else:
            dest_N = torch.arange(N) % G
        # scatter head outputs: each token's heads go only to its destination (replaces the all-reduce)
        (got,), plan = w.ex.exchange(dest_N, [o], ["shuffle"])
        mine = (dest_N == rank).nonzero().squeeze(1)
        n = mine.numel()
        if any(c != n for c in plan.recv_counts):      # every worker must have made the same prediction
            raise RuntimeError(f"tensor-parallel shuffling: worker {rank} expected the heads of {n} tokens from "
                               f"every worker, got {plan.recv_counts} (workers disagree on destinations: "
                               f"non-deterministic router results?)")
        O = torch.cat(torch.split(got, plan.recv_counts), 1) if n else o.new_empty((0, attn.H * attn.Dh))
        xm = x[mine.to(dev)] + attn.o_proj(O)
        h = layer.post_attention_layernorm(xm)
        if not layer.is_moe:
            xm = xm + layer.mlp(h)
        else:
            block = layer.mlp
            _, ids_NK, w_NK = block.gate(h) if n else (None, torch.empty((0, w.cfg.top_k), dtype=torch.long),
                                                      h.new_empty((0, w.cfg.top_k)))
            ids_c = ids_NK.cpu()
            held = w.hold_LEG[pl][ids_c, rank] if n else torch.empty((0, w.cfg.top_k), dtype=torch.bool)
            c = self.counters
            c["tokens"][pl] += n
            c["pairs"][pl] += int(ids_c.numel())
            c["local_pairs"][pl] += int(held.sum())
            if n:
                p = pred_NK[mine]
                c["pred_hits"][pl] += int((p[:, :, None] == ids_c[:, None, :]).any(-1).sum())
                c["worker_hits"][pl] += int(held[:, 0].sum())
            # mispredicted pairs take the normal all-to-all (the dispatcher counts local/total pairs)
            disp = w.model.dispatcher
            routed = disp.dispatch(li, h, ids_NK, w_NK)
            y = run_experts(li, routed.x_MD, routed.expert_ids, routed.counts, w.model.experts)
            out = disp.combine(y, routed.meta)
            if block.shared_expert is not None and n:
                out = out + torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
            xm = xm + out
        blocks = self._all_gather_rows(xm, "shuffle")
        new = torch.empty_like(x)
        for g in range(G):
            new[(dest_N == g).nonzero().squeeze(1).to(dev)] = blocks[g]
        return new


def tp_spec_stats(d: dict, num_moe_layers: int) -> dict:
    """Per-layer prediction accuracy of form 2 from the summed worker counters (``tp_*_l{i}``)."""
    out = {}
    sums = {k: 0 for k in ("tokens", "pred_hits", "worker_hits", "pairs", "local_pairs")}
    for i in range(num_moe_layers):
        v = {k: d.get(f"tp_{k}_l{i}", 0) for k in sums}
        for k in sums:
            sums[k] += v[k]
        if v["tokens"]:
            out[f"spec_expert_precision_l{i}"] = v["pred_hits"] / v["pairs"]
            out[f"spec_worker_accuracy_l{i}"] = v["worker_hits"] / v["tokens"]
        if v["pairs"]:
            out[f"spec_local_fraction_l{i}"] = v["local_pairs"] / v["pairs"]
    if sums["tokens"]:
        out["spec_expert_precision"] = sums["pred_hits"] / sums["pairs"]
        out["spec_worker_accuracy"] = sums["worker_hits"] / sums["tokens"]
    if sums["pairs"]:
        out["spec_local_fraction"] = sums["local_pairs"] / sums["pairs"]
    return out
