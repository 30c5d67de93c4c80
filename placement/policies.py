"""Placement policies behind one signature, and the registry that names them.

Glossary
  policy      fn(problem, spec, *, trace, time_limit, seed) -> Placement
  contiguous  expert e -> worker e // S (how most EP implementations shard)
  round_robin expert e -> worker e % G
  eplb        DeepSeek EPLB: replicate the experts with the highest load per copy, then balanced
              packing (heaviest copy first onto the least-loaded worker with a free slot)
  exflow      ExFlow (2024): token-level ILP, one co-location variable per token transition per worker;
              small traces only (tokens are subsampled to fit), solved with HiGHS under the time limit
  affinity    ours (solver.solve): exact ILP when small, otherwise layer-wise search with a proven bound
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import PlacementError
from .placement import Placement
from .problem import AffinityProblem
from .spec import PlaceSpec, replica_counts
from .trace import Trace

PolicyFn = Callable[..., Placement]
POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str):
    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn
    return deco


def get_policy(name: str) -> PolicyFn:
    if name not in POLICIES:
        raise PlacementError(f"unknown placement policy '{name}'; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def static_worker_E(kind: str, num_experts: int, num_workers: int) -> np.ndarray:
    """[E] worker of each expert for the static policies: ``contiguous`` balanced blocks of consecutive experts
    (``e * G // E``; ``e // (E / G)`` when G divides E), ``round_robin`` ``e % G``."""
    e = np.arange(num_experts)
    return e % num_workers if kind == "round_robin" else (e * num_workers) // num_experts


def _static(problem: AffinityProblem, spec: PlaceSpec, worker_E: np.ndarray, name: str) -> Placement:
    spec.check(problem)
    if problem.num_experts % spec.num_workers:
        raise PlacementError(f"{name} needs workers ({spec.num_workers}) to divide experts ({problem.num_experts})")
    return Placement.from_array(np.tile(worker_E, (problem.num_layers, 1)), spec.num_workers,
                                solver={"policy": name})


@register_policy("contiguous")
def contiguous(problem: AffinityProblem, spec: PlaceSpec, **_) -> Placement:
    E, G = problem.num_experts, spec.num_workers
    return _static(problem, spec, static_worker_E("contiguous", E, G), "contiguous")


@register_policy("round_robin")
def round_robin(problem: AffinityProblem, spec: PlaceSpec, **_) -> Placement:
    return _static(problem, spec, static_worker_E("round_robin", problem.num_experts, spec.num_workers),
                   "round_robin")


@register_policy("eplb")
def eplb(problem: AffinityProblem, spec: PlaceSpec, **_) -> Placement:
    """DeepSeek EPLB (global policy): replicate_experts + balanced_packing, per layer."""
    spec.check(problem)
    L, E, G = problem.num_layers, problem.num_experts, spec.num_workers
    S = spec.slots(E)
    copies_LE = replica_counts(problem.load_LE, G, S)
    member = np.zeros((L, E, G), dtype=bool)
    for l in range(L):
        items = [(problem.load_LE[l, e] / copies_LE[l, e], e) for e in range(E) for _ in range(copies_LE[l, e])]
        items.sort(key=lambda t: -t[0])
        load_G, used_G = np.zeros(G), np.zeros(G, dtype=int)
        for w, e in items:
            ok = (used_G < S) & ~member[l, e]
            g = int(np.flatnonzero(ok)[np.argmin(load_G[ok])])
            member[l, e, g] = True
            load_G[g] += w
            used_G[g] += 1
    return Placement.from_membership(member, solver={"policy": "eplb"})


@register_policy("exflow")
def exflow(problem: AffinityProblem, spec: PlaceSpec, *, trace: Trace | None = None, time_limit: float = 30.0,
           seed: int = 0, max_tokens: int = 400, **_) -> Placement:
    from .exflow_ilp import solve_token_ilp
    if trace is None:
        raise PlacementError("exflow needs a token trace (its ILP has one variable per token transition); "
                             "precomputed affinity statistics are not enough")
    spec.check(problem)
    if problem.num_experts % spec.num_workers:
        raise PlacementError("exflow needs workers to divide experts")
    return solve_token_ilp(trace, spec.num_workers, time_limit=time_limit, seed=seed, max_tokens=max_tokens)


@register_policy("affinity")
def affinity(problem: AffinityProblem, spec: PlaceSpec, *, time_limit: float = 30.0, seed: int = 0, **_) -> Placement:
    from .solver import solve
    return solve(problem, spec.num_workers, nodes=spec.nodes, replicas=spec.replicas, balance=spec.balance,
                 time_limit=time_limit, seed=seed, inter_node_cost=spec.inter_node_cost).placement


BASELINES = ("round_robin", "contiguous", "eplb", "exflow")
