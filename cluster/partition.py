"""Driver side of a step: split the engine's items between workers, merge the logits, sum the counters."""

from __future__ import annotations

import torch

from ..comm.tp import spec_stats
from ..runtime.executor import StepItem
from .worker import WorkItem


def home_of(slot: int, world: int) -> int:
    """A sequence's home worker (data-parallel attention): its KV slot modulo the worker count."""
    return slot % world


def partition(items: list[StepItem], world: int, home: dict | None = None, everyone: bool = False
              ) -> tuple[list[list[WorkItem]], list[tuple[int, int]], int]:
    """Per-worker item lists, where each sampled item's logits row comes from ((worker, row)), and the longest
    sequence length of the step. An item runs on its sequence's home (``home``: slot -> worker overrides, from
    speculative shuffling), or with ``everyone`` on every worker (tensor-parallel attention; sampled row i's logits
    from worker i % G)."""
    plans: list[list[WorkItem]] = [[] for _ in range(world)]
    where, rows, key, max_len = [], [0] * world, 0, 0
    for it in items:
        g = 0 if everyone else (home or {}).get(it.slot, home_of(it.slot, world))
        plans[g].append(WorkItem(it.slot, list(it.token_ids), it.start, it.sample, key))
        key += len(it.token_ids)
        max_len = max(max_len, it.start + len(it.token_ids))
        if it.sample:
            g = len(where) % world if everyone else g
            where.append((g, rows[g]))
            rows[g] += 1
    return ([plans[0]] * world if everyone else plans), where, max_len


def merge_logits(outs: list[torch.Tensor], where: list[tuple[int, int]]) -> torch.Tensor:
    if not where:
        return torch.empty((0, outs[0].shape[-1]))
    return torch.stack([outs[g][r] for g, r in where])


def sum_stats(per_worker: list[dict]) -> dict:
    """Executor counters from the workers' cumulative counters (per-layer counters are lists, summed
    elementwise)."""
    d: dict = {}
    for s in per_worker:
        for k, v in s.items():
            if k == "steps":
                continue
            if isinstance(v, list):
                d[k] = [a + b for a, b in zip(d[k], v)] if k in d else list(v)
            else:
                d[k] = d.get(k, 0) + v
    tot = d.pop("total_assignments", 0)
    loc = d.pop("local_assignments", 0)
    d["local_fraction"] = loc / tot if tot else 0.0
    d["routed_assignments"] = tot
    tp = {k[3:]: d.pop(k) for k in [k for k, v in d.items() if k.startswith("tp_") and isinstance(v, list)]}
    d.update(spec_stats(tp) if tp else {})
    return d
