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
  spectral     at node level (several nodes, no replicas) also the eigenvalue bound of spectral.py, which
               knows that co-located experts form E/N-sized groups; the smaller co-location is used
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from .problem import AffinityProblem
from .spec import PlaceSpec
from .spectral import partition_upper


def _row_col_bound(a_EE, cap_row_E, cap_col_E):
    def side(m, caps):
        srt = -np.sort(-m, axis=1)
        cs = np.cumsum(srt, axis=1)
        k = np.clip(caps.astype(int), 0, m.shape[1])
        return float(np.where(k > 0, cs[np.arange(m.shape[0]), np.maximum(k - 1, 0)], 0.0).sum())
    return min(side(a_EE, cap_row_E), side(a_EE.T, cap_col_E))


def dual_coordinate_bound(a_EE, cap_row_E, cap_col_E, iters=60, start=None):
    """Valid upper bound on the b-matching LP from its dual
    min sum_i r_i u_i + sum_j c_j v_j + sum_ij max(0, a_ij - u_i - v_j), u, v >= 0,
    improved by exact block-coordinate steps (u_i = (r_i+1)-th largest of a_ij - v_j). Every iterate is
    dual feasible, so every value is a valid bound; we keep the smallest. ``start`` (u, v) warm-starts it
    (a previous result's point, e.g. on drifted counts). Returns (bound, (u, v) of the bound)."""
    E = a_EE.shape[0]

    def step(m, caps):   # best u for rows of m (each row minimises r*u + sum max(0, m - u))
        k = np.clip(caps.astype(int), 0, m.shape[1] - 1)
        if (k == k[0]).all():   # one cap for all rows: a selection instead of a sort
            kth = np.partition(m, m.shape[1] - 1 - k[0], axis=1)[:, m.shape[1] - 1 - k[0]]
        else:
            kth = -np.sort(-m, axis=1)[np.arange(m.shape[0]), k]
        return np.maximum(np.where(caps >= m.shape[1], 0.0, kth), 0.0)

    def value(u, v):
        return float(cap_row_E @ u + cap_col_E @ v + np.maximum(0.0, a_EE - u[:, None] - v[None, :]).sum())

    u, v = (np.zeros(E), np.zeros(E)) if start is None else (np.asarray(start[0]), np.asarray(start[1]))
    best = value(u, v)
    best_uv = (u, v)
    history = [best]
    for t in range(iters):
        if t % 2 == 0:
            u = step(a_EE - v[None, :], cap_row_E)
        else:
            v = step((a_EE - u[:, None]).T, cap_col_E)
        val = value(u, v)
        if val < best:
            best, best_uv = val, (u, v)
        history.append(best)
        if t >= 3 and history[-4] - best <= 1e-7 * best:   # a full round of both sides gained nothing
            break
    return best, best_uv


def colocation_upper(a_EE: np.ndarray, cap_row_E: np.ndarray, cap_col_E: np.ndarray, total_pairs: float,
                     time_limit: float = 10.0, lp_max_experts: int = 128, start=None) -> tuple[float, str, tuple]:
    """Max co-located weight of one layer pair over b-matchings; returns (value, method, dual point or None).

    a_EE: [E, E] affinity; cap_row_E / cap_col_E: [E] co-location degree caps; total_pairs: cap on
    the number of co-located (i, j) pairs; start: a dual point from a previous call (see dual_coordinate_bound).
    """
    cheap = _row_col_bound(a_EE, cap_row_E, cap_col_E)
    if a_EE.shape[0] > lp_max_experts:
        dual, uv = dual_coordinate_bound(a_EE, cap_row_E, cap_col_E, start=start)
        return min(cheap, dual), "b-matching-dual", uv
    ii, jj = np.nonzero(a_EE > 0)
    n = len(ii)
    if n == 0:
        return 0.0, "empty", None
    E = a_EE.shape[0]
    rows = np.r_[ii, E + jj, np.full(n, 2 * E)]
    cols = np.r_[np.arange(n), np.arange(n), np.arange(n)]
    A = sparse.csr_array((np.ones(3 * n), (rows, cols)), shape=(2 * E + 1, n))
    b = np.r_[cap_row_E, cap_col_E, total_pairs].astype(float)
    res = linprog(-a_EE[ii, jj], A_ub=A, b_ub=b, bounds=(0, 1), method="highs",
                  options={"time_limit": time_limit, "presolve": True})
    if res.status != 0:   # LP out of time: its dual, improved by coordinate steps, is still valid
        dual, uv = dual_coordinate_bound(a_EE, cap_row_E, cap_col_E, start=start)
        return min(cheap, dual), "b-matching-dual", uv
    # the LP dual gives an exact certificate; use the primal value (HiGHS optimal) but never above cheap
    return min(cheap, float(-res.fun)), "b-matching-lp", None


