"""Synthetic routing traces with realistic cross-layer affinity, and planted instances for tests.

Glossary
  topic      a latent token class (domain, syntax role...) that biases routing at every layer, which is
             what makes consecutive-layer choices correlated in real MoE models
  drift      probability that a token's topic changes between consecutive layers
  popularity per-layer expert popularity (log-normal), giving the skewed loads seen in OLMoE

Routing samples top-k without replacement (Gumbel top-k) from topic preference + popularity logits.
"""
from __future__ import annotations

import numpy as np

from .trace import Trace


def synthetic_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int, *,
                    num_topics: int = 16, concentration: float = 2.5, skew: float = 0.6,
                    drift: float = 0.15, seed: int = 0) -> Trace:
    """Token trace [T, L, k] with topic-driven affinity; also returns softmax gate weights."""
    rng = np.random.default_rng(seed)
    T, L, E, k = num_tokens, num_layers, num_experts, top_k
    topic_mix = rng.dirichlet(np.full(num_topics, 0.7))
    topic_T = rng.choice(num_topics, size=T, p=topic_mix)
    experts_TLk = np.empty((T, L, k), dtype=np.int64)
    weights_TLk = np.empty((T, L, k), dtype=np.float64)
    for l in range(L):
        pref_CE = concentration * rng.standard_normal((num_topics, E))
        pop_E = skew * rng.standard_normal(E)
        switch = rng.random(T) < drift
        topic_T = np.where(switch, rng.choice(num_topics, size=T, p=topic_mix), topic_T)
        experts_TLk[:, l], weights_TLk[:, l] = _route(rng, pref_CE[topic_T] + pop_E[None, :], k)
    return Trace(experts_TLk, E, weights_TLk.astype(np.float16).astype(np.float64), np.arange(T))


def _route(rng, logits_TE, k):
    """Gumbel top-k choices [T, k] and their softmax gate weights."""
    noisy_TE = logits_TE + rng.gumbel(size=logits_TE.shape)
    top_Tk = np.argpartition(-noisy_TE, k - 1, axis=1)[:, :k]
    g_Tk = np.take_along_axis(logits_TE, top_Tk, 1)
    g_Tk = np.exp(g_Tk - g_Tk.max(1, keepdims=True))
    return top_Tk, g_Tk / g_Tk.sum(1, keepdims=True)


def domain_traces(num_tokens: int, num_layers: int, num_experts: int, top_k: int, *, domains: int = 2,
                  num_topics: int = 16, concentration: float = 2.5, skew: float = 0.6, drift: float = 0.15,
                  domain_concentration: float = 0.3, seed: int = 0) -> list[Trace]:
    """One synthetic model, several text domains (code, chat, ...): every layer's topic preferences and
    expert popularity are shared, each domain draws its own sparse topic mixture (Dirichlet with
    ``domain_concentration``) and its own ``num_tokens`` tokens. Routing drifts between domains the way it
    does when a workload switches, with the experts unchanged."""
    rng = np.random.default_rng(seed)
    T, L, E, k = num_tokens, num_layers, num_experts, top_k
    pref_LCE = concentration * rng.standard_normal((L, num_topics, E))
    pop_LE = skew * rng.standard_normal((L, E))
    out = []
    for d in range(domains):
        drng = np.random.default_rng([seed, d + 1])
        mix = drng.dirichlet(np.full(num_topics, domain_concentration))
        topic_T = drng.choice(num_topics, size=T, p=mix)
        experts_TLk = np.empty((T, L, k), dtype=np.int64)
        for l in range(L):
            switch = drng.random(T) < drift
            topic_T = np.where(switch, drng.choice(num_topics, size=T, p=mix), topic_T)
            experts_TLk[:, l] = _route(drng, pref_LCE[l, topic_T] + pop_LE[l][None, :], k)[0]
        out.append(Trace(experts_TLk, E, None, np.arange(T)))
    return out


def planted_chain_trace(num_tokens: int, num_layers: int, num_experts: int, num_groups: int, *,
                        top_k: int = 2, seed: int = 0) -> tuple[Trace, np.ndarray]:
    """Trace whose experts form ``num_groups`` disjoint chains: a token stays inside one group of
    E / num_groups experts at every layer, so a placement with zero cross-worker traffic exists.

    Returns (trace, group_LE) where group_LE[l, e] is the planted group of expert e at layer l
    (experts are shuffled per layer so the groups are not contiguous ids).
    """
    rng = np.random.default_rng(seed)
    T, L, E, k = num_tokens, num_layers, num_experts, top_k
    size = E // num_groups
    perm_LE = np.stack([rng.permutation(E) for _ in range(L)])   # slot -> expert id
    group_LE = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        group_LE[l, perm_LE[l]] = np.arange(E) // size
    g_T = rng.integers(num_groups, size=T)
    experts_TLk = np.empty((T, L, k), dtype=np.int64)
    for l in range(L):
        within_Tk = np.argsort(rng.random((T, size)), axis=1)[:, :k]
        experts_TLk[:, l] = perm_LE[l][g_T[:, None] * size + within_Tk]
    return Trace(experts_TLk, E), group_LE
