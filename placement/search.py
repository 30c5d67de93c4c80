"""Scalable placement search: block-coordinate descent with exact per-layer re-solves.

Glossary
  worker_LE    [L, E] worker of every expert (one copy each; replicas are added afterwards)
  layer move   re-place all experts of one layer optimally with both neighbouring layers fixed. The
               cost of expert i on worker g is linear (sum of its affinities to the neighbours' workers
               times crossing costs), so the move is a transportation problem: solved exactly by
               linear_sum_assignment over slot-expanded columns, or by a small HiGHS MIP when the
               load-balance side constraint is on
  suffix move  relabel the workers of layers l..L-1 by one permutation, chosen by a G x G assignment;
               only the (l-1, l) pair changes on one node. Escapes optima single-layer moves cannot
  kick         randomly swap some experts of a few layers, then descend again (iterated local search)
  penalty_LEG  optional [L, E, G] cost (objective units) of putting expert e of layer l on worker g, e.g. the
               cost of moving it there from where it is now (rebalance.py). It adds to every layer move's cost
               matrix and to every suffix move's G x G matrix (the experts of layers >= l on worker g going to
               v), so both stay exact; fresh starts are skipped under a penalty (they ignore where experts are)
"""
from __future__ import annotations

import time

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from .errors import PlacementError


# Dense BLAS calls on tiny matrices are slow when cores are shared, so the hot paths below use
# bincount / reshapes instead of matrix products.

def apply_cost(w_XG: np.ndarray, node_of_G: np.ndarray, alpha: float) -> np.ndarray:
    """[X, G] = w_XG @ cost_GG for the topology cost (0 same worker, 1 same node, alpha otherwise)."""
    tot_X1 = w_XG.sum(1, keepdims=True)
    out = tot_X1 - w_XG
    N = int(node_of_G[-1]) + 1
    if N > 1 and alpha != 1.0:
        wn_XN = w_XG.reshape(w_XG.shape[0], N, -1).sum(-1)
        out = out + (alpha - 1.0) * (tot_X1 - wn_XN[:, node_of_G])
    return out


def expert_to_worker_EG(a_EE: np.ndarray, w_E: np.ndarray, G: int) -> np.ndarray:
    """[E, G]: affinity of each row expert to the experts (columns) held by each worker."""
    order = np.argsort(w_E, kind="stable")
    counts = np.bincount(w_E, minlength=G)
    if (counts == counts[0]).all():
        return a_EE[:, order].reshape(a_EE.shape[0], G, -1).sum(-1)
    out = np.zeros((a_EE.shape[0], G))
    np.add.at(out.T, w_E, a_EE.T)
    return out


def worker_flow_GG(worker_LE, aff_PEE, l, G):
    """[G, G] affinity from workers of layer l to workers of layer l+1."""
    idx = worker_LE[l][:, None] * G + worker_LE[l + 1][None, :]
    return np.bincount(idx.ravel(), aff_PEE[l].ravel(), G * G).reshape(G, G)


def total_cost(worker_LE: np.ndarray, aff_PEE: np.ndarray, cost_GG: np.ndarray) -> float:
    """Objective: sum_l sum_ij aff[l,i,j] * cost[w(l,i), w(l+1,j)]."""
    G = cost_GG.shape[0]
    return float(sum((worker_flow_GG(worker_LE, aff_PEE, l, G) * cost_GG).sum()
                     for l in range(aff_PEE.shape[0])))


def best_relabel(K_GG: np.ndarray, node_of_G: np.ndarray) -> np.ndarray:
    """Permutation perm minimising sum_g K[g, perm[g]] among relabellings that keep the topology:
    nodes map to nodes (as whole blocks), workers within them arbitrarily. Exact: an assignment of
    nodes whose costs are the inner worker assignments."""
    nodes = np.unique(node_of_G)
    if len(nodes) == 1:
        return linear_sum_assignment(K_GG)[1]
    members = [np.flatnonzero(node_of_G == n) for n in nodes]
    inner = {}
    cost_NN = np.zeros((len(nodes), len(nodes)))
    for a, ma in enumerate(members):
        for b, mb in enumerate(members):
            r, c = linear_sum_assignment(K_GG[np.ix_(ma, mb)])
            cost_NN[a, b] = K_GG[np.ix_(ma, mb)][r, c].sum()
            inner[a, b] = mb[c]
    _, node_perm = linear_sum_assignment(cost_NN)
    perm = np.empty(len(node_of_G), dtype=np.int64)
    for a, ma in enumerate(members):
        perm[ma] = inner[a, node_perm[a]]
    return perm


