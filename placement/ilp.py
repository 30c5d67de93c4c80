"""Exact integer program for expert placement, solved by HiGHS (via scipy.optimize.milp).

Glossary
  x[l, e, g]     binary: worker g holds expert e of layer l
  z[l, i, j, g]  in [0, 1]: transition (l, i) -> (l+1, j) can stay on worker g  (z <= both x)
  loc[l, i, j]   in [0, 1]: the transition is local (loc <= sum_g z)
  zn / locn      the same at node level, for topology-weighted costs

Objective (minimise): sum_l sum_ij aff[l,i,j] * (1 - loc + (inter_cost - 1) * (1 - locn)), i.e. the
expected (weighted) cross-worker transitions per token. Strengthening cuts: sum_j z[l,i,j,g] <=
slots * x[l,i,g] (and symmetrically), which make the LP relaxation a b-matching per layer pair.
Symmetry: relabelling workers changes nothing, so on one node expert e of layer 0 may only use
workers 0..e; with several nodes or replicas only x[0, 0, 0] = 1 is fixed.

Only small instances (a few layers, E <= ~16) prove optimal quickly; the size grows as L*E^2*G.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .problem import AffinityProblem
from .spec import PlaceSpec, balance_cap_L


@dataclass(frozen=True, eq=False)
class IlpResult:
    """member_LEG: [L, E, G] bool placement (None if no incumbent); objective/bound per token."""

    member_LEG: np.ndarray | None
    objective: float
    bound: float
    status: str
    seconds: float


class _Model:
    """Sparse MILP builder: variables get column ids, constraints are collected as COO triplets."""

    def __init__(self):
        self.n, self.c, self.lo, self.hi, self.integ = 0, [], [], [], []
        self.rows, self.cols, self.vals, self.rlo, self.rhi = [], [], [], [], []

    def var(self, count, cost=0.0, lo=0.0, hi=1.0, integer=False):
        ids = np.arange(self.n, self.n + count)
        self.n += count
        self.c.append(np.broadcast_to(np.asarray(cost, float), (count,)))
        self.lo.append(np.full(count, lo, float))
        self.hi.append(np.broadcast_to(np.asarray(hi, float), (count,)).copy())
        self.integ.append(np.full(count, int(integer)))
        return ids

    def row(self, cols_list, vals_list, lo, hi):
        """Add len(lo) rows; cols_list[r] / vals_list[r] are the r-th row's entries."""
        base = len(self.rlo)
        for r, (cs, vs) in enumerate(zip(cols_list, vals_list)):
            self.rows.append(np.full(len(cs), base + r))
            self.cols.append(np.asarray(cs))
            self.vals.append(np.asarray(vs, float))
        self.rlo.extend(np.broadcast_to(lo, (len(cols_list),)))
        self.rhi.extend(np.broadcast_to(hi, (len(cols_list),)))

    def solve(self, time_limit, gap=1e-6):
        A = sparse.csr_array((np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
                             shape=(len(self.rlo), self.n))
        return milp(np.concatenate(self.c), integrality=np.concatenate(self.integ),
                    bounds=Bounds(np.concatenate(self.lo), np.concatenate(self.hi)),
                    constraints=LinearConstraint(A, np.array(self.rlo), np.array(self.rhi)),
                    options={"time_limit": float(time_limit), "mip_rel_gap": gap, "disp": False})


def solve_exact(problem: AffinityProblem, spec: PlaceSpec, copies_LE: np.ndarray,
                time_limit: float = 30.0) -> IlpResult:
    """Solve the placement MILP with HiGHS; ``bound`` is HiGHS's proven dual bound.

    copies_LE: [L, E] copies per expert (ones without replication).
    """
    import time
    t0 = time.perf_counter()
    L, E, G = problem.num_layers, problem.num_experts, spec.num_workers
    S = spec.slots(E)
    topo = spec.topology
    node_of = topo.node_of_G
    alpha = topo.inter_node_cost if topo.num_nodes > 1 else 1.0
    m = _Model()
    x = m.var(L * E * G, integer=True).reshape(L, E, G)
    # symmetry breaking (see module docstring)
    hi = np.ones((L, E, G))
    if topo.num_nodes == 1 and (copies_LE[0] == 1).all():
        hi[0][np.arange(E)[:, None] < np.arange(G)[None, :]] = 0.0
    else:
        m.lo[0][0] = 1.0          # some copy of (layer 0, expert 0) may be assumed on worker 0
    m.hi[0][:] = hi.ravel()
    m.row([x[l, e] for l in range(L) for e in range(E)], [np.ones(G)] * (L * E),
          copies_LE.ravel().astype(float), copies_LE.ravel().astype(float))
    m.row([x[l, :, g] for l in range(L) for g in range(G)], [np.ones(E)] * (L * G), S, S)
    if spec.balance is not None:
        cap_L = balance_cap_L(problem.load_LE, G, spec.balance)
        per_copy_LE = problem.load_LE / copies_LE
        m.row([x[l, :, g] for l in range(L) for g in range(G)],
              [per_copy_LE[l] for l in range(L) for g in range(G)], -np.inf, np.repeat(cap_L, G))
    const = 0.0
    for l in range(L - 1):
        a = problem.aff_PEE[l]
        ii, jj = np.nonzero(a)
        w = a[ii, jj]
        const += alpha * w.sum()
        n = len(ii)
        for level, groups, gain in (("worker", [[g] for g in range(G)], 1.0),
                                    ("node", [list(np.flatnonzero(node_of == k)) for k in range(topo.num_nodes)],
                                     alpha - 1.0)):
            if gain == 0.0 or (level == "node" and topo.num_nodes == 1):
                continue
            K, size = len(groups), len(groups[0]) * S
            z = m.var(n * K).reshape(n, K)
            loc = m.var(n, cost=-gain * w)
            m.row([np.r_[loc[p], z[p]] for p in range(n)], [np.r_[1.0, -np.ones(K)]] * n, -np.inf, 0.0)
            for k, grp in enumerate(groups):
                # z <= sum_{g in grp} x at both ends
                m.row([np.r_[z[p, k], x[l, ii[p], grp]] for p in range(n)],
                      [np.r_[1.0, -np.ones(len(grp))]] * n, -np.inf, 0.0)
                m.row([np.r_[z[p, k], x[l + 1, jj[p], grp]] for p in range(n)],
                      [np.r_[1.0, -np.ones(len(grp))]] * n, -np.inf, 0.0)
                # b-matching cuts: one expert stays with at most `size` experts of the other layer
                for side, idx, lay in ((ii, np.arange(E), l), (jj, np.arange(E), l + 1)):
                    sel = [np.flatnonzero(side == e) for e in idx]
                    rows = [(np.r_[z[s, k], x[lay, e, grp]], np.r_[np.ones(len(s)), -size * np.ones(len(grp))])
                            for e, s in zip(idx, sel) if len(s)]
                    if rows:
                        m.row([r[0] for r in rows], [r[1] for r in rows], -np.inf, 0.0)
    res = m.solve(time_limit)
    secs = time.perf_counter() - t0
    status = {0: "optimal", 1: "time_limit", 2: "infeasible"}.get(res.status, f"highs_status_{res.status}")
    if res.x is None:
        bound = const + float(getattr(res, "mip_dual_bound", np.nan) or np.nan)
        return IlpResult(None, np.inf, bound if np.isfinite(bound) else 0.0, status, secs)
    member = np.round(res.x[x.ravel()]).reshape(L, E, G).astype(bool)
    obj = const + float(res.fun)
    bound = const + float(res.mip_dual_bound) if res.mip_dual_bound is not None else 0.0
    return IlpResult(member, obj, min(bound, obj), status, secs)
