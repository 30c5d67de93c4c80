"""Process groups between expert-parallel workers: one c10d group per worker set, no default group (so several
workers can live in one process, as threads in tests)."""

from __future__ import annotations

import datetime

import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed or timed out (usually: a peer worker died)."""


def make_group(init_method: str, rank: int, world: int, backend: str = "gloo", timeout_s: float = 30.0):
    """A process group of ``world`` ranks met at ``init_method`` ("tcp://host:port" with rank 0 listening, or
    "file:///path")."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method.startswith("tcp://"):
        host, port = init_method[len("tcp://"):].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
    elif init_method.startswith("file://"):
        store = dist.FileStore(init_method[len("file://"):], world)
        store.set_timeout(timeout)
    else:
        raise ValueError(f"init_method must be tcp://host:port or file:///path, got {init_method!r}")
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
