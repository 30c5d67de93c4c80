"""How many compute threads this process should use, from the cores it can actually run on.

torch defaults to one thread per core of the machine. On a shared or container-limited machine that
oversubscribes: a 2-thread decode step on a 2-core machine where another job holds a core waits at every barrier
for the descheduled thread (measured 5-40x slower than one thread, issue 18). We take the smallest of

- the affinity mask (``os.sched_getaffinity``: taskset, cpusets),
- the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded down (at least 1),
- the cores of that mask left idle by other processes, sampled from ``/proc/stat`` over 0.1 s (rounded),

unless the caller asks for a number (``LLM(threads=N)``, ``--threads N``) or sets ``OMP_NUM_THREADS``.
Other processes we start share the same count: offload's reader process does I/O (its threads wait on the disk, not
the CPU) and Ray workers on one machine split it between them (``worker_threads``).
"""

from __future__ import annotations

import math
import os
import time

from ..moe.errors import MoeyardError


def affinity_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup quota allows (None: no quota). Looks at this process's own cgroup, then the root."""
    rel = ""
    cg = _read("/proc/self/cgroup") or ""
    for line in cg.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":
            rel = parts[2].lstrip("/")
    for base in ([os.path.join(root, rel)] if rel else []) + [root]:
        v2 = _read(os.path.join(base, "cpu.max"))
        if v2:
            q, _, p = v2.partition(" ")
            if q != "max" and p:
                return int(q) / int(p)
            return None
    for base in (os.path.join(root, "cpu,cpuacct"), os.path.join(root, "cpu")):
        q, p = _read(os.path.join(base, "cpu.cfs_quota_us")), _read(os.path.join(base, "cpu.cfs_period_us"))
        if q and p and int(q) > 0:
            return int(q) / int(p)
    return None


def _cpu_times() -> dict[int, tuple[int, int]]:
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = line.split()
            vals = [int(v) for v in f[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[int(f[0][3:])] = (idle, sum(vals[:8]))
    return out


def idle_cpus(cpus: list[int], interval: float = 0.1) -> float | None:
    """Sum over ``cpus`` of the fraction of ``interval`` each was idle (None when /proc/stat is unreadable)."""
    a = _cpu_times()
    if not a:
        return None
    time.sleep(interval)
    b = _cpu_times()
    tot = 0.0
    for c in cpus:
        if c in a and c in b:
            di, dt = b[c][0] - a[c][0], b[c][1] - a[c][1]
            tot += di / dt if dt > 0 else 1.0
    return tot


def available_cores(measure_idle: bool = True) -> tuple[int, str]:
    """(cores, why): the cores this process can use now."""
    cpus = affinity_cpus()
    n, why = len(cpus), [f"{len(cpus)} in the affinity mask"]
    q = cgroup_quota()
    if q is not None:
        why.append(f"cgroup quota {q:g}")
        n = min(n, max(1, math.floor(q)))
    if measure_idle and n > 1:
        idle = idle_cpus(cpus)
        if idle is not None:
            why.append(f"{idle:.1f} idle")
            n = min(n, max(1, int(idle + 0.5)))
    return n, ", ".join(why)


def choose_threads(threads: int | None = None) -> tuple[int, str]:
    """(threads, reason). ``threads`` given: that many (checked); else ``OMP_NUM_THREADS`` when set; else
    ``available_cores()``."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise MoeyardError(f"threads must be a positive integer, got {threads!r}")
        return threads, "asked for"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return available_cores()


def apply_threads(threads: int | None = None) -> tuple[int, str]:
    """Choose and set torch's intra-op threads for this process."""
    import torch
    n, why = choose_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, why


def worker_threads(total: int, workers_here: int) -> int:
    """Threads for each of ``workers_here`` processes sharing ``total`` cores (at least 1 each)."""
    return max(1, total // max(1, workers_here))