@dataclass(frozen=True, eq=False)
class PairBound:
    """value: proven lower bound on the cost per token; info: how (for reports); state: per layer pair, the
    dual points of the b-matching levels and the spectral diagonal (None where unused), which warm-start the
    next bound on drifted counts (every point is valid for any counts, so a warm bound is valid at once)."""

    value: float
    info: dict
    state: tuple | None = None


def pair_lower_bound(problem: AffinityProblem, spec: PlaceSpec, copies_LE: np.ndarray,
                     time_limit: float = 60.0, state: tuple | None = None, spectral: bool = True,
                     spectral_evals: int = 120) -> PairBound:
    """Valid lower bound on the (topology-weighted) cost per token.

    Steps: 1. b-matching bound of every pair at worker and node level; 2. with several nodes and no
    replicas (and ``spectral``), the spectral partition bound (spectral.py, at most ``spectral_evals``
    eigenvalue evaluations a pair) of every pair's node level in the time left; the smaller node-level
    co-location is kept. Both start from ``state`` when given.
    """
    t0 = time.perf_counter()
    E, G = problem.num_experts, spec.num_workers
    S = spec.slots(E)
    topo = spec.topology
    alpha = topo.inter_node_cost if topo.num_nodes > 1 else 1.0
    levels = [(S, G, 1.0, G)]
    nodes = topo.num_nodes > 1 and alpha != 1.0
    if nodes:
        levels.append((S * topo.workers_per_node, topo.num_nodes, alpha - 1.0, topo.num_nodes))
    spectral = spectral and nodes and bool((copies_LE == 1).all()) and E % topo.num_nodes == 0
    P = problem.aff_PEE.shape[0]
    fits = state is not None and len(state) == P and len(state[0]) == len(levels) + 1
    warm_P = state if fits else [(None,) * (len(levels) + 1)] * P
    tot_P = problem.aff_PEE.sum((1, 2))
    uv_PV = [[None] * len(levels) for _ in range(P)]
    up_PV = np.zeros((P, len(levels)))
    methods = set()
    # 1. b-matching (half the time when the spectral bound follows)
    budget = time_limit * (0.5 if spectral else 1.0)
    for l in range(P):
        for v, (size, groups, _, max_copies) in enumerate(levels):
            left = max(0.1, budget - (time.perf_counter() - t0)) / max(1, P - l)
            cap_r = size * np.minimum(copies_LE[l], max_copies)
            cap_c = size * np.minimum(copies_LE[l + 1], max_copies)
            up_PV[l, v], how, uv_PV[l][v] = colocation_upper(problem.aff_PEE[l], cap_r, cap_c,
                                                             groups * size * size, left, start=warm_P[l][v])
            methods.add(how)
    # 2. spectral node level
    d_P = [None] * P
    if spectral:
        for l in range(P):
            left = (time_limit - (time.perf_counter() - t0)) / (P - l)
            if left <= 0:   # out of time: keep the b-matching value and carry the old diagonal forward
                d_P[l] = warm_P[l][-1]
                continue
            up, d_P[l] = partition_upper(problem.aff_PEE[l], topo.num_nodes, d0=warm_P[l][-1], time_limit=left,
                                         max_evals=spectral_evals)
            if up < up_PV[l, 1]:
                up_PV[l, 1] = up
                methods.add("spectral")
    gain_V = np.array([lv[2] for lv in levels])
    bound = float(((tot_P[:, None] - up_PV) * gain_V).sum())
    return PairBound(bound, {"bound_method": "per-pair " + "/".join(sorted(methods)),
                             "bound_seconds": round(time.perf_counter() - t0, 3)},
                     tuple(tuple(uv_PV[l]) + (d_P[l],) for l in range(P)))
