"""ExFlow's token-level ILP (Yao et al., 2024), reimplemented on HiGHS as a baseline.

Glossary
  x[l, e, g]       binary: worker g holds expert e of layer l (E / G experts per worker per layer)
  y[t, l, i, j, g] in [0, 1]: token t's transition (l, i) -> (l+1, j) stays on worker g (y <= both x)
The objective maximises sum y (tokens kept local). One variable per token transition per worker makes
the model grow with the trace, so only small traces fit; tokens are subsampled to ``max_tokens``.
"""
from __future__ import annotations

import time

import numpy as np

from .ilp import _Model
from .placement import Placement
from .trace import Trace


def solve_token_ilp(trace: Trace, num_workers: int, *, time_limit: float = 30.0, seed: int = 0,
                    max_tokens: int = 400) -> Placement:
    """Best placement HiGHS finds for the token-level ILP within ``time_limit`` seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x_TLk = trace.experts_TLk
    if trace.num_tokens > max_tokens:
        x_TLk = x_TLk[np.sort(rng.choice(trace.num_tokens, max_tokens, replace=False))]
    T, L, k = x_TLk.shape
    E, G = trace.num_experts, num_workers
    S = E // G
    m = _Model()
    x = m.var(L * E * G, integer=True).reshape(L, E, G)
    m.row([x[l, e] for l in range(L) for e in range(E)], [np.ones(G)] * (L * E), 1.0, 1.0)
    m.row([x[l, :, g] for l in range(L) for g in range(G)], [np.ones(E)] * (L * G), S, S)
    pairs = []
    for t in range(T):
        for l in range(L - 1):
            for i, j in {(int(a), int(b)) for a in x_TLk[t, l] for b in x_TLk[t, l + 1]}:
                pairs.append((l, i, j))
    n = len(pairs)
    y = m.var(n * G, cost=-1.0).reshape(n, G)
    pl, pi, pj = (np.array(v) for v in zip(*pairs))
    for g in range(G):
        m.row([np.r_[y[p, g], x[pl[p], pi[p], g]] for p in range(n)], [np.array([1.0, -1.0])] * n, -np.inf, 0.0)
        m.row([np.r_[y[p, g], x[pl[p] + 1, pj[p], g]] for p in range(n)], [np.array([1.0, -1.0])] * n, -np.inf, 0.0)
    m.row([y[p] for p in range(n)], [np.ones(G)] * n, -np.inf, 1.0)   # local on one worker at most
    res = m.solve(max(1.0, time_limit - (time.perf_counter() - t0)), gap=1e-4)
    if res.x is None:
        worker_LE = np.tile(np.arange(E) // S, (L, 1))       # no incumbent: contiguous fallback
        status = "no_incumbent"
    else:
        worker_LE = res.x[x.ravel()].reshape(L, E, G).argmax(-1)
        status = {0: "optimal", 1: "time_limit"}.get(res.status, str(res.status))
    return Placement.from_array(worker_LE, G, solver={"policy": "exflow", "status": status, "tokens": int(T),
                                                       "seconds": round(time.perf_counter() - t0, 2)})
