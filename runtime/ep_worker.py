"""One expert-parallel worker: a shard of the experts, all dense weights, and the KV cache of its sequences.

A plain class (no Ray): the Ray actor in ``moeyard.cluster.actor`` only forwards to it, and tests run several in
threads over a gloo group. All workers of a group call ``step`` for the same step (each with its own items, maybe
none); inside, they run the layers in lockstep and meet at every MoE layer's all-to-all.

Attention is data-parallel: a sequence has a home worker (its items are sent there), which embeds its tokens and
samples from its logits.

Schemes
  standard  the model's own forward with an all-to-all dispatcher: token rows visit their experts' workers and
            come back home at every MoE layer.
  tp        tensor-parallel attention (``runtime.ep_tp``): every worker holds every token and a share of the heads;
            with ``shuffle`` (speculative shuffling form 2) each token's head outputs go only to the worker its
            experts are predicted on.
  coherent  ExFlow's context-coherent EP: after a MoE layer a token stays on the worker of its first-choice
            expert (its residual stream moves there, other experts' weighted outputs are sent there) and its next
            attention runs there. Every worker keeps every sequence's KV cache: each layer's new K/V entries are
            all-gathered. Final hidden states of sampled rows return home for the LM head.

Shapes: R tokens resident on this worker, D hidden, H/Hkv heads, Dh head dim, K top-k, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.a2a import A2ADispatcher, Exchanger, dest_table, make_group
from ..moe.checkpoint import CheckpointReader
from ..moe.config import MoEConfig
from ..moe.compute import pack_dense
from ..moe.experts import ResidentExperts, run_experts
from ..moe.loader import build_dense, compute_plan, resolve_dtype
from .executor import StepItem, build_batch
from .modes import new_kv_cache

SCHEMES = ("standard", "coherent", "tp")
COHERENT_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def check_scheme(scheme: str, cfg: MoEConfig):
    """The coherent scheme re-implements plain (GQA) attention and the softmax-top-k MoE block."""
    if scheme not in SCHEMES:
        raise ValueError(f"ep_scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme in ("coherent", "tp") and (cfg.model_type not in COHERENT_TYPES
                                         or getattr(cfg, "attention_kind", "mha") != "mha"):
        raise ValueError(f"ep_scheme={scheme!r} supports {', '.join(COHERENT_TYPES)} (plain attention, softmax "
                         f"top-k routing); this model is {cfg.model_type!r}: use ep_scheme='standard'")


def attend_cached(kv, li: int, q, tab, sdpa, device):
    """Attention of the step's tokens ``q`` [R, h, Dh] against layer ``li`` of ``kv`` (their own K/V already
    written). ``tab``: slot, pos columns (CPU). One token per sequence: one batched call, as local decode; else per
    sequence, causal when it is a whole prompt. ``sdpa(q, k, v, mask=None, causal=False)``: the attention kernel."""
    slots, pos = tab[:, 0], tab[:, 1]
    if len(torch.unique(slots)) == len(slots):
        T = int(pos.max()) + 1
        K, V = kv.read(li, slots.to(device), T)
        mask = (torch.arange(T)[None, :] <= pos[:, None])[:, None, None, :].to(device)
        return sdpa(q.unsqueeze(2), K.transpose(1, 2), V.transpose(1, 2), mask=mask).squeeze(2)
    o = torch.empty_like(q)
    for s in torch.unique(slots).tolist():
        idx = (slots == s).nonzero().squeeze(1)
        p = pos[idx]
        T = int(p.max()) + 1
        K, V = kv.read_one(li, s, T)
        qq = q[idx.to(device)].transpose(0, 1).unsqueeze(0)
        KK, VV = K.transpose(0, 1).unsqueeze(0), V.transpose(0, 1).unsqueeze(0)
        if len(idx) == T and bool((p == torch.arange(T)).all()):
            oo = sdpa(qq, KK, VV, causal=True)
        else:
            oo = sdpa(qq, KK, VV, mask=(torch.arange(T)[None, :] <= p[:, None])[None, None].to(device))
        o[idx.to(device)] = oo[0].transpose(0, 1)
    return o


@dataclass(frozen=True)
class WorkItem:
    """A StepItem plus ``key``: global index of its first token in the step's flattened batch."""
    slot: int
    token_ids: list
    start: int
    sample: bool
    key: int


