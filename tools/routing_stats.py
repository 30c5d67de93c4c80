"""Routing-health statistics of a routing trace (``moe/default_model/trace.npz``).

Shapes: T traced tokens, L MoE layers, K experts per token, E experts per layer.
"""

from __future__ import annotations

import numpy as np


def expert_load(experts_TLK: np.ndarray, E: int) -> np.ndarray:
    """[L, E] number of (token, choice) assignments per expert."""
    T, L, K = experts_TLK.shape
    return np.stack([np.bincount(experts_TLK[:, l].reshape(-1).astype(np.int64), minlength=E)
                     for l in range(L)])


def load_imbalance(experts_TLK: np.ndarray, E: int) -> np.ndarray:
    """[L] max/mean expert load per layer (1 = perfectly balanced)."""
    load = expert_load(experts_TLK, E).astype(np.float64)
    return load.max(1) / load.mean(1)


def transition_counts(experts_TLK: np.ndarray, E: int) -> np.ndarray:
    """[L-1, E, E]: entry (l, i, j) counts tokens' (choice at layer l = i, choice at layer l+1 = j) pairs."""
    T, L, K = experts_TLK.shape
    out = np.zeros((L - 1, E, E), dtype=np.int64)
    for l in range(L - 1):
        a = experts_TLK[:, l].astype(np.int64)       # [T, K]
        b = experts_TLK[:, l + 1].astype(np.int64)
        pair = (a[:, :, None] * E + b[:, None, :]).reshape(-1)
        out[l] = np.bincount(pair, minlength=E * E).reshape(E, E)
    return out


def affinity(experts_TLK: np.ndarray, E: int) -> tuple[float, np.ndarray]:
    """Inter-layer affinity: mean over (layer l, expert i) of max_j P(expert j at l+1 | expert i at l).

    Uniform routing gives 1/E. Returns (mean, [L-1] per-layer means). Experts never chosen at l are skipped.
    """
    C = transition_counts(experts_TLK, E).astype(np.float64)
    rows = C.sum(-1)                                  # [L-1, E]
    with np.errstate(invalid="ignore", divide="ignore"):
        pmax = C.max(-1) / rows
    per_layer = np.array([np.nanmean(p) for p in pmax])
    return float(np.nanmean(pmax)), per_layer


def domain_lift(experts_TLK: np.ndarray, domain_T: np.ndarray, E: int, layer: int) -> np.ndarray:
    """[n_domains, E] P(expert | domain) / P(expert) at ``layer`` (1 = no specialisation)."""
    nd = int(domain_T.max()) + 1
    overall = np.bincount(experts_TLK[:, layer].reshape(-1).astype(np.int64), minlength=E).astype(np.float64)
    overall /= overall.sum()
    out = np.zeros((nd, E))
    for d in range(nd):
        c = np.bincount(experts_TLK[domain_T == d, layer].reshape(-1).astype(np.int64), minlength=E).astype(float)
        out[d] = (c / max(c.sum(), 1)) / np.maximum(overall, 1e-12)
    return out
