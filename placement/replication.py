"""Replica placement: put extra copies of hot experts where they keep the most tokens local.

Glossary
  primary   the one copy of every expert placed by the solver (worker_LE)
  replica   an extra copy (EPLB "redundant expert"); copies_LE says how many each expert gets
  gain      affinity of a copy to neighbour-layer experts on its worker that are not yet reachable
            locally from any existing copy (a token may use any replica)
  guard     a replica may not raise the layer's max worker load (load splits evenly over copies),
            and must respect the balance cap when one is set, whenever such a worker exists
"""
from __future__ import annotations

import numpy as np

from .errors import PlacementError


def add_replicas(worker_LE: np.ndarray, copies_LE: np.ndarray, aff_PEE: np.ndarray, load_LE: np.ndarray,
                 num_workers: int, slots: int, cap_L: np.ndarray | None = None,
                 penalty_LEG: np.ndarray | None = None) -> np.ndarray:
    """Membership [L, E, G] with the primaries of ``worker_LE`` plus copies_LE - 1 replicas each.

    worker_LE: [L, E] primary workers; copies_LE: [L, E]; aff_PEE: [L-1, E, E]; load_LE: [L, E];
    cap_L: [L] optional max expected tokens per worker; penalty_LEG: [L, E, G] optional cost of a copy on
    each worker (a move's cost when re-placing, see rebalance.py), subtracted from the gain.
    """
    L, E = worker_LE.shape
    G = num_workers
    member = np.zeros((L, E, G), dtype=bool)
    member[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE] = True
    for l in range(L):
        free_G = slots - member[l].sum(0)
        copies_E = np.ones(E, dtype=np.int64)
        todo = [e for e in np.argsort(-load_LE[l] / copies_LE[l], kind="stable") for _ in range(copies_LE[l, e] - 1)]
        todo.sort(key=lambda e: -copies_LE[l, e])   # most-replicated first avoids dead ends
        for e in todo:
            ok_G = (free_G > 0) & ~member[l, e]
            if not ok_G.any():
                _make_room(member[l], free_G, e)
                ok_G = (free_G > 0) & ~member[l, e]
            share = load_LE[l, e] / (copies_E[e] + 1)
            base = _worker_load(member[l], load_LE[l], copies_E)
            new_base = base - member[l, e] * (load_LE[l, e] / copies_E[e] - share)
            new_max_G = np.maximum(new_base.max(), new_base + share)   # max load if copy goes to g
            limit = base.max() if cap_L is None else max(min(base.max(), cap_L[l]), 0.0)
            allowed = ok_G & (new_max_G <= limit + 1e-12)
            if not allowed.any():
                allowed = ok_G & (new_max_G <= new_max_G[ok_G].min() + 1e-12)
            gain_G = _gain(member, aff_PEE, l, e)
            if penalty_LEG is not None:
                gain_G = gain_G - penalty_LEG[l, e]
            g = int(np.flatnonzero(allowed)[np.argmax(gain_G[allowed])])
            member[l, e, g] = True
            free_G[g] -= 1
            copies_E[e] += 1
        if cap_L is not None:
            _repair_balance(member[l], load_LE[l], cap_L[l])
    return member


def _repair_balance(m_EG, load_E, cap, max_steps=200):
    """Swap copies between the most loaded worker and others until every worker is under ``cap``
    (or no swap lowers the overload). Copies stay on distinct workers; slot counts are unchanged."""
    per_copy_E = load_E / np.maximum(m_EG.sum(1), 1)
    for _ in range(max_steps):
        ld_G = (m_EG * per_copy_E[:, None]).sum(0)
        o = int(np.argmax(ld_G))
        if ld_G[o] <= cap * (1 + 1e-9):
            return
        best, move = 0.0, None
        for x in np.flatnonzero(m_EG[:, o]):
            for h in np.flatnonzero(~m_EG[x]):
                ys = np.flatnonzero(m_EG[:, h] & ~m_EG[:, o])
                if not len(ys):
                    continue
                d = per_copy_E[x] - per_copy_E[ys]                 # load leaving o
                new_peak = np.maximum(ld_G[o] - d, ld_G[h] + d)
                k = int(np.argmin(new_peak))
                gain = ld_G[o] - new_peak[k]
                if gain > best + 1e-12:
                    best, move = gain, (x, h, ys[k])
        if move is None:
            return
        x, h, y = move
        m_EG[x, o], m_EG[x, h], m_EG[y, h], m_EG[y, o] = False, True, False, True


def _worker_load(m_EG, load_E, copies_E):
    return (m_EG * (load_E / copies_E)[:, None]).sum(0)


def _gain(member, aff_PEE, l, e):
    """[G] affinity newly made local by a copy of (l, e) on each worker."""
    L, E, G = member.shape
    gain = np.zeros(G)
    for nb, a_E in ((l - 1, aff_PEE[l - 1][:, e] if l > 0 else None),
                    (l + 1, aff_PEE[l][e] if l < L - 1 else None)):
        if a_E is None:
            continue
        reach_E = (member[nb] & member[l, e][None, :]).any(1)     # neighbours already local
        gain += (member[nb] * (a_E * ~reach_E)[:, None]).sum(0)
    return gain


def _make_room(m_EG, free_G, e):
    """Every free slot is on a worker already holding e: move some other replica there instead."""
    g_free = int(np.flatnonzero(free_G > 0)[0])
    for h in np.flatnonzero(~m_EG[e]):
        movable = np.flatnonzero(m_EG[:, h] & ~m_EG[:, g_free])
        if len(movable):
            x = movable[0]
            m_EG[x, h], m_EG[x, g_free] = False, True
            free_G[h] += 1
            free_G[g_free] -= 1
            return
    raise PlacementError(f"cannot place another copy of expert {e}: every worker with a free slot holds it")
