"""Worker-group creation: a placement group (one bundle per worker, SPREAD), one actor per bundle, and the
process-group rendezvous (rank 0's node and a free port, picked for the driver by actor 0)."""

from __future__ import annotations

import logging
import os
import time

from ..moe.errors import MoeyardError

log = logging.getLogger(__name__)


class ClusterError(MoeyardError):
    """Ray could not provide the workers asked for."""


def ensure_ray(address: str | None, num_workers: int) -> bool:
    """Connect to Ray; returns True if this call started a local cluster (so ``close`` may stop it)."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_workers), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        return True
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return False


class WorkerGroup:
    def __init__(self, worker_kwargs: list[dict], num_cpus: float = 0.25, resources: dict | None = None,
                 backend: str | None = None, collective_timeout: float = 20.0, start_timeout: float = 120.0):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .actor import EPWorkerActor

        n = len(worker_kwargs)
        bundle = {"CPU": num_cpus, **(resources or {})}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD")
        self.actors = []
        try:
            try:
                ray.get(self.pg.ready(), timeout=start_timeout)
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(f"Ray could not reserve {n} worker bundles {bundle} within {start_timeout:.0f}s "
                                   f"(cluster resources: {ray.cluster_resources()})") from None
            cls = ray.remote(EPWorkerActor)
            for i, kw in enumerate(worker_kwargs):
                self.actors.append(cls.options(
                    num_cpus=num_cpus, resources=resources or {}, max_restarts=0, max_concurrency=4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                    name=None).remote(**kw))
            t0 = time.time()
            self.info = ray.get([a.load.remote() for a in self.actors], timeout=start_timeout)
            ip, port = ray.get(self.actors[0].address.remote(), timeout=30)
            self.init_method = f"tcp://{ip}:{port}"
            ray.get([a.connect.remote(self.init_method, backend, collective_timeout) for a in self.actors],
                    timeout=collective_timeout + 30)
            log.info("expert-parallel group of %d workers up in %.1fs at %s", n, time.time() - t0, self.init_method)
        except BaseException:
            self.close()
            raise

    @property
    def node_ids(self) -> list[str]:
        return [i["node_id"] for i in self.info]

    def close(self):
        import ray
        from ray.util.placement_group import remove_placement_group
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 — already dead
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None
