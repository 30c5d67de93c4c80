"""Which worker holds which expert: the ``placement=`` option of Ray mode, resolved before anything starts.

Every function returns the frozen ``moeyard.placement.Placement`` (row i: the i-th MoE layer,
``cfg.moe_layers[i]``), checked against the model and the worker count. A placement.json has one row per MoE layer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..moe.config import MoEConfig
from ..moe.errors import MoeyardError
from ..placement.placement import Placement
from ..placement.policies import static_worker_E

BUILTIN = ("round_robin", "contiguous", "affinity", "coactivation")


class PlacementMismatch(MoeyardError):
    """A placement that cannot serve this model on this many workers."""


def static_placement(kind: str, cfg: MoEConfig, num_workers: int) -> Placement:
    check_workers(cfg, num_workers)
    row = static_worker_E(kind, cfg.num_experts, num_workers)
    return Placement.from_array(np.tile(row, (len(cfg.moe_layers), 1)), num_workers, solver={"policy": kind})


def check_workers(cfg: MoEConfig, num_workers: int, replicated: bool = False):
    if not isinstance(num_workers, int) or num_workers < 1:
        raise PlacementMismatch(f"num_workers must be a positive integer, got {num_workers!r}")
    if num_workers > cfg.num_experts and not replicated:
        raise PlacementMismatch(f"num_workers={num_workers} exceeds the {cfg.num_experts} experts per layer of "
                                f"this model: some workers would hold no expert. Use at most {cfg.num_experts} "
                                f"workers, or a placement file that replicates experts")


def placement_from_assignment(assignment, num_workers_file: int, cfg: MoEConfig, num_workers: int,
                              where: str, **info) -> Placement:
    L, E = len(cfg.moe_layers), cfg.num_experts
    if num_workers_file != num_workers:
        raise PlacementMismatch(f"{where}: made for {num_workers_file} workers, but num_workers={num_workers}")
    if len(assignment) != L:
        raise PlacementMismatch(f"{where}: has {len(assignment)} layers, the model has {L} MoE layers")
    out = []
    for l, row in enumerate(assignment):
        if len(row) != E:
            raise PlacementMismatch(f"{where}: layer {l} has {len(row)} experts, the model has {E} per layer")
        cells = []
        for e, c in enumerate(row):
            ws = tuple(int(w) for w in c) if isinstance(c, (list, tuple)) else (int(c),)
            if not ws or min(ws) < 0 or max(ws) >= num_workers or len(set(ws)) != len(ws):
                raise PlacementMismatch(f"{where}: layer {l} expert {e} -> workers {list(ws)}; need distinct ids "
                                        f"in [0, {num_workers})")
            cells.append(ws)
        out.append(cells)
    replicated = any(len(ws) > 1 for row in out for ws in row)
    check_workers(cfg, num_workers, replicated)
    return Placement(tuple(tuple(row) for row in out), num_workers, **info)


def load_placement_file(path: str, cfg: MoEConfig, num_workers: int):
    if not os.path.isfile(path):
        raise PlacementMismatch(f"placement must be one of {', '.join(BUILTIN)} or a placement.json path; "
                                f"{path!r} is neither")
    try:
        with open(path) as f:
            d = json.load(f)
        assignment, g = d["assignment"], int(d["num_workers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlacementMismatch(f"{path}: not a valid placement.json ({exc!r})") from exc
    return placement_from_assignment(assignment, g, cfg, num_workers, path)


def affinity_placement(trace, cfg: MoEConfig, num_workers: int, time_limit: float = 20.0):
    """Solve for an affinity placement on a routing trace (``moeyard.placement.solve``)."""
    check_workers(cfg, num_workers)
    try:
        from ..placement import solve
    except Exception as exc:  # noqa: BLE001 — the solver package may be missing or half-written
        raise PlacementMismatch(f"placement='affinity' needs the placement solver (moeyard.placement.solve), "
                                f"which is not usable here: {exc!r}; use round_robin, contiguous or a "
                                f"placement.json") from exc
    res = solve(trace, num_workers, time_limit=time_limit)
    p = res.placement
    return placement_from_assignment([list(r) for r in p.assignment], p.num_workers, cfg, num_workers,
                                     "affinity placement", objective=p.objective, bound=p.bound), res


def coactivation_placement(trace, cfg: MoEConfig, num_workers: int, time_limit: float = 20.0):
    """Group experts chosen together in a layer on one worker (``moeyard.placement.coactivation``): the
    speculative expert grouping for tensor-parallel attention with token shuffling."""
    check_workers(cfg, num_workers)
    from ..placement.coactivation import solve_coactivation
    res = solve_coactivation(trace, num_workers, time_limit=min(time_limit, 10.0))
    return placement_from_assignment(res.worker_LE.tolist(), num_workers, cfg, num_workers,
                                     "co-activation placement"), res


def trace_of_model(path: str):
    """The model's shipped routing trace (``trace.npz``), or None."""
    f = os.path.join(path, "trace.npz")
    if not os.path.isfile(f):
        return None
    from ..placement import load_trace
    return load_trace(f)


def make_trace(experts_TLk: np.ndarray, num_experts: int):
    from ..placement import Trace
    return Trace(np.asarray(experts_TLk, dtype=np.int64), int(num_experts))
