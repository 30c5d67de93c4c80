"""``solve``: the affinity-aware placement solver (ours), with a proven lower bound and gap.

Glossary
  objective  expected (topology-weighted) cross-worker transitions per token on the fitted statistics
  bound      a proven lower bound on the objective of every feasible placement:
               exact method  -> HiGHS's MILP dual bound (equals the objective when status is optimal)
               search method -> the per-layer-pair b-matching bound (see bounds.py); ignores the
                                balance constraint (a relaxation, so still valid)
             With replication the bound holds for the replica counts fixed by the EPLB rule.
  gap        (objective - bound) / objective
  status     "optimal" (gap 0), "feasible", or "balance_not_met" when replicas + balance could not both
             be satisfied by the greedy replica placement (the loads reached are in solver metadata)
  method     "exact" (whole MILP in HiGHS), "search" (layer-wise exact re-solves + iterated local
             search, see search.py) or "auto" (exact when the MILP is small, else search)

Steps of ``solve``: 1. build the affinity problem and validate the request; 2. decide replica counts;
3. bound; 4. place primaries (exact or search) under the remaining time; 5. add replicas; 6. score.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .affinity import affinity_from_trace
from .bounds import pair_lower_bound
from .errors import PlacementError
from .evaluate import pair_cost_PEE, worker_load_LG
from .ilp import solve_exact
from .placement import Placement
from .problem import AffinityProblem
from .replication import add_replicas
from .search import LayerSolver, local_search
from .spec import PlaceSpec, balance_cap_L, replica_counts
from .trace import Trace, load_trace

EXACT_MAX_TERMS = 4096      # (L-1) * E^2 * G above which "auto" uses the search


@dataclass(frozen=True)
class SolveResult:
    """placement, objective and bound (per token), gap = (objective - bound) / objective; bound_state
    warm-starts the bound of a later solve (bounds.PairBound.state)."""

    placement: Placement
    objective: float
    bound: float
    gap: float
    status: str
    seconds: float
    bound_state: tuple | None = None


def as_problem(data: AffinityProblem | Trace | str | os.PathLike) -> AffinityProblem:
    """Accept an affinity problem, a trace, or a path to trace.npz."""
    if isinstance(data, AffinityProblem):
        return data
    if isinstance(data, (str, os.PathLike)):
        data = load_trace(data)
    if isinstance(data, Trace):
        return affinity_from_trace(data)
    raise PlacementError(f"cannot place against a {type(data).__name__}; pass a Trace, AffinityProblem or path")


def placement_cost(member_LEG: np.ndarray, problem: AffinityProblem, spec: PlaceSpec) -> float:
    return float((problem.aff_PEE * pair_cost_PEE(member_LEG, spec.topology)).sum())


def check_balance(problem, spec, copies_LE):
    """[L] balance caps (None without a balance constraint); raises if one expert alone breaks its cap."""
    if spec.balance is None:
        return None
    cap_L = balance_cap_L(problem.load_LE, spec.num_workers, spec.balance)
    per_copy_LE = problem.load_LE / copies_LE
    l, e = np.unravel_index(np.argmax(per_copy_LE - cap_L[:, None]), per_copy_LE.shape)
    if per_copy_LE[l, e] > cap_L[l] + 1e-12:
        raise PlacementError(
            f"load balance eps={spec.balance} is infeasible: expert {e} of layer {l} alone carries "
            f"{per_copy_LE[l, e] / (problem.load_LE[l].sum() / spec.num_workers):.2f}x a worker's mean load "
            f"(cap {1 + spec.balance:.2f}x); raise --balance or add --replicas")
    return cap_L


def solve(problem_or_trace, num_workers: int, *, nodes: int = 1, replicas: int = 0,
          balance: float | None = None, time_limit: float = 30.0, seed: int = 0, method: str = "auto",
          inter_node_cost: float = 4.0, bound_time: float | None = None,
          bound_state: tuple | None = None) -> SolveResult:
    """Place experts to minimise expected cross-worker transitions per token.

    problem_or_trace: AffinityProblem (aff_PEE [L-1, E, E], load_LE [L, E]), Trace, or trace path.
    bound_time: seconds for the lower bound, after which the search still gets ``time_limit`` (default: a
    quarter of ``time_limit``, inside it); bound_state: a previous SolveResult's, to warm-start the bound.
    Returns SolveResult; raises PlacementError on bad input or infeasible constraints.
    """
    t0 = time.perf_counter()
    deadline = t0 + float(time_limit)
    # 1. problem and request
    problem = as_problem(problem_or_trace)
    spec = PlaceSpec(num_workers, nodes, replicas, balance, inter_node_cost)
    spec.check(problem)
    if method not in ("auto", "exact", "search"):
        raise PlacementError(f"method must be 'auto', 'exact' or 'search', got '{method}'")
    L, E, G = problem.num_layers, problem.num_experts, num_workers
    slots = spec.slots(E)
    # 2. replica counts (EPLB rule); primaries use ceil(E / G) slots, replicas the rest
    copies_LE = replica_counts(problem.load_LE, G, slots) if replicas else np.ones((L, E), dtype=np.int64)
    cap_L = check_balance(problem, spec, copies_LE)
    terms = (L - 1) * E * E * G
    use_exact = method == "exact" or (method == "auto" and terms <= EXACT_MAX_TERMS)
    info = {"policy": "affinity", "seed": seed, "time_limit": time_limit, "nodes": nodes,
            "replicas": replicas, "balance": balance, "inter_node_cost": inter_node_cost}
    member, bound, status = None, 0.0, "feasible"
    if use_exact:
        # exact MILP; under "auto" it gets half the budget and the search may still improve on it
        budget = deadline - time.perf_counter()
        res = solve_exact(problem, spec, copies_LE,
                          time_limit=max(0.5, budget if method == "exact" else 0.5 * budget))
        if res.status == "infeasible":
            raise PlacementError(
                f"no placement satisfies balance eps={balance} with {slots} slots per worker "
                f"(replicas={replicas}; replica counts fixed by the EPLB rule) - proved infeasible by the exact "
                f"MILP; raise --balance or change --replicas")
        bound = res.bound
        info.update(method="exact-milp", bound_method="highs-milp-dual-bound", milp_status=res.status)
        if res.member_LEG is not None:
            member, status = res.member_LEG, res.status
    if member is None or (method == "auto" and status != "optimal"):
        # 3. bound (a quarter of the budget unless bound_time says otherwise)
        pb = pair_lower_bound(problem, spec, copies_LE, time_limit=0.25 * time_limit if bound_time is None
                              else bound_time, state=bound_state)
        bound_state = pb.state
        if bound_time is not None:
            deadline = time.perf_counter() + float(time_limit)
        if pb.value > bound:
            bound = pb.value
            info.update(pb.info)
        # 4. primaries
        prim_load_LE = problem.load_LE / copies_LE
        prim_cap = None if cap_L is None else (cap_L if not replicas else
                                               (1 + balance) * prim_load_LE.sum(1) / G)
        layer_solver = LayerSolver(G, -(-E // G), prim_load_LE, prim_cap,
                                   mip_time=max(0.2, 0.05 * time_limit))
        topo = spec.topology
        search_time = max(0.2, deadline - time.perf_counter() - 0.03 * time_limit)   # keep time to score
        worker_LE, cost, iters = local_search(problem.aff_PEE, topo.cost_GG(), topo.node_of_G, -(-E // G),
                                              layer_solver, search_time, seed=seed, target=bound * (1 + 1e-9))
        info["iterations"] = iters
        # 5. replicas
        if replicas:
            found = add_replicas(worker_LE, copies_LE, problem.aff_PEE, problem.load_LE, G, slots, cap_L)
        else:
            found = np.zeros((L, E, G), dtype=bool)
            found[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE] = True
        if member is None or placement_cost(found, problem, spec) < placement_cost(member, problem, spec):
            member = found
            info["method"] = "layer-search" if not use_exact else "exact-milp+layer-search"
        status = "feasible"
    # 6. score
    obj = placement_cost(member, problem, spec)
    bound = min(float(bound), obj)
    gap = 0.0 if obj <= 1e-12 else (obj - bound) / obj
    if cap_L is not None:
        load_LG = worker_load_LG(member, problem.load_LE)
        info["balance_met"] = bool((load_LG.max(1) <= cap_L * (1 + 1e-9)).all())
        info["load_max_mean"] = float((load_LG.max(1) / load_LG.mean(1)).max())
        if not info["balance_met"]:
            status = "balance_not_met"
    if gap <= 1e-9 and status != "balance_not_met":
        status = "optimal"
    secs = time.perf_counter() - t0
    info.update(status=status, seconds=round(secs, 3), gap=gap,
                objective_units="expected weighted cross-worker transitions per token")
    placement = Placement.from_membership(member, objective=obj, bound=bound, solver=info)
    return SolveResult(placement, obj, bound, gap, status, secs, bound_state)
