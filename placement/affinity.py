"""Affinity statistics: from token traces or from precomputed count matrices.

Glossary
  T tokens, L layers, k top-k slots, E experts, P = L-1 layer pairs
  counts_PEE[l, i, j]  transitions expert i at layer l -> expert j at layer l+1, over all k x k pairs
  load_LE[l, i]        tokens routed to expert i at layer l
  smoothing            pseudo-tokens drawn from the independence prior outer(load_l, load_l+1);
                       shrinks noisy affinities of few-token traces toward "no affinity"
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from .errors import PlacementError
from .problem import AffinityProblem
from .trace import Trace


def transition_counts(trace: Trace, *, weighted: bool = False) -> np.ndarray:
    """Counts [L-1, E, E] of expert i at layer l followed by expert j at layer l+1 (all k x k pairs).

    With ``weighted`` each pair counts gate_weight(l, i) * gate_weight(l+1, j) instead of 1.
    """
    x_TLk, E = trace.experts_TLk, trace.num_experts
    T, L, k = x_TLk.shape
    if weighted and trace.weights_TLk is None:
        raise PlacementError("weighted affinity requested but the trace has no 'weights' array")
    counts_PEE = np.zeros((L - 1, E, E))
    for l in range(L - 1):
        a_Tk, b_Tk = x_TLk[:, l, :], x_TLk[:, l + 1, :]
        src = np.repeat(a_Tk, k, axis=1).ravel()      # [T*k*k] i for every (slot, slot') pair
        dst = np.tile(b_Tk, (1, k)).ravel()           # [T*k*k] j for every pair
        if weighted:
            wa, wb = trace.weights_TLk[:, l, :], trace.weights_TLk[:, l + 1, :]
            w = (np.repeat(wa, k, axis=1) * np.tile(wb, (1, k))).ravel()
        else:
            w = None
        counts_PEE[l] = np.bincount(src * E + dst, weights=w, minlength=E * E).reshape(E, E)
    return counts_PEE


def expert_load(trace: Trace, *, weighted: bool = False) -> np.ndarray:
    """Tokens [L, E] routed to each expert per layer (gate-weighted if ``weighted``)."""
    x_TLk, E = trace.experts_TLk, trace.num_experts
    L = x_TLk.shape[1]
    w = trace.weights_TLk if weighted else None
    return np.stack([np.bincount(x_TLk[:, l].ravel(), None if w is None else w[:, l].ravel(),
                                 minlength=E) for l in range(L)]).astype(np.float64)


def _smooth(counts_PEE, load_LE, num_tokens, smoothing):
    if smoothing <= 0:
        return counts_PEE
    p_LE = (load_LE + 1.0) / (load_LE + 1.0).sum(1, keepdims=True)   # add-one keeps unseen experts
    per_tok = counts_PEE.sum((1, 2)) / max(num_tokens, 1)             # [P] pairs per token
    prior_PEE = p_LE[:-1, :, None] * p_LE[1:, None, :] * per_tok[:, None, None]
    return counts_PEE + smoothing * prior_PEE


def affinity_from_trace(trace: Trace, *, weighted: bool = False, smoothing: float = 0.0,
                        name: str = "trace") -> AffinityProblem:
    """Affinity problem from a token trace; all quantities are per token (divided by T)."""
    counts_PEE = transition_counts(trace, weighted=weighted)
    load_LE = expert_load(trace, weighted=weighted)
    counts_PEE = _smooth(counts_PEE, load_LE, trace.num_tokens, smoothing)
    T = float(trace.num_tokens + max(smoothing, 0.0))
    return AffinityProblem(counts_PEE / T, load_LE / trace.num_tokens, name=name,
                           meta={"tokens": trace.num_tokens, "top_k": trace.top_k})


def affinity_from_counts(counts_PEE: np.ndarray, counts_LE: np.ndarray, num_tokens: float,
                         *, name: str = "counts") -> AffinityProblem:
    """Affinity problem from precomputed counts: transitions [L-1, E, E] and loads [L, E]."""
    counts_PEE = np.asarray(counts_PEE, dtype=np.float64)
    counts_LE = np.asarray(counts_LE, dtype=np.float64)
    if num_tokens <= 0:
        raise PlacementError(f"num_tokens must be positive, got {num_tokens}")
    return AffinityProblem(counts_PEE / num_tokens, counts_LE / num_tokens, name=name,
                           meta={"tokens": float(num_tokens)})


def load_routing_stats(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                       name: str | None = None) -> AffinityProblem:
    """Load OLMoE-paper routing statistics (``expert_counts[3, E]``, ``coactivation[2, E, E]``).

    The three recorded layers (0, 7, 15) become three consecutive "layers" of the problem. Several
    files (e.g. text domains) are summed. Tokens = expert_counts[0].sum() / top_k. A file without
    ``coactivation`` (written by ``save_load_counts`` from a count-only engine dump) gives loads only:
    zero affinity, ``meta["load_only"]`` set, so a placement from it can balance load and nothing else.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise PlacementError("no routing statistics files given")
    counts_LE, co_PEE, tokens = None, None, 0.0
    for p in paths:
        if not os.path.exists(p):
            raise PlacementError(f"routing statistics file not found: {p}")
        with np.load(p) as d:
            if "expert_counts" not in d.files:
                raise PlacementError(f"{p}: missing 'expert_counts'; not a routing statistics file")
            c = d["expert_counts"].astype(np.float64)
            if "coactivation" in d.files:
                co = d["coactivation"].astype(np.float64)
            else:   # loads only (save_load_counts)
                co = np.zeros((c.shape[0] - 1,) + (c.shape[1],) * 2) if c.ndim == 2 else np.zeros(0)
            k = int(d["top_k"]) if "top_k" in d.files else 1
        if c.ndim != 2 or co.ndim != 3 or co.shape[0] != c.shape[0] - 1 or co.shape[1:] != (c.shape[1],) * 2:
            raise PlacementError(f"{p}: expected expert_counts[L, E] and coactivation[L-1, E, E], "
                                 f"got {c.shape} and {co.shape}")
        if counts_LE is not None and c.shape != counts_LE.shape:
            raise PlacementError(f"{p}: shape {c.shape} differs from earlier files {counts_LE.shape}")
        counts_LE = c if counts_LE is None else counts_LE + c
        co_PEE = co if co_PEE is None else co_PEE + co
        tokens += c[0].sum() / k
    label = name or "+".join(os.path.splitext(os.path.basename(p))[0] for p in paths)
    problem = affinity_from_counts(co_PEE, counts_LE, tokens, name=label)
    problem.meta["load_only"] = not co_PEE.any()
    return problem


def save_load_counts(path: str | os.PathLike, counts_LE: np.ndarray, top_k: int) -> None:
    """Write expert loads [L, E] (routed token-slot pairs per expert) as a statistics file without affinity."""
    np.savez(path, expert_counts=np.asarray(counts_LE, dtype=np.float64), top_k=np.int64(top_k))


def load_problem_file(path: str | os.PathLike):
    """Load either a token trace (``experts`` array) or count statistics (``expert_counts``).

    Returns (problem, trace) where trace is None for precomputed statistics.
    """
    from .trace import load_trace
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PlacementError(f"trace file not found: {path}")
    try:
        with np.load(path) as d:
            keys = set(d.files)
    except Exception as exc:
        raise PlacementError(f"cannot read {path}: {exc}") from exc
    if "expert_counts" in keys and "experts" not in keys:
        return load_routing_stats(path), None
    trace = load_trace(path)
    return affinity_from_trace(trace, name=os.path.basename(path)), trace
