"""Offload executor: the local executor with experts served by the slot cache, a routing-path predictor driving
prefetch and eviction, and an expert-grouping batch policy for the scheduler.

At each MoE layer (a ``route_hook``, called after routing and before the experts run) it
1. tells the cache which experts this layer needs (hits are pinned, misses start loading in parallel);
2. feeds the predictor the actual routing; scores the earlier predictions for this layer;
3. asks for predictions ``1..lookahead`` MoE layers ahead and prefetches them (I/O threads, overlapping the
   compute of this layer); the union of predictions steers eviction. Past the last layer it predicts the first
   layers of the next step from this step's routing there (temporal locality).
"""

from __future__ import annotations

import torch

from ..runtime.executor import LocalExecutor, RequestFailed, StepItem, build_batch
from .cache import ExpertCache
from .tiers import ExpertReadError


class OffloadExecutor(LocalExecutor):
    def __init__(self, model, kv, device, cache: ExpertCache, predictor=None, prefetch: bool = True,
                 lookahead: int = 1, max_decode_batch: int | None = None, token_scheduling: bool = True,
                 max_wait_steps: int = 4):
        super().__init__(model, kv, device)
        model.experts = cache
        self.cache = cache
        self.predictor = predictor
        self.prefetch = prefetch and predictor is not None
        self.lookahead = max(1, int(lookahead))
        self.moe_layers = list(model.cfg.moe_layers)
        self.pos = {l: i for i, l in enumerate(self.moe_layers)}
        self.route_hooks = [self._on_route]
        self.max_decode_batch = max_decode_batch
        self.batch_policy = ExpertGroupingPolicy(self, max_wait_steps) if token_scheduling else None
        self.slot_experts: dict[int, frozenset] = {}     # slot → (layer, expert) its last token used
        self._routes: dict[int, torch.Tensor] = {}
        self._prev_sets: dict[int, set] = {}             # last step's experts per layer (wrap-around prediction)
        self._pending: dict[int, list] = {}              # target layer → [(ahead, predicted set)]
        self.pred = {}                                   # ahead → [true positives, predicted, actual]
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
        try:
            logits = self.model(ids_N, batch)
        except ExpertReadError as e:
            raise RequestFailed(self._affected(e.layer, e.expert), str(e)) from None
        finally:
            self.cache.end_step()
        self._after_step(items)
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
        ends, n = [], 0
        for it in items:
            n += len(it.token_ids)
            ends.append(n - 1)
        per_layer = {l: ids[ends].tolist() for l, ids in self._routes.items()}
        for i, it in enumerate(items):
            self.slot_experts[it.slot] = frozenset((l, e) for l, rows in per_layer.items() for e in rows[i])
        if all(len(it.token_ids) == 1 for it in items):
            self.counters["decode_steps"] += 1
            self.counters["decode_tokens"] += len(items)
            self.counters["decode_distinct_experts"] += sum(len(set(ids.flatten().tolist()))
                                                             for ids in self._routes.values())

    # ---- the route hook ----------------------------------------------------------------------------------------
    def _on_route(self, layer, x_ND, ids_NK, w_NK):
        ids = ids_NK.detach().cpu()
        self._routes[layer] = ids
        actual = sorted(set(ids.flatten().tolist()))
        self.cache.begin_layer(layer, actual)
        aset = set(actual)
        for ahead, p in self._pending.pop(layer, []):
            s = self.pred.setdefault(ahead, [0, 0, 0])
            s[0] += len(p & aset)
            s[1] += len(p)
            s[2] += len(aset)
        self._prev_sets[layer] = aset
        if self.predictor is None:
            return
        self.predictor.observe(layer, x_ND, ids_NK)
        if not self.prefetch:
            return
        li = self.pos[layer]
        predicted: dict[tuple[int, int], int] = {}
        for a in range(1, self.lookahead + 1):
            if li + a < len(self.moe_layers):
                t = self.moe_layers[li + a]
                pid, _ = self.predictor.predict(layer, a)
                pset = set(pid.flatten().tolist())
                self._pending.setdefault(t, []).append((a, pset))
            else:                                 # next step's first layers: what they used this step
                t = self.moe_layers[(li + a) % len(self.moe_layers)]
                pset = self._prev_sets.get(t, set())
            for e in pset:
                predicted.setdefault((t, e), a)
        self.cache.set_predictions(predicted)
        for a in range(1, self.lookahead + 1):
            t = self.moe_layers[(li + a) % len(self.moe_layers)]
            self.cache.prefetch(t, sorted(e for (l, e), d in predicted.items() if l == t), priority=a)

    # ---- engine interface --------------------------------------------------------------------------------------
    def free(self, slot: int):
        self.slot_experts.pop(slot, None)

    def stats(self) -> dict:
        d = self.cache.stats()
        d.update(self.counters)
        if self.counters["decode_steps"]:
            d["distinct_experts_per_decode_step"] = round(
                self.counters["decode_distinct_experts"] / self.counters["decode_steps"], 3)
        req = d["expert_hits"] + d["expert_misses"]
        d["hit_rate"] = round(d["expert_hits"] / req, 4) if req else None
        for a, (tp, np_, nt) in sorted(self.pred.items()):
            d[f"pred_precision_ahead{a}"] = round(tp / np_, 4) if np_ else None
            d[f"pred_recall_ahead{a}"] = round(tp / nt, 4) if nt else None
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
        union = set().union(*(self.ex.slot_experts.get(s.slot, frozenset()) for s in pick))
        rest = [s for s in order if s not in pick]
        while len(pick) < limit and rest:
            best = min(rest, key=lambda s: (len(self.ex.slot_experts.get(s.slot, frozenset()) - union),
                                            s.last_scheduled))
            rest.remove(best)
            pick.append(best)
            union |= self.ex.slot_experts.get(best.slot, frozenset())
        return pick
