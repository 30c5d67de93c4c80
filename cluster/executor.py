"""The driver side of Ray mode: one Ray call per worker per step, logits merged in the engine's item order."""

from __future__ import annotations

import time

import torch

from ..runtime.ep_worker import merge_logits, partition, partition_tp, sum_stats
from ..runtime.executor import RequestFailed, StepItem
from .group import WorkerGroup


class WorkerLost(RuntimeError):
    pass


class RayEPExecutor:
    def __init__(self, group: WorkerGroup, scheme: str, step_timeout: float = 60.0, started_ray: bool = False,
                 placement_info: dict | None = None):
        self.group, self.scheme, self.step_timeout = group, scheme, step_timeout
        self.world = len(group.actors)
        self.route_hooks = []          # not supported across workers; kept for the executor contract
        self.broken: str | None = None
        self._stats = [{} for _ in range(self.world)]
        self._started_ray = started_ray
        self.steps = 0
        self.ray_calls = 0
        self.placement_info = placement_info or {}
        self.spec = None               # runtime.spec_shuffle.SpecShuffler when speculative_shuffle=True

    def _call_all(self, method: str, args_per_worker: list[tuple], what: str) -> list:
        import ray
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.group.actors, args_per_worker)]
        self.ray_calls += len(refs)
        index = {r: i for i, r in enumerate(refs)}
        out = [None] * len(refs)
        pending, deadline = list(refs), time.monotonic() + self.step_timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise WorkerLost(f"{what}: expert-parallel workers {[index[r] for r in pending]} did not answer "
                                 f"within {self.step_timeout:.0f}s")
            r = ready[0]
            try:
                out[index[r]] = ray.get(r, timeout=5)
            except Exception as exc:  # noqa: BLE001 — RayActorError, RayTaskError(CollectiveError), ...
                kind = "died" if isinstance(exc, ray.exceptions.RayActorError) else "failed"
                raise WorkerLost(f"{what}: expert-parallel worker {index[r]} {kind}: "
                                 f"{str(exc).strip().splitlines()[0][:300]}") from exc
        return out

    def execute(self, items: list[StepItem]) -> torch.Tensor:
        ids = [it.request_id for it in items]
        if self.broken:
            raise RequestFailed(ids, f"the expert-parallel worker group is down ({self.broken}); call "
                                     f"llm.restart()")
        self.steps += 1
        try:
            if self.spec is not None:
                return self.spec.execute(items, self._spec_step)
            plans, where, max_len = (partition_tp if self.scheme == "tp" else partition)(items, self.world)
            res = self._call_all("step", [(p, max_len) for p in plans], "model step")
        except WorkerLost as exc:
            self.broken = str(exc)
            raise RequestFailed(ids, f"{exc}; the request cannot continue (call llm.restart() to rebuild the "
                                     f"workers)") from exc
        self._stats = [s for _, s in res]
        return merge_logits([l for l, _ in res], where)

    def _spec_step(self, plans, max_len, moves):
        res = self._call_all("step_spec", [(p, max_len, moves) for p in plans], "model step")
        self._stats = [s for _, s, _ in res]
        return [l for l, _, _ in res], [r for _, _, r in res]

    def calibrate(self, token_lists: list[list[int]], batch: int = 4):
        """Routing trace [T, L_moe, K] of a prefill of ``token_lists`` (standard scheme only)."""
        import numpy as np
        import ray
        ray.get([a.start_recording.remote() for a in self.group.actors], timeout=30)
        for i in range(0, len(token_lists), batch):
            self.execute([StepItem(j, toks, 0, True) for j, toks in enumerate(token_lists[i:i + batch])])
        parts = ray.get([a.take_trace.remote() for a in self.group.actors], timeout=30)
        return np.concatenate([p for p in parts if p is not None])

    def free(self, slot: int):
        if self.spec is not None:
            self.spec.free(slot)

    def stats(self) -> dict:
        d = sum_stats(self._stats)
        if self.spec is not None:
            d.update(self.spec.stats())
        d.update(num_workers=self.world, ep_scheme=self.scheme, ep_steps=self.steps,
                 ray_calls_per_step=self.ray_calls / self.steps if self.steps else 0.0)
        return d

    def close(self):
        self.group.close()
        if self._started_ray:
            import ray
            ray.shutdown()