def layer_cost_EG(worker_LE, aff_PEE, cost_GG, l, G):
    """[E, G] cost of putting each expert of layer l on each worker, neighbours fixed."""
    L = worker_LE.shape[0]
    node_of_G, alpha = _topo_of(cost_GG)
    w = np.zeros((worker_LE.shape[1], G))
    if l > 0:
        w += expert_to_worker_EG(aff_PEE[l - 1].T, worker_LE[l - 1], G)
    if l < L - 1:
        w += expert_to_worker_EG(aff_PEE[l], worker_LE[l + 1], G)
    return apply_cost(w, node_of_G, alpha)   # cost_GG is symmetric


def _topo_of(cost_GG):
    """Recover (node_of_G, alpha) from a topology cost matrix (see Topology.cost_GG)."""
    alpha = float(cost_GG.max()) if cost_GG.shape[0] > 1 else 1.0
    if alpha <= 1.0:
        return np.zeros(cost_GG.shape[0], dtype=np.int64), 1.0
    wpn = int((cost_GG[0] <= 1.0).sum())
    return np.arange(cost_GG.shape[0]) // wpn, alpha


class LayerSolver:
    """Exact single-layer assignment (at most S experts per worker), with an optional load cap.

    Without a cap the move is exact (linear_sum_assignment). With a cap the assignment is repaired by
    cost-aware swaps; if repair fails, a HiGHS MIP with the cap is tried within ``mip_time``.
    """

    def __init__(self, G: int, S: int, load_LE: np.ndarray | None = None, cap_L: np.ndarray | None = None,
                 mip_time: float = 5.0):
        self.G, self.S, self.load_LE, self.cap_L, self.mip_time = G, S, load_LE, cap_L, mip_time

    def solve(self, cost_EG: np.ndarray, l: int, current_E: np.ndarray | None = None) -> np.ndarray:
        E, G, S = cost_EG.shape[0], self.G, self.S
        _, col = linear_sum_assignment(np.repeat(cost_EG, S, axis=1))
        new = col // S
        if self.cap_L is None or self.feasible(new, l):
            return new
        new = self._repair(cost_EG, new, l)
        if new is not None:
            return new
        if current_E is not None and self.feasible(current_E, l):
            return current_E
        new = self._mip(cost_EG, l)
        if new is None:
            load_E, cap = self.load_LE[l], self.cap_L[l]
            raise PlacementError(
                f"load balance infeasible at layer {l}: could not place {E} experts on {G} workers with "
                f"<= {cap:.4g} expected tokens each (mean {load_E.sum() / G:.4g}); raise --balance or add --replicas")
        return new

    def feasible_all(self, worker_LE) -> bool:
        return self.cap_L is None or all(self.feasible(worker_LE[l], l) for l in range(len(worker_LE)))

    def feasible(self, w_E, l):
        return np.bincount(w_E, self.load_LE[l], self.G).max() <= self.cap_L[l] * (1 + 1e-9)

    def _repair(self, cost_EG, w_E, l, max_steps=None):
        """Swap experts between an overloaded worker and others until loads fit, cheapest first."""
        load_E, cap, G = self.load_LE[l], self.cap_L[l], self.G
        w = w_E.copy()
        for _ in range(max_steps or 4 * len(w)):
            ld_G = np.bincount(w, load_E, G)
            over = ld_G - cap
            if over.max() <= cap * 1e-9:
                return w
            o = int(np.argmax(over))
            a = np.flatnonzero(w == o)                       # candidates leaving o
            b = np.flatnonzero(w != o)                       # candidates entering o
            h = w[b]
            d = load_E[a][:, None] - load_E[b][None, :]      # load moved out of o
            new_o, new_h = ld_G[o] - d, ld_G[h][None, :] + d
            viol_before = max(over[o], 0) + np.maximum(over[h], 0)[None, :]
            viol_after = np.maximum(new_o - cap, 0) + np.maximum(new_h - cap, 0)
            dv = viol_after - viol_before
            dc = (cost_EG[a][:, h] + cost_EG[b, o][None, :] - cost_EG[a, o][:, None] - cost_EG[b, h][None, :])
            score = np.where(dv < -1e-15, dc / np.maximum(-dv, 1e-15), np.inf)
            k = int(np.argmin(score))
            if not np.isfinite(score.flat[k]):
                return None
            ia, ib = np.unravel_index(k, score.shape)
            w[a[ia]], w[b[ib]] = h[ib], o
        return w if self.feasible(w, l) else None

    def _mip(self, cost_EG, l):
        E, G, S = cost_EG.shape[0], self.G, self.S
        A_count = sparse.kron(sparse.eye(E), np.ones((1, G)))
        A_slots = sparse.kron(np.ones((1, E)), sparse.eye(G))
        A_load = sparse.kron(self.load_LE[l][None, :], sparse.eye(G))
        res = milp(cost_EG.ravel(), integrality=np.ones(E * G), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(A_count, 1, 1), LinearConstraint(A_slots, 0, S),
                                LinearConstraint(A_load, -np.inf, self.cap_L[l])],
                   options={"time_limit": self.mip_time, "disp": False, "mip_rel_gap": 1e-3})
        return None if res.x is None else res.x.reshape(E, G).argmax(1)


