"""Lower bounds on the placement objective (expected weighted cross-worker transitions per token).

Glossary
  co-location  weight of transitions (l, i) -> (l+1, j) whose experts share a worker (or node)
  pair bound   each layer pair is relaxed on its own (a layer may be partitioned differently for its
               left and right pair), and for that pair "experts grouped into G blocks of S + S" is
               relaxed to a bipartite b-matching: every expert of layer l is co-located with at most
               S * copies experts of layer l+1 and vice versa, and at most G * S^2 pairs in all. The
               b-matching LP max sum aff*y, row/col sums <= caps, 0 <= y <= 1 is integral and is
               solved exactly by HiGHS. Its optimum upper-bounds the co-location of every placement,
               so total - co-location is a valid lower bound on the cost.
  topology     cost = aff * (1[other worker] + (c_inter - 1) * 1[other node]); both indicators are
               bounded separately (worker level with S, node level with S * G / N), which stays valid.
  dual bound   for E > 128 (or when the LP runs out of time) the LP's dual is minimised by exact
               block-coordinate steps instead; every dual-feasible point is a valid bound (~0.2% looser)
  row bound    sum over rows of the S largest entries (min with columns); always computed, min taken
"""
from __future__ import annotations

import time

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from .problem import AffinityProblem
from .spec import PlaceSpec


def _row_col_bound(a_EE, cap_row_E, cap_col_E):
    def side(m, caps):
        srt = -np.sort(-m, axis=1)
        cs = np.cumsum(srt, axis=1)
        k = np.clip(caps.astype(int), 0, m.shape[1])
        return float(np.where(k > 0, cs[np.arange(m.shape[0]), np.maximum(k - 1, 0)], 0.0).sum())
    return min(side(a_EE, cap_row_E), side(a_EE.T, cap_col_E))


def dual_coordinate_bound(a_EE, cap_row_E, cap_col_E, iters=60):
    """Valid upper bound on the b-matching LP from its dual
    min sum_i r_i u_i + sum_j c_j v_j + sum_ij max(0, a_ij - u_i - v_j), u, v >= 0,
    improved by exact block-coordinate steps (u_i = (r_i+1)-th largest of a_ij - v_j). Every iterate is
    dual feasible, so every value is a valid bound; we keep the smallest."""
    E = a_EE.shape[0]

    def step(m, caps):   # best u for rows of m (each row minimises r*u + sum max(0, m - u))
        srt = -np.sort(-m, axis=1)
        k = np.clip(caps.astype(int), 0, m.shape[1] - 1)
        u = np.where(caps >= m.shape[1], 0.0, srt[np.arange(m.shape[0]), k])
        return np.maximum(u, 0.0)

    def value(u, v):
        return float(cap_row_E @ u + cap_col_E @ v + np.maximum(0.0, a_EE - u[:, None] - v[None, :]).sum())

    u, v = np.zeros(E), np.zeros(E)
    best = value(u, v)
    for t in range(iters):
        if t % 2 == 0:
            u = step(a_EE - v[None, :], cap_row_E)
        else:
            v = step((a_EE - u[:, None]).T, cap_col_E)
        best = min(best, value(u, v))
    return best


def colocation_upper(a_EE: np.ndarray, cap_row_E: np.ndarray, cap_col_E: np.ndarray, total_pairs: float,
                     time_limit: float = 10.0, lp_max_experts: int = 128) -> tuple[float, str]:
    """Max co-located weight of one layer pair over b-matchings; returns (value, method).

    a_EE: [E, E] affinity; cap_row_E / cap_col_E: [E] co-location degree caps; total_pairs: cap on
    the number of co-located (i, j) pairs.
    """
    cheap = _row_col_bound(a_EE, cap_row_E, cap_col_E)
    if a_EE.shape[0] > lp_max_experts:
        return min(cheap, dual_coordinate_bound(a_EE, cap_row_E, cap_col_E)), "b-matching-dual"
    ii, jj = np.nonzero(a_EE > 0)
    n = len(ii)
    if n == 0:
        return 0.0, "empty"
    E = a_EE.shape[0]
    rows = np.r_[ii, E + jj, np.full(n, 2 * E)]
    cols = np.r_[np.arange(n), np.arange(n), np.arange(n)]
    A = sparse.csr_array((np.ones(3 * n), (rows, cols)), shape=(2 * E + 1, n))
    b = np.r_[cap_row_E, cap_col_E, total_pairs].astype(float)
    res = linprog(-a_EE[ii, jj], A_ub=A, b_ub=b, bounds=(0, 1), method="highs",
                  options={"time_limit": time_limit, "presolve": True})
    if res.status != 0:   # LP out of time: its dual, improved by coordinate steps, is still valid
        return min(cheap, dual_coordinate_bound(a_EE, cap_row_E, cap_col_E)), "b-matching-dual"
    # the LP dual gives an exact certificate; use the primal value (HiGHS optimal) but never above cheap
    return min(cheap, float(-res.fun)), "b-matching-lp"


def pair_lower_bound(problem: AffinityProblem, spec: PlaceSpec, copies_LE: np.ndarray,
                     time_limit: float = 60.0) -> tuple[float, dict]:
    """Valid lower bound on the (topology-weighted) cost per token; returns (bound, details)."""
    t0 = time.perf_counter()
    E, G = problem.num_experts, spec.num_workers
    S = spec.slots(E)
    topo = spec.topology
    alpha = topo.inter_node_cost if topo.num_nodes > 1 else 1.0
    levels = [(S, G, 1.0, G)]
    if topo.num_nodes > 1 and alpha != 1.0:
        levels.append((S * topo.workers_per_node, topo.num_nodes, alpha - 1.0, topo.num_nodes))
    bound, methods = 0.0, set()
    P = problem.aff_PEE.shape[0]
    for l in range(P):
        a = problem.aff_PEE[l]
        tot = a.sum()
        for size, groups, gain, max_copies in levels:
            left = max(0.1, time_limit - (time.perf_counter() - t0)) / max(1, P - l)
            cap_r = size * np.minimum(copies_LE[l], max_copies)
            cap_c = size * np.minimum(copies_LE[l + 1], max_copies)
            up, how = colocation_upper(a, cap_r, cap_c, groups * size * size, left)
            methods.add(how)
            bound += gain * (tot - up)
    return bound, {"bound_method": "per-pair " + "/".join(sorted(methods)),
                   "bound_seconds": round(time.perf_counter() - t0, 3)}
