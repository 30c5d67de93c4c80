"""The Ray actor around an ``EPWorker``: forwards calls, builds the worker lazily (on ``load``)."""

from __future__ import annotations

import os
import socket


class EPWorkerActor:
    """Decorated with ``ray.remote`` by the worker group; holds one ``moeyard.cluster.worker.EPWorker``."""

    def __init__(self, **worker_kwargs):
        self._kw = worker_kwargs
        self._w = None

    def _worker(self):
        if self._w is None:
            import torch
            kw = dict(self._kw)
            threads = kw.pop("threads", None)     # the driver's share for each worker of this machine
            torch.set_num_threads(int(os.environ.get("MOEYARD_WORKER_THREADS", threads or 1)))
            from .worker import EPWorker
            self._w = EPWorker(**kw)
        return self._w

    def load(self) -> dict:
        import ray
        w = self._worker()
        return {"rank": w.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "expert_bytes": w.expert_bytes(), "local_experts": w.local_experts}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port (rank 0 hosts the rendezvous store)."""
        import ray
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ip, port

    def connect(self, init_method: str, backend: str | None, timeout_s: float) -> bool:
        return self._worker().connect(init_method, backend, timeout_s)

    def step(self, items, max_len: int, moves=None, capture: bool = False):
        return self._worker().step(items, max_len, moves, capture)

    def move_experts(self, op: str, *args):
        return self._worker().move_experts(op, *args)

    def stats(self) -> dict:
        return self._worker().stats()

    def pid(self) -> int:
        return os.getpid()