def penalised_cost(worker_LE, aff_PEE, cost_GG, penalty_LEG=None) -> float:
    """total_cost plus the penalty of every expert's worker."""
    c = total_cost(worker_LE, aff_PEE, cost_GG)
    if penalty_LEG is None:
        return c
    L, E = worker_LE.shape
    return c + float(penalty_LEG[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE].sum())


def suffix_penalty_LGG(worker_LE, penalty_LEG):
    """[L, G, G]: penalty change if the experts of layers >= l now on worker g moved to worker v."""
    L, E = worker_LE.shape
    G = penalty_LEG.shape[2]
    own_LE = penalty_LEG[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE]
    on_LEG = np.zeros((L, E, G))
    on_LEG[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE] = 1.0
    per_LGG = np.einsum("leg,lev->lgv", on_LEG, penalty_LEG - own_LE[..., None])
    return np.cumsum(per_LGG[::-1], axis=0)[::-1]


def descend(worker_LE, aff_PEE, cost_GG, layer_solver, deadline, node_of_G, *, dirty=None,
            suffix_moves=True, tol=1e-12, penalty_LEG=None):
    """Layer moves (alternating sweep direction) on layers whose neighbours changed, plus suffix
    moves, until nothing improves or the deadline passes. Returns (worker_LE, penalised cost)."""
    L, G = worker_LE.shape[0], cost_GG.shape[0]
    alpha = _topo_of(cost_GG)[1]
    w = worker_LE.copy()
    dirty = set(range(L)) if dirty is None else set(dirty)
    forward = True
    while dirty and time.perf_counter() < deadline:
        for l in (range(L) if forward else range(L - 1, -1, -1)):
            if l not in dirty:
                continue
            dirty.discard(l)
            c = layer_cost_EG(w, aff_PEE, cost_GG, l, G)
            if penalty_LEG is not None:
                c = c + penalty_LEG[l]
            new = layer_solver.solve(c, l, w[l])
            if c[np.arange(len(new)), new].sum() < c[np.arange(len(new)), w[l]].sum() - tol:
                w[l] = new
                dirty.update(x for x in (l - 1, l + 1) if 0 <= x < L)
            if time.perf_counter() > deadline:
                break
        forward = not forward
        if suffix_moves and not dirty:
            pen_LGG = None if penalty_LEG is None else suffix_penalty_LGG(w, penalty_LEG)
            for l in range(1, L):
                K = apply_cost(worker_flow_GG(w, aff_PEE, l - 1, G).T, node_of_G, alpha)  # cur g -> v
                if pen_LGG is not None:
                    K = K + pen_LGG[l]
                perm = best_relabel(K, node_of_G)
                if K[np.arange(G), perm].sum() < np.trace(K) - tol:
                    w[l:] = perm[w[l:]]   # topology-preserving, so only pair (l-1, l) changes
                    dirty.update((l - 1, l))
                    if pen_LGG is not None:
                        pen_LGG = suffix_penalty_LGG(w, penalty_LEG)
    return w, penalised_cost(w, aff_PEE, cost_GG, penalty_LEG)


