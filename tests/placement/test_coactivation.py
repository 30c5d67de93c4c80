"""Co-activation expert grouping (speculative expert grouping for tensor-parallel shuffling)."""

import numpy as np
import pytest

from moeyard.placement import PlacementError, Trace
from moeyard.placement.coactivation import coactivation_counts, solve_coactivation


def planted(T=2000, L=3, E=8, groups=((0, 5, 2, 7), (1, 3, 4, 6)), seed=0):
    """Tokens pick both experts from one planted group (so the best placement keeps every pair together)."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((T, L, 2), dtype=np.int16)
    for t in range(T):
        for l in range(L):
            g = groups[rng.integers(len(groups))]
            ex[t, l] = rng.choice(g, 2, replace=False)
    return Trace(ex, E)


def test_counts_symmetric_pairs():
    tr = Trace(np.array([[[0, 1]], [[1, 0]], [[2, 3]]], dtype=np.int16), 4)
    C = coactivation_counts(tr)
    assert C.shape == (1, 4, 4) and C[0, 0, 1] == C[0, 1, 0] == 2 and C[0, 2, 3] == 1 and C[0].trace() == 0


def test_recovers_planted_groups_with_balance():
    tr = planted()
    r = solve_coactivation(tr, 2, balance=0.1, time_limit=5)
    assert r.together == pytest.approx(1.0)
    assert r.together_round_robin < 0.6
    for w in r.worker_LE:
        assert np.bincount(w, minlength=2).tolist() == [4, 4]
        assert len({w[e] for e in (0, 5, 2, 7)}) == 1


def test_balance_bound_respected():
    # a hot planted group: keeping it together would overload one worker; the load bound must win
    rng = np.random.default_rng(1)
    ex = np.where(rng.random((3000, 2, 1)) < 0.8, rng.choice([0, 1], (3000, 2, 2)), rng.integers(0, 8, (3000, 2, 2)))
    ex[..., 1] = np.where(ex[..., 1] == ex[..., 0], (ex[..., 0] + 1) % 8, ex[..., 1])
    tr = Trace(ex.astype(np.int16), 8)
    r = solve_coactivation(tr, 4, balance=0.5, time_limit=5)
    for l in range(2):
        load = np.bincount(r.worker_LE[l][ex[:, l].ravel()], minlength=4)
        assert load.max() <= 1.5 * load.mean() + 1e-9 or "not reached" in r.status[l]
    assert r.together >= r.together_round_robin


def test_bad_worker_count():
    with pytest.raises(PlacementError, match="num_workers"):
        solve_coactivation(planted(T=10), 9)
