"""Offload executor: the local executor with experts served by the slot cache, a routing-path predictor driving
prefetch and eviction, and an expert-grouping batch policy for the scheduler.

At the start of a step it predicts the experts of *every* MoE layer of the step from what is known before any
layer runs (the token-identity table; a predictor without one falls back on the layer's experts of the previous
step) and starts prefetching them, nearest layer first. At each MoE layer (a ``route_hook``, called after routing
and before the experts run) it
1. tells the cache which experts this layer needs (hits are pinned, misses start loading in parallel);
2. feeds the predictor the actual routing; scores the earlier predictions for this layer;
3. refines the predictions of the next ``lookahead`` MoE layers with what is now known (the next routers on the
   current hidden state, transition statistics, the token table) and hands the cache every predicted expert of
   the layers still to run with its distance in MoE layers; the cache prefetches them nearest first without ever
   evicting an expert needed sooner than the one it loads (I/O threads, overlapping compute).

A layer's predicted set: for a single token its ``width`` best-scored experts (``width`` = top_k + 1 within the
budget's share per MoE layer, at least top_k); for several tokens the union of each token's top_k plus the ``width``
best of the summed scores. Scores are the predictor's (for "combined": router + token table, each a distribution over experts).
"""

from __future__ import annotations

import heapq

import torch

from ..runtime.executor import LocalExecutor, RequestFailed, StepItem, build_batch
from .cache import ExpertCache
from .gate import PrefetchGate

# kinds of prediction (the gate learns each one's precision apart): 0 = at the step start from the token ids,
# a >= 1 = refined a MoE layers before, NEXT_STEP = the next step's first layer from the guessed next token
NEXT_STEP = -1
from .tiers import ExpertReadError


