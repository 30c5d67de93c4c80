"""The expert-parallel driver: one executor over a transport that calls every worker once per step, ``RayTransport``
(the worker group's actors; a worker that dies or does not answer within ``step_timeout`` fails the step) or
``ThreadTransport`` (``EPWorker`` objects in threads of this process, for tests and debugging)."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import torch

from ..comm.schemes import get_scheme
from ..moe.config import MoEConfig
from ..moe.loader import resolve_dtype
from ..runtime.executor import RequestFailed, StepItem
from .partition import merge_logits, partition, sum_stats


class WorkerLost(RuntimeError):
    pass


def run_in_threads(fns, timeout: float | None = None) -> list:
    """Call every ``fns[i]()`` in its own thread (ranks of one process group); results in order, first error
    raised."""
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


class ThreadTransport:
    def __init__(self, worker_kwargs: list[dict], timeout_s: float = 30.0):
        from .worker import EPWorker
        self.workers = workers = [EPWorker(**kw) for kw in worker_kwargs]
        fd, f = tempfile.mkstemp(prefix="moeyard_ep_")
        os.close(fd)
        os.unlink(f)
        run_in_threads([lambda w=w: w.connect(f"file://{f}", None, timeout_s) for w in workers])

    def call_all(self, method: str, args_per_worker: list[tuple], what: str) -> list:
        return run_in_threads([lambda w=w, a=a: getattr(w, method)(*a) for w, a in zip(self.workers, args_per_worker)])

    def close(self):
        pass


class RayTransport:
    def __init__(self, group, step_timeout: float = 60.0):
        self.group, self.step_timeout = group, step_timeout
        self.calls = 0

    def call_all(self, method: str, args_per_worker: list[tuple], what: str) -> list:
        import ray
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.group.actors, args_per_worker)]
        self.calls += len(refs)
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

    def close(self):
        self.group.close()


def by_key(plans, logs) -> list[torch.Tensor]:
    """Coherent scheme: per-layer (keys, ids) logs of every worker -> each worker's items' routing in plan order."""
    L = len(logs[0])
    keys = [torch.cat([lg[l][0] for lg in logs]) for l in range(L)]
    ids = [torch.cat([lg[l][1] for lg in logs]) for l in range(L)]
    full = torch.stack([i[torch.argsort(k)] for k, i in zip(keys, ids)], 1)        # [N_step, L, K] by key
    out = []
    for plan in plans:
        rows = [torch.arange(it.key, it.key + len(it.token_ids)) for it in plan]
        out.append(full[torch.cat(rows)] if rows else full[:0])
    return out


class EPExecutor:
    """``execute(items) -> logits``, ``free(slot)``, ``stats()``, ``close()`` over ``transport``."""

    def __init__(self, transport, scheme: str, world: int):
        self.transport, self.scheme, self.world = transport, get_scheme(scheme), world
        self.route_hooks = []          # not supported across workers; kept for the executor contract
        self.broken: str | None = None
        self._stats = [{} for _ in range(world)]
        self.steps = 0
        self.placement_info: dict = {}
        self.spec = None               # planner.SpecShuffler when speculative_shuffle=True (form 1)
        self.rebalancer = None         # rebalance.LiveRebalancer when rebalance="periodic"
        self._on_close = None          # Ray mode: shuts down the Ray cluster it started

    @property
    def group(self):                   # Ray transport: the worker group (tests kill its actors)
        return self.transport.group

    def step_plans(self, plans, max_len: int, moves=None, capture: bool = False):
        """One step of every worker; returns (logits, routing [N_g, L_moe, K] of each worker's items) per worker."""
        res = self.transport.call_all("step", [(p, max_len, moves, capture) for p in plans], "model step")
        self._stats = [s for _, s, _ in res]
        routing = [r for _, _, r in res]
        if capture and routing and isinstance(routing[0], list):
            routing = by_key(plans, routing)
        return [l for l, _, _ in res], routing

    def execute(self, items: list[StepItem]) -> torch.Tensor:
        ids = [it.request_id for it in items]
        if self.broken:
            raise RequestFailed(ids, f"the expert-parallel worker group is down ({self.broken}); call "
                                     f"llm.restart()")
        self.steps += 1
        try:
            if self.spec is not None:
                return self.spec.execute(items, self.step_plans)
            rb = self.rebalancer
            if rb is not None:
                rb.before_step()
            plans, where, max_len = partition(items, self.world, everyone=self.scheme.all_tokens)
            outs, routing = self.step_plans(plans, max_len, capture=rb is not None)
            if rb is not None:
                rb.after_step(plans, routing)
        except WorkerLost as exc:
            self.broken = str(exc)
            raise RequestFailed(ids, f"{exc}; the request cannot continue (call llm.restart() to rebuild the "
                                     f"workers)") from exc
        return merge_logits(outs, where)

    def free(self, slot: int):
        if self.spec is not None:
            self.spec.free(slot)

    def stats(self) -> dict:
        d = sum_stats(self._stats)
        if self.spec is not None:
            d.update(self.spec.stats())
        if self.rebalancer is not None:
            d.update(self.rebalancer.stats())
        d.update(num_workers=self.world, ep_scheme=self.scheme.name, ep_steps=self.steps)
        calls = getattr(self.transport, "calls", None)
        if calls is not None:
            d["ray_calls_per_step"] = calls / self.steps if self.steps else 0.0
        return d

    def close(self):
        if self.rebalancer is not None:
            self.rebalancer.close()
        self.transport.close()
        if self._on_close is not None:
            self._on_close()


def start_executor(transport, cfg, world: int, placement, scheme: str, shuffle: bool = False,
                   shuffle_options: dict | None = None, trace: dict | None = None, tokenizer=None, **worker_kw
                   ) -> EPExecutor:
    """An ``EPExecutor`` over ``transport(per-worker EPWorker kwargs)`` with speculative shuffling when ``shuffle``:
    form 2 in the workers, or form 1's planner, its token table seeded from ``trace`` (or rebuilt by a calibration
    prefill on the workers, with a warning)."""
    form2 = shuffle and get_scheme(scheme).spec_form == 2
    extra = dict(shuffle=True, shuffle_options=shuffle_options) if form2 else {}
    ex = EPExecutor(transport([dict(rank=g, world=world, placement=placement, scheme=scheme, **worker_kw, **extra)
                               for g in range(world)]), scheme, world)
    if shuffle and not form2:
        from .planner import SpecShuffler
        try:
            dtype = resolve_dtype(worker_kw.get("dtype"), cfg, torch.device(worker_kw.get("device", "cpu")))
            ex.spec = SpecShuffler(cfg, placement, world, dtype, replicated_kv=ex.scheme.replicated_kv,
                                   **(shuffle_options or {}))
            ex.spec.load_table(trace, ex.step_plans, tokenizer, worker_kw["max_num_seqs"], worker_kw["max_model_len"])
            ex.placement_info["token_table"] = ex.spec.table_source
        except BaseException:
            ex.close()
            raise
    return ex


def thread_executor(path: str, placement, world: int, scheme: str = "standard", max_num_seqs: int = 8,
                    max_model_len: int = 256, dtype=None, timeout_s: float = 30.0, speculative_shuffle: bool = False,
                    trace: dict | None = None, tokenizer=None, shuffle_options: dict | None = None,
                    device: str = "cpu") -> EPExecutor:
    """Workers in threads of this process over a gloo FileStore group (tests, debugging; no Ray), their tensors
    on ``device`` (the group's backend follows it: gloo on CPU, NCCL on CUDA, which needs one GPU per worker)."""
    from .planner import check_config
    cfg = MoEConfig.from_dir(path)
    check_config(scheme, cfg, world, speculative_shuffle, shuffle_options)
    ex = start_executor(lambda kws: ThreadTransport(kws, timeout_s), cfg, world, placement, scheme,
                        speculative_shuffle, shuffle_options, trace, tokenizer, path=path, dtype=dtype, device=device,
                        max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    ex.workers = ex.transport.workers
    return ex