def greedy_chain(aff_PEE, cost_GG, layer_solver, G, S, E, rng, start_layer=None):
    """Initial solution: place one layer at random, then each neighbour given the previous one."""
    L = aff_PEE.shape[0] + 1
    w = np.zeros((L, E), dtype=np.int64)
    s = int(rng.integers(L)) if start_layer is None else start_layer
    w[s] = layer_solver.solve(rng.random((E, G)) * 1e-9, s)
    for l in list(range(s + 1, L)):
        c = layer_cost_EG(np.stack([w[l - 1], w[l - 1]]), aff_PEE[l - 1:l], cost_GG, 1, G)
        w[l] = layer_solver.solve(c, l)
    for l in range(s - 1, -1, -1):
        c = layer_cost_EG(np.stack([w[l + 1], w[l + 1]]), aff_PEE[l:l + 1], cost_GG, 0, G)
        w[l] = layer_solver.solve(c, l)
    return w


def kick(worker_LE, rng, strength=0.2, layers=3):
    """Perturb: in a few random layers swap a fraction of expert pairs; returns (worker_LE, layers)."""
    w = worker_LE.copy()
    L, E = w.shape
    touched = rng.choice(L, size=min(layers, L), replace=False)
    for l in touched:
        for _ in range(max(1, int(strength * E / 2))):
            a, b = rng.integers(E, size=2)
            w[l, a], w[l, b] = w[l, b], w[l, a]
    return w, list(touched)


def local_search(aff_PEE, cost_GG, node_of_G, S, layer_solver, time_limit, seed=0, init=None, target=None,
                 penalty_LEG=None):
    """Iterated local search; returns (best worker_LE, penalised cost, iterations). Stops early at ``target``."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    rng = np.random.default_rng(seed)
    G = len(node_of_G)
    E = aff_PEE.shape[1]
    L = aff_PEE.shape[0] + 1
    w0 = init if init is not None else greedy_chain(aff_PEE, cost_GG, layer_solver, G, S, E, rng, L // 2)
    best_w, best = descend(w0, aff_PEE, cost_GG, layer_solver, deadline, node_of_G, penalty_LEG=penalty_LEG)
    cur_w, cur = best_w, best
    it = 0
    while time.perf_counter() < deadline and (target is None or best > target):
        it += 1
        fresh = it % 8 == 0 and penalty_LEG is None
        if fresh:   # occasional fresh start from another layer
            trial = greedy_chain(aff_PEE, cost_GG, layer_solver, G, S, E, rng)
        else:
            trial, touched = kick(cur_w, rng, strength=float(rng.uniform(0.05, 0.3)),
                                  layers=int(rng.integers(1, 4)))
        dirty = None if fresh else {x for l in touched for x in (l - 1, l, l + 1) if 0 <= x < L}
        trial, c = descend(trial, aff_PEE, cost_GG, layer_solver, deadline, node_of_G, dirty=dirty,
                           penalty_LEG=penalty_LEG)
        if not layer_solver.feasible_all(trial):   # a kick cut short by the deadline
            continue
        if c < cur - 1e-12:
            cur_w, cur = trial, c
        if c < best - 1e-12:
            best_w, best = trial, c
        if it % 8 == 0:
            cur_w, cur = best_w, best
    return best_w, best, it