class OffloadExecutor(LocalExecutor):
    def __init__(self, model, kv, device, cache: ExpertCache, predictor=None, prefetch: bool = True,
                 lookahead: int = 1, max_decode_batch: int | None = None, token_scheduling: bool = True,
                 max_wait_steps: int = 4, width: int | None = None, prefetch_distance: int | None = None,
                 sticky: float = 0.05, gate: PrefetchGate | None = None):
        super().__init__(model, kv, device)
        model.experts = cache
        self.cache = cache
        self.predictor = predictor
        self.prefetch = prefetch and predictor is not None
        self.lookahead = max(1, int(lookahead))
        self.moe_layers = list(model.cfg.moe_layers)
        self.pos = {l: i for i, l in enumerate(self.moe_layers)}
        self.K = model.cfg.top_k
        # default: top_k + 1 (one spare guess per layer), within the budget's share per layer; the rest of the budget
        # keeps earlier tokens' experts (measured: a wider set reads more and hits no more often)
        share = cache.num_slots // max(1, len(self.moe_layers))
        self.width = width or max(self.K, min(model.cfg.num_experts, self.K + 1, share))
        # prefetch predicted experts needed within this many MoE layers (None: every layer still to run this step;
        # farther predictions only protect what is resident from eviction)
        self.prefetch_distance = prefetch_distance
        self.sticky = sticky
        self.gate = gate            # None: read every predicted expert (no confidence gate, no byte budget)
        self.route_hooks = [self._on_route]
        self.max_decode_batch = max_decode_batch
        self.batch_policy = ExpertGroupingPolicy(self, max_wait_steps) if token_scheduling else None
        self._slot_last: dict[int, tuple] = {}           # slot → (layers, [L, B, K] routes, row) of its last token
        self._slot_set: dict[int, frozenset] = {}        # memo of experts_of (cleared when the slot runs again)
        self._routes: dict[int, torch.Tensor] = {}
        self._prev_sets: dict[int, set] = {}             # last step's experts per layer (fallback prediction)
        self._plan: dict[int, tuple] = {}                # layer → (kind, predicted experts best first) this step
        self._pending: dict[int, list] = {}              # target layer → [(kind, predicted experts best first)]
        self.pred = {}                                   # kind → [true positives, predicted, actual]
        self.pred_layer = {}                             # layer → [true positives, predicted, actual]
        self._n = 1                                      # tokens of the current forward pass
        self.counters = {"decode_steps": 0, "decode_distinct_experts": 0, "decode_tokens": 0}

    # ---- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> torch.Tensor:
        self.kv.ensure(max(it.start + len(it.token_ids) for it in items))
        ids_N, batch = build_batch(items, self.device, self.kv)
        batch.route_hooks = self.route_hooks
        self._routes = {}
        self._items = items
        if self.predictor is not None:
            self.predictor.begin(ids_N)
        if self.gate is not None:
            self.gate.step_break()
        if self.prefetch:
            self._plan_step()
        try:
            logits = self.model(ids_N, batch)
        except ExpertReadError as e:
            raise RequestFailed(self._affected(e.layer, e.expert), str(e)) from None
        finally:
            self.cache.end_step()
        self._after_step(items)
        if self.prefetch and logits.shape[0]:
            self._prefetch_next(logits)
        return logits

    def _row_owner(self) -> list[str]:
        owner = []
        for it in self._items:
            owner.extend([it.request_id] * len(it.token_ids))
        return owner

    def _affected(self, layer: int, expert: int) -> list[str]:
        ids = self._routes.get(layer)
        owner = self._row_owner()
        if ids is None:
            return sorted(set(owner))
        rows = (ids == expert).any(-1).nonzero().flatten().tolist()
        return sorted({owner[r] for r in rows}) or sorted(set(owner))

    def _after_step(self, items):
        """Remember each sequence's last-token routing (for the batch policy, materialised only when asked) and
        count distinct experts per decode step: one stacked tensor per step, no per-layer Python."""
        if not self._routes:
            return
        layers = tuple(self._routes)
        R = torch.stack([self._routes[l] for l in layers])                  # [L, N, K]
        ends, n = [], 0
        for it in items:
            n += len(it.token_ids)
            ends.append(n - 1)
        last = R[:, ends]                                                    # [L, B, K]
        for i, it in enumerate(items):
            self._slot_last[it.slot] = (layers, last, i)
            self._slot_set.pop(it.slot, None)
        if n == len(items):                                                  # every item a single decode token
            s = R.reshape(len(layers), -1).sort(-1).values
            self.counters["decode_steps"] += 1
            self.counters["decode_tokens"] += len(items)
            self.counters["decode_distinct_experts"] += len(layers) + int((s[:, 1:] != s[:, :-1]).sum())

    def experts_of(self, slot: int) -> frozenset:
        """The (layer, expert) pairs the last token of the sequence in ``slot`` was routed to."""
        out = self._slot_set.get(slot)
        if out is None:
            got = self._slot_last.get(slot)
            if got is None:
                return frozenset()
            layers, last, i = got
            out = self._slot_set[slot] = frozenset(
                (l, e) for l, row in zip(layers, last[:, i].tolist()) for e in row)
        return out

    # ---- prediction → prefetch ---------------------------------------------------------------------------------
    def _set(self, t: int, s_NE: torch.Tensor) -> list[int]:
        """The predicted experts of layer ``t`` from per-token scores [N, E], best first. One token: its ``width``
        best, experts already in the cache getting a small bonus (``sticky``: a near-tie is not worth a read).
        Several: the union of each token's top_k and the ``width`` best of the summed scores, by summed score."""
        if s_NE.shape[0] == 1:                  # plain Python on 1 x E scores: cheaper than a few tiny torch ops
            v = s_NE[0].tolist()
            if self.sticky:
                for e in self.cache.present(t):
                    v[e] += self.sticky
            return heapq.nlargest(self.width, range(len(v)), key=v.__getitem__)
        tot = s_NE.sum(0)
        out = set(torch.topk(s_NE, min(self.K, s_NE.shape[-1]), dim=-1).indices.flatten().tolist())
        out.update(torch.topk(tot, min(self.width, s_NE.shape[-1])).indices.tolist())
        v = tot.tolist()
        return sorted(out, key=lambda e: -v[e])

    def _prefetch_next(self, logits: torch.Tensor):
        """Before the engine samples: guess each sequence's next token (argmax) and start loading the first MoE
        layer's predicted experts for the next decode step, which otherwise has only one attention's time to
        load them (a wrong guess costs one wasted read; the step-start plan corrects it)."""
        s = self.predictor.first_layer_scores(logits.argmax(-1))
        if s is None:
            return
        t = self.moe_layers[0]
        ranked = self._set(t, s)
        self._pending.setdefault(t, []).append((NEXT_STEP, ranked))
        load = self._loadable(NEXT_STEP, s.shape[0], ranked)
        self.cache.set_predictions({(t, e): 1 for e in ranked})
        self.cache.prefetch_predicted(self.prefetch_distance, soon=1, allowed={(t, e) for e in load},
                                      max_new=self._budget())

    def _plan_step(self):
        """Step start: a prediction for every MoE layer from the token ids (else last step's experts)."""
        self._plan = {}
        S = self.predictor.start_scores()                      # [N, L, E] or None
        if S is None:
            self._plan = {t: (0, sorted(es)) for t, es in self._prev_sets.items()}
        else:
            S = S[:, :len(self.moe_layers)]
            E = S.shape[-1]
            if S.shape[0] == 1:                                 # all layers at once
                s = S[0]
                if self.sticky:
                    have = self.cache.present_all()
                    if have:
                        s = s.clone()
                        s[[self.pos[l] for l, _ in have], [e for _, e in have]] += self.sticky
                rows = torch.topk(s, min(self.width, E), dim=-1).indices.tolist()
            else:
                tot = S.sum(0)
                top = torch.topk(S, min(self.K, E), dim=-1).indices.permute(1, 0, 2).reshape(S.shape[1], -1)
                best = torch.topk(tot, min(self.width, E), dim=-1).indices
                v = tot.tolist()
                rows = [sorted(set(r), key=lambda e, vl=vl: -vl[e])
                        for r, vl in zip(torch.cat([top, best], 1).tolist(), v)]
            for t, r in zip(self.moe_layers, rows):
                self._plan[t] = (0, r)
                self._pending.setdefault(t, []).append((0, r))
        self._push(-1)

    def _loadable(self, kind: int, n: int, ranked: list[int]) -> list[int]:
        return ranked if self.gate is None else self.gate.allowed(kind, n, ranked)

    def _budget(self) -> int | None:
        if self.gate is None:
            return None
        return self.gate.max_loads(self.cache.tier.gbps() * 1e9, self.cache.tier.expert_nbytes())

    def _push(self, li: int):
        """Hand the cache what the layers after position ``li`` are predicted to need (every guess protects from
        eviction; the gate picks the ones worth a read), then prefetch (at the step start, ``li=-1``, the first
        layer's loads are needed soonest: the reader is woken for them)."""
        pos, n = self.pos, len(self._items) if li < 0 else self._n
        pred, allowed = {}, set()
        for t, (kind, ranked) in self._plan.items():
            d = pos[t] - li
            if d <= 0:
                continue
            for e in ranked:
                pred[(t, e)] = d
            if self.prefetch_distance is None or d <= self.prefetch_distance:
                allowed.update((t, e) for e in self._loadable(kind, n, ranked))
        self.cache.set_predictions(pred)
        self.cache.prefetch_predicted(self.prefetch_distance, soon=1 if li < 0 else 0, allowed=allowed,
                                      max_new=self._budget())

    # ---- the route hook ----------------------------------------------------------------------------------------
    def _on_route(self, layer, x_ND, ids_NK, w_NK):
        ids = ids_NK.detach().cpu()
        self._routes[layer] = ids
        self._n = ids.shape[0]
        actual = sorted(set(ids.flatten().tolist()))
        self.cache.begin_layer(layer, actual)
        if self.gate is not None:
            self.gate.layer_tick(self.cache.counters["stall_seconds"])
        aset = set(actual)
        for kind, p in self._pending.pop(layer, []):
            s = self.pred.setdefault(kind, [0, 0, 0])
            s[0] += len(aset.intersection(p))
            s[1] += len(p)
            s[2] += len(aset)
            ls = self.pred_layer.setdefault(layer, [0, 0, 0])
            ls[0] += len(aset.intersection(p))
            ls[1] += len(p)
            ls[2] += len(aset)
            if self.gate is not None:
                self.gate.record(kind, self._n, p, aset)
        self._prev_sets[layer] = aset
        if self.predictor is None:
            return
        self.predictor.observe(layer, x_ND, ids_NK)
        if not self.prefetch:
            return
        li = self.pos[layer]
        for a in range(1, self.lookahead + 1):
            if li + a >= len(self.moe_layers):
                break
            t = self.moe_layers[li + a]
            s = self.predictor.scores_for(t, layer)
            if s is not None:
                self._plan[t] = (a, self._set(t, s))
                self._pending.setdefault(t, []).append(self._plan[t])
        self._push(li)

    # ---- engine interface --------------------------------------------------------------------------------------
    def free(self, slot: int):
        self._slot_last.pop(slot, None)
        self._slot_set.pop(slot, None)

    def stats(self) -> dict:
        d = self.cache.stats()
        d.update(self.counters)
        if self.counters["decode_steps"]:
            d["distinct_experts_per_decode_step"] = round(
                self.counters["decode_distinct_experts"] / self.counters["decode_steps"], 3)
        req = d["expert_hits"] + d["expert_misses"]
        d["hit_rate"] = round(d["expert_hits"] / req, 4) if req else None
        for a, (tp, np_, nt) in sorted(self.pred.items()):
            name = {0: "step_start", NEXT_STEP: "next_step_first_layer"}.get(a, f"ahead{a}")
            d[f"pred_precision_{name}"] = round(tp / np_, 4) if np_ else None
            d[f"pred_recall_{name}"] = round(tp / nt, 4) if nt else None
        layers = sorted(self.pred_layer)
        d["pred_precision_per_layer"] = [round(self.pred_layer[l][0] / max(1, self.pred_layer[l][1]), 4)
                                         for l in layers]
        d["pred_recall_per_layer"] = [round(self.pred_layer[l][0] / max(1, self.pred_layer[l][2]), 4) for l in layers]
        if self.gate is not None:
            d.update(self.gate.stats())
        return d

    def close(self):
        self.cache.close()


class ExpertGroupingPolicy:
    """Token scheduling: when more sequences run than one decode batch holds, pick a batch whose (predicted)
    experts overlap. A sequence's next experts are predicted by those its last token used. Bounded waiting:
    a sequence left out ``max_wait_steps`` batches in a row is taken first."""

    def __init__(self, executor: OffloadExecutor, max_wait_steps: int = 4):
        self.ex, self.max_wait = executor, max(1, max_wait_steps)

    def __call__(self, running, limit):
        now = max(s.last_scheduled for s in running) + 1
        order = sorted(running, key=lambda s: s.last_scheduled)     # longest-waiting first
        pick = [s for s in order if now - s.last_scheduled > self.max_wait][:limit]
        if not pick:
            pick = [order[0]]
        union = set().union(*(self.ex.experts_of(s.slot) for s in pick))
        rest = [s for s in order if s not in pick]
        while len(pick) < limit and rest:
            best = min(rest, key=lambda s: (len(self.ex.experts_of(s.slot) - union),
                                            s.last_scheduled))
            rest.remove(best)
            pick.append(best)
            union |= self.ex.experts_of(best.slot)
        return pick