class EPWorker:
    def __init__(self, path: str, rank: int, world: int, holders: list[list[tuple[int, ...]]],
                 scheme: str = "standard", dtype=None, device="cpu", max_num_seqs: int = 64,
                 max_model_len: int = 2048, shuffle: bool = False, shuffle_options: dict | None = None,
                 quantization: str | None = None):
        self.rank, self.world, self.scheme, self.holders = rank, world, scheme, holders
        self.device = torch.device(device)
        self.cfg = cfg = MoEConfig.from_dir(path)
        check_scheme(scheme, cfg)
        self.moe_layers = list(cfg.moe_layers)
        if len(holders) != len(self.moe_layers):
            raise ValueError(f"placement has {len(holders)} layers, the model {len(self.moe_layers)} MoE layers")
        self.layer_index = {l: i for i, l in enumerate(self.moe_layers)}
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        reader = CheckpointReader(path)
        self.model = build_dense(cfg, reader, self.dtype, self.device, max_model_len)
        # weight-only quantization (moe/compute.py): routed experts always; dense layers unless heads are split
        # across workers (ep_scheme="tp" slices the projection matrices)
        self.plan = compute_plan(cfg, self.dtype, self.device, quantization) if quantization else None
        if self.plan is not None and scheme != "tp":
            pack_dense(self.model, self.plan)
        only = {l: [e for e, ws in enumerate(holders[i]) if rank in ws] for i, l in enumerate(self.moe_layers)}
        self.local_experts = only
        self.model.experts = ResidentExperts(cfg, reader, self.dtype, self.device, only=only,
                                             pack=self.plan.experts if self.plan is not None else None)
        from ..moe.loader import check_experts_finite
        check_experts_finite(cfg, self.model.experts)
        self.tp = None
        if scheme == "tp":
            from .ep_tp import TPHeads, TPRunner, tp_kv_cache
            self.tp_heads = [TPHeads(layer.self_attn, rank, world) for layer in self.model.model.layers]
            self.kv = tp_kv_cache(cfg, self.tp_heads, max_num_seqs, max_model_len, self.dtype, self.device)
            self.tp = TPRunner(self, shuffle, **(shuffle_options or {}))
        else:
            if shuffle:
                raise ValueError("worker-side shuffling (form 2) needs ep_scheme='tp'")
            self.kv = new_kv_cache(cfg, max_num_seqs, max_model_len, self.dtype, self.device)
        self.ex: Exchanger | None = None
        self.steps = 0
        self.recording: dict[int, list] | None = None   # layer -> [ids_NK] while calibrating (standard scheme)
        self.capture_routing = False      # speculative shuffling: keep the step's routing in ``last_routing``
        self.last_routing = None          # int16 [N, L_moe, K] of this worker's tokens in the last step

    # -- group ---------------------------------------------------------------------------------------------------
    def connect(self, init_method: str, backend: str | None = None, timeout_s: float = 30.0):
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        pg = make_group(init_method, self.rank, self.world, backend, timeout_s)
        self.ex = Exchanger(pg, self.rank, self.world, timeout_s, self.device)
        self.model.dispatcher = A2ADispatcher(self.ex, self.holders, self.layer_index)
        self.dest = dest_table(self.holders, self.rank, self.world)
        E = self.cfg.num_experts
        self.hold_LEG = []
        for row in self.holders:
            m = torch.zeros(E, self.world, dtype=torch.bool)
            for e, ws in enumerate(row):
                m[e, list(ws)] = True
            self.hold_LEG.append(m)
        return True

    def stats(self) -> dict:
        d = self.ex.stats() if self.ex else {}
        d["steps"] = self.steps
        if self.tp is not None:
            d.update(self.tp.stats())
        return d

    def expert_bytes(self) -> int:
        return self.model.experts.nbytes

    # -- one step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, items: list[WorkItem], max_len: int, moves: list | None = None) -> torch.Tensor:
        """Run one step for this worker's items (maybe none); returns logits [B_sample, V] of its sampled items
        in item order. ``moves`` (speculative shuffling; the same list on every worker): sequences
        ``(slot, src, dst, T)`` whose first T KV entries move from worker src to dst before the step."""
        if self.ex is None:
            raise RuntimeError("EPWorker.step before connect()")
        self.kv.ensure(max_len)
        self.steps += 1
        if moves:
            self.move_kv(moves)
        if self.scheme == "coherent":
            return self._coherent(items)
        if self.scheme == "tp":
            return self._tp(items)
        L, K = len(self.moe_layers), self.cfg.top_k
        if not items:
            self._idle_standard()
            if self.capture_routing:
                self.last_routing = torch.empty((0, L, K), dtype=torch.int16)
            return torch.empty((0, self.cfg.vocab_size))
        ids_N, batch = build_batch([StepItem(it.slot, list(it.token_ids), it.start, it.sample) for it in items],
                                   self.device, self.kv)
        hooks, cap = [], {}
        if self.recording is not None:
            hooks.append(lambda layer, x, ids, w: self.recording.setdefault(layer, []).append(ids.cpu()))
        if self.capture_routing:
            hooks.append(lambda layer, x, ids, w: cap.__setitem__(layer, ids.cpu()))
        if hooks:
            batch.route_hooks = hooks
        out = self.model(ids_N, batch).cpu()
        if self.capture_routing:
            self.last_routing = torch.stack([cap[l] for l in self.moe_layers], 1).to(torch.int16)
        return out

    def move_kv(self, moves: list):
        """Speculative shuffling: move whole sequences' KV caches between workers (one exchange, counted as
        ``shuffle`` bytes). Every worker calls this with the same ``moves``; rows of a sequence to itself are
        not moved."""
        kv, dev = self.kv, self.device
        rows, meta, dest = [], [], []
        for slot, src, dst, T in moves:
            if src != self.rank or dst == src or T <= 0:
                continue
            k, v = kv.export(slot, T)                                    # [L, T, Hkv, Dh], [L, T, Hv, Dv]
            rows.append(torch.cat([k.transpose(0, 1).reshape(T, -1), v.transpose(0, 1).reshape(T, -1)], 1))
            meta.append(torch.stack([torch.full((T,), slot, dtype=torch.long), torch.arange(T)], 1))
            dest.append(torch.full((T,), dst, dtype=torch.long))
        wk, wv = kv.L * kv.Hkv * kv.Dh, kv.L * kv.Hv * kv.Dv
        if rows:
            rows_t, meta_t, dest_t = torch.cat(rows), torch.cat(meta), torch.cat(dest)
        else:
            rows_t = torch.empty((0, wk + wv), dtype=kv.dtype, device=dev)
            meta_t, dest_t = torch.empty((0, 2), dtype=torch.long), torch.empty(0, dtype=torch.long)
        (got, gmeta), _ = self.ex.exchange(dest_t, [rows_t, meta_t], ["shuffle", "shuffle"])
        if got.shape[0]:
            need = int(gmeta[:, 1].max()) + 1
            kv.ensure(need)
            n = got.shape[0]
            k = got[:, :wk].reshape(n, kv.L, kv.Hkv, kv.Dh)
            v = got[:, wk:].reshape(n, kv.L, kv.Hv, kv.Dv)
            s_, p_ = gmeta[:, 0].to(dev), gmeta[:, 1].to(dev)
            for l in range(kv.L):
                kv.k[l][s_, p_] = k[:, l]
                kv.v[l][s_, p_] = v[:, l]

    def start_recording(self):
        self.recording = {}

    def take_trace(self):
        """Routing of this worker's tokens since ``start_recording``: int64 [T, L_moe, K] (numpy)."""
        rec, self.recording = self.recording or {}, None
        if not rec:
            return None
        return torch.stack([torch.cat(rec[l]) for l in self.moe_layers], 1).numpy()

    def _idle_standard(self):
        D, K = self.cfg.hidden_size, self.cfg.top_k
        x = torch.empty((0, D), dtype=self.dtype, device=self.device)
        ids = torch.empty((0, K), dtype=torch.long, device=self.device)
        w = torch.empty((0, K), dtype=self.dtype, device=self.device)
        disp = self.model.dispatcher
        for l in self.moe_layers:
            routed = disp.dispatch(l, x, ids, w)
            y = run_experts(l, routed.x_MD, routed.expert_ids, routed.counts, self.model.experts)
            disp.combine(y, routed.meta)

    # -- context-coherent scheme ---------------------------------------------------------------------------------
    def _flatten(self, items: list[WorkItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N] and the token table [N, 5] (CPU, long): slot, pos, key, home (this worker), sample."""
        ids, slot, pos, key, samp = [], [], [], [], []
        for it in items:
            n = len(it.token_ids)
            ids.extend(it.token_ids)
            slot.extend([it.slot] * n)
            pos.extend(range(it.start, it.start + n))
            key.extend(range(it.key, it.key + n))
            samp.extend([False] * (n - 1) + [bool(it.sample)])
        L = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        tab = torch.stack([L(slot), L(pos), L(key), torch.full((len(ids),), self.rank, dtype=torch.long),
                           L(samp)], 1) if ids else torch.empty((0, 5), dtype=torch.long)
        return L(ids), tab

    def _tp(self, items: list[WorkItem]) -> torch.Tensor:
        """Tensor-parallel attention: every worker runs every item; sampled row i's logits come from worker
        i % G (see ``partition_tp``)."""
        ids, tab = self._flatten(items)
        if not len(ids):
            return torch.empty((0, self.cfg.vocab_size))
        h = self.tp.forward(ids, tab)
        rows = tab[:, 4].nonzero().squeeze(1)
        rows = rows[self.rank::self.world]
        return self.model.lm_head(h[rows.to(self.device)]).float().cpu()

    def _coherent(self, items: list[WorkItem]) -> torch.Tensor:
        m, dev = self.model, self.device
        ids, tab = self._flatten(items)
        x = m.model.embed_tokens(ids.to(dev))
        for li, layer in enumerate(m.model.layers):
            x = self._attention_block(li, layer, x, tab)
            h = layer.post_attention_layernorm(x)
            if not layer.is_moe:
                x = x + layer.mlp(h)
                continue
            x, tab = self._coherent_moe(li, layer.mlp, x, h, tab)
        x = m.model.norm(x)
        sel = tab[:, 4].bool()
        (hx, hk), _ = self.ex.exchange(tab[sel, 3], [x[sel.to(dev)], tab[sel, 2]], ["hidden", "meta"])
        hx = hx[torch.argsort(hk)]
        return m.lm_head(hx).float().cpu()

    def _attention_block(self, li, layer, x, tab):
        attn = layer.self_attn
        R = x.shape[0]
        H, Hkv, Dh = attn.H, attn.Hkv, attn.Dh
        if R:
            q, k, v = attn.qkv(layer.input_layernorm(x), tab[:, 1].to(self.device), self.model.rotary)
        else:
            k = v = x.new_empty((0, Hkv, Dh))
        # replicate the new K/V entries on every worker
        others = [g for g in range(self.world) if g != self.rank]
        kvrow = torch.cat([k.reshape(R, Hkv * Dh), v.reshape(R, Hkv * Dh)], 1)
        dest = torch.tensor(others, dtype=torch.long).repeat_interleave(R)
        (rkv, rmeta), _ = self.ex.exchange(dest, [kvrow.repeat(len(others), 1), tab[:, :2].repeat(len(others), 1)],
                                           ["kv", "kv"])
        all_kv = torch.cat([kvrow, rkv])
        all_meta = torch.cat([tab[:, :2], rmeta]).to(self.device)
        if all_kv.shape[0]:
            kk, vv = all_kv.split(Hkv * Dh, dim=1)
            self.kv.write(li, all_meta[:, 0], all_meta[:, 1], kk.view(-1, Hkv, Dh), vv.view(-1, Hkv, Dh))
        if not R:
            return x
        o = attend_cached(self.kv, li, q, tab, attn._sdpa, self.device)
        return x + attn.o_proj(o.reshape(R, H * Dh))

    def _coherent_moe(self, li, block, x, h, tab):
        dev, rank = self.device, self.rank
        pl = self.layer_index[li]
        hold = self.hold_LEG[pl]
        R, K, D = x.shape[0], self.cfg.top_k, x.shape[1]
        if R:
            _, ids_NK, w_NK = block.gate(h)
            ids_NK = ids_NK.cpu()
        else:
            ids_NK = torch.empty((0, K), dtype=torch.long)
            w_NK = x.new_empty((0, K))
        # where each token goes next: the worker of its first-choice expert (itself if it holds a copy)
        newloc = self.dest[pl][ids_NK[:, 0]] if R else torch.empty(0, dtype=torch.long)
        e_M = ids_NK.reshape(-1)
        nl_M = newloc.repeat_interleave(K)
        first = hold[e_M].long().argmax(1) if R else torch.empty(0, dtype=torch.long)
        dest_M = torch.where(hold[e_M, nl_M] if R else torch.empty(0, dtype=torch.bool), nl_M,
                             torch.where(hold[e_M, rank] if R else torch.empty(0, dtype=torch.bool),
                                         torch.full_like(nl_M, rank), first))
        self.ex.local_assign += int((dest_M == rank).sum())
        self.ex.total_assign += int(dest_M.numel())
        tok_M = torch.arange(R).repeat_interleave(K)
        choice0 = (torch.arange(R * K) % K == 0).long()
        meta_M = torch.stack([e_M, tab[tok_M, 2], nl_M, choice0], 1) if R else torch.empty((0, 4), dtype=torch.long)
        rows = torch.cat([h[tok_M.to(dev)], w_NK.reshape(-1, 1)], 1)
        (rrows, rmeta), _ = self.ex.exchange(dest_M, [rows, meta_M], ["moe", "moe"])
        # tokens move to their new location with their residual stream
        (mx, mtab), _ = self.ex.exchange(newloc, [x, tab], ["hidden", "meta"])
        # experts of this worker
        perm = torch.argsort(rmeta[:, 0], stable=True)
        e_sorted = rmeta[perm, 0]
        uids, counts = torch.unique_consecutive(e_sorted, return_counts=True)
        xr, wr = rrows[:, :D], rrows[:, D:]
        y = run_experts(li, xr[perm.to(dev)], uids.tolist(), counts.tolist(), self.model.experts)
        y_R = torch.empty_like(y)
        y_R[perm.to(dev)] = y
        y_R = y_R * wr
        # h of the tokens that now live here came with their first-choice row
        c0 = rmeta[:, 3].bool()
        h_keys, h_rows = rmeta[c0, 1], xr[c0.to(dev)]
        (ry, rk), _ = self.ex.exchange(rmeta[:, 2], [y_R, rmeta[:, [1, 0]]], ["moe", "meta"])
        # assemble the resident tokens (ordered by key)
        order = torch.argsort(mtab[:, 2])
        mtab, mx = mtab[order], mx[order.to(dev)]
        keys = mtab[:, 2]
        Rn = keys.numel()
        out = mx.new_zeros((Rn, D))
        if ry.shape[0]:
            eo = torch.argsort(rk[:, 1], stable=True)        # add expert outputs in expert order, as local mode
            ry, rk = ry[eo.to(dev)], rk[eo]
            out = out.index_add(0, torch.searchsorted(keys.contiguous(), rk[:, 0].contiguous()).to(dev), ry)
        if block.shared_expert is not None and Rn:
            hn = h_rows[torch.argsort(h_keys).to(dev)]
            out = out + torch.sigmoid(block.shared_expert_gate(hn)) * block.shared_expert(hn)
        return mx + out, mtab


# -- driver side: split a step between workers, merge the logits ------------------------------------------------
def home_of(slot: int, world: int) -> int:
    """A sequence's home worker (data-parallel attention): its KV slot modulo the worker count."""
    return slot % world


def partition(items: list[StepItem], world: int, home: dict | None = None
              ) -> tuple[list[list[WorkItem]], list[tuple[int, int]], int]:
    """Per-worker item lists, where each sampled item's logits row comes from ((worker, row)), and the longest
    sequence length of the step. ``home``: slot -> worker overrides (speculative shuffling)."""
    plans: list[list[WorkItem]] = [[] for _ in range(world)]
    where, rows, key, max_len = [], [0] * world, 0, 0
    for it in items:
        g = home[it.slot] if home is not None and it.slot in home else home_of(it.slot, world)
        plans[g].append(WorkItem(it.slot, list(it.token_ids), it.start, it.sample, key))
        key += len(it.token_ids)
        max_len = max(max_len, it.start + len(it.token_ids))
        if it.sample:
            where.append((g, rows[g]))
            rows[g] += 1
    return plans, where, max_len


def partition_tp(items: list[StepItem], world: int) -> tuple[list[list[WorkItem]], list[tuple[int, int]], int]:
    """Tensor-parallel attention: every worker gets every item; sampled row i's logits come from worker i % G."""
    plan, where, key, max_len, i = [], [], 0, 0, 0
    for it in items:
        plan.append(WorkItem(it.slot, list(it.token_ids), it.start, it.sample, key))
        key += len(it.token_ids)
        max_len = max(max_len, it.start + len(it.token_ids))
        if it.sample:
            where.append((i % world, i // world))
            i += 1
    return [plan] * world, where, max_len


def merge_logits(outs: list[torch.Tensor], where: list[tuple[int, int]]) -> torch.Tensor:
    if not where:
        V = outs[0].shape[-1]
        return torch.empty((0, V))
    return torch.stack([outs[g][r] for g, r in where])


def sum_stats(per_worker: list[dict]) -> dict:
    """Executor counters from the workers' cumulative counters."""
    d: dict = {}
    for s in per_worker:
        for k, v in s.items():
            if k != "steps":
                d[k] = d.get(k, 0) + v
    tot = d.pop("total_assignments", 0)
    loc = d.pop("local_assignments", 0)
    d["local_fraction"] = loc / tot if tot else 0.0
    d["routed_assignments"] = tot
    tp_keys = [k for k in d if k.startswith("tp_") and "_l" in k and k.rsplit("_l", 1)[1].isdigit()]
    if tp_keys:                                     # tensor-parallel scheme: form-2 prediction accuracy
        from .ep_tp import tp_spec_stats
        n = sum(1 for k in tp_keys if k.startswith("tp_tokens_l"))
        if any(d[f"tp_tokens_l{i}"] for i in range(n)):
            d.update(tp_spec_stats(d, n))
        for k in tp_keys:
            del d[k]
    return d



def run_in_threads(fns, timeout: float | None = None) -> list:
    """Call every ``fns[i]()`` in its own thread (ranks of one process group); results in order, first error raised."""
    import threading
    res, errs = [None] * len(fns), []

    def run(i):
        try:
            res[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 — re-raised below in the caller's thread
            errs.append(e)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    if errs:
        raise errs[0]
    return res


class ThreadEPExecutor:
    """Workers in threads of this process over a gloo FileStore group (tests, debugging; no Ray)."""

    def __init__(self, path: str, holders, world: int, scheme: str = "standard", max_num_seqs: int = 8,
                 max_model_len: int = 256, dtype=None, timeout_s: float = 30.0, speculative_shuffle: bool = False,
                 trace: dict | None = None, tokenizer=None, shuffle_options: dict | None = None):
        import tempfile
        import threading
        self.world = world
        self.spec = None
        self.scheme = scheme
        worker_shuffle = speculative_shuffle and scheme == "tp"     # form 2 runs inside the workers
        if speculative_shuffle:
            from .spec_shuffle import SpecShuffler, check_spec
            cfg = MoEConfig.from_dir(path)
            check_spec(scheme, world, cfg)
        self.workers = [EPWorker(path, g, world, holders, scheme, dtype, "cpu", max_num_seqs, max_model_len,
                                 shuffle=worker_shuffle, shuffle_options=shuffle_options if worker_shuffle else None)
                        for g in range(world)]
        fd, f = tempfile.mkstemp(prefix="moeyard_ep_")
        import os
        os.close(fd)
        os.unlink(f)
        run_in_threads([lambda w=w: w.connect(f"file://{f}", "gloo", timeout_s) for w in self.workers])
        self.route_hooks = []
        self._threading = threading
        if speculative_shuffle and not worker_shuffle:
            for w in self.workers:
                w.capture_routing = True
            self.spec = SpecShuffler(cfg, holders, world, self.workers[0].dtype, **(shuffle_options or {}))
            self.spec.load_table(trace, self._spec_step, tokenizer, max_num_seqs, max_model_len)

    def execute(self, items: list[StepItem]) -> torch.Tensor:
        if self.spec is not None:
            return self.spec.execute(items, self._spec_step)
        plans, where, max_len = (partition_tp if self.scheme == "tp" else partition)(items, self.world)
        outs = run_in_threads([lambda w=w, p=p: w.step(p, max_len) for w, p in zip(self.workers, plans)])
        return merge_logits(outs, where)

    def _spec_step(self, plans, max_len, moves):
        """One step of every worker with KV moves; returns (logits, routing) per worker."""
        outs = run_in_threads([lambda w=w, p=p: w.step(p, max_len, moves) for w, p in zip(self.workers, plans)])
        return outs, [w.last_routing for w in self.workers]

    def free(self, slot: int):
        if self.spec is not None:
            self.spec.free(slot)

    def stats(self) -> dict:
        d = sum_stats([w.stats() for w in self.workers])
        if self.spec is not None:
            d.update(self.spec.stats())
        return d

    def close(self):
        pass
