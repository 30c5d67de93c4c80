"""Which worker holds which expert: the ``placement=`` option of Ray mode as the frozen ``Placement`` (row i: the
i-th MoE layer, as in a placement.json), checked against the model and the workers before anything starts."""

from __future__ import annotations

import json
import os

import numpy as np

from ..moe.config import MoEConfig
from ..moe.errors import MoeyardError
from ..placement import Trace, load_trace, solve
from ..placement.coactivation import solve_coactivation
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


def resolve(placement, cfg: MoEConfig, num_workers: int) -> Placement | None:
    """The placement named by ``placement=`` (a built-in name or a placement.json path), checked against the model
    and the workers; None for those solved on a routing trace (``solved_placement``)."""
    if not isinstance(placement, str):
        raise PlacementMismatch(f"placement must be a string (a built-in name or a placement.json path), "
                                f"got {type(placement).__name__}")
    if placement in ("round_robin", "contiguous"):
        return static_placement(placement, cfg, num_workers)
    if placement in ("affinity", "coactivation"):
        check_workers(cfg, num_workers)
        return None
    if not os.path.isfile(placement):
        raise PlacementMismatch(f"placement must be one of {', '.join(BUILTIN)} or a placement.json path; "
                                f"{placement!r} is neither")
    try:
        with open(placement) as f:
            d = json.load(f)
        assignment, g = d["assignment"], int(d["num_workers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlacementMismatch(f"{placement}: not a valid placement.json ({exc!r})") from exc
    return placement_from_assignment(assignment, g, cfg, num_workers, placement)


def solved_placement(kind: str, trace, cfg: MoEConfig, num_workers: int, time_limit: float = 20.0):
    """(Placement, what the solver reports) of ``kind`` solved on a routing trace: ``affinity`` (a token's
    consecutive-layer experts together, ``moeyard.placement.solve``) or ``coactivation`` (experts chosen together
    in a layer on one worker, ``moeyard.placement.coactivation``: for tensor-parallel attention with shuffling)."""
    check_workers(cfg, num_workers)
    if kind == "coactivation":
        res = solve_coactivation(trace, num_workers, time_limit=min(time_limit, 10.0))
        pl = placement_from_assignment(res.worker_LE.tolist(), num_workers, cfg, num_workers, "co-activation placement")
        return pl, {"coactivation_together": res.together,
                    "coactivation_together_round_robin": res.together_round_robin}
    res = solve(trace, num_workers, time_limit=time_limit)
    p = res.placement
    pl = placement_from_assignment([list(r) for r in p.assignment], p.num_workers, cfg, num_workers,
                                   "affinity placement", objective=p.objective, bound=p.bound)
    return pl, {"objective": res.objective}


def trace_of_model(path: str) -> Trace | None:
    """The model's shipped routing trace (``trace.npz``), or None."""
    f = os.path.join(path, "trace.npz")
    return load_trace(f) if os.path.isfile(f) else None


def make_trace(experts_TLk: np.ndarray, num_experts: int) -> Trace:
    return Trace(np.asarray(experts_TLk, dtype=np.int64), int(num_experts))
