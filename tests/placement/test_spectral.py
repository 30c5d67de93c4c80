"""The spectral partition bound (placement/spectral.py) and its use at node level in bounds.py."""
import itertools

import numpy as np
import pytest

from moeyard.placement import PlaceSpec, affinity_from_trace, solve
from moeyard.placement.bounds import colocation_upper, pair_lower_bound
from moeyard.placement.spectral import partition_upper
from moeyard.placement.synthetic import synthetic_trace


def _best_partition(a, K):
    """Max affinity kept inside K equal groups, by enumeration (rows: first expert in group 0)."""
    E = a.shape[0]
    labelings = np.array(sorted(set(itertools.permutations(np.repeat(np.arange(K), E // K)))))
    cols = (labelings[:, :, None] == np.arange(K)).astype(float)        # [partitions, E, K]
    best = 0.0
    for r in labelings[labelings[:, 0] == 0]:
        gain_EK = a.T @ (r[:, None] == np.arange(K)).astype(float)     # column j's affinity to each row group
        best = max(best, float(np.einsum("pek,ek->p", cols, gain_EK).max()))
    return best


@pytest.mark.parametrize("K", [2, 4])
def test_valid_against_enumeration(K):
    rng = np.random.default_rng(K)
    for _ in range(3):
        a = rng.gamma(0.3, size=(8, 8))
        opt = _best_partition(a, K)
        up, d = partition_upper(a, K, time_limit=5)
        assert opt - 1e-9 <= up <= a.sum()
        again, _ = partition_upper(a, K, d0=d, time_limit=5)
        assert opt - 1e-9 <= again <= up + 1e-9


def test_tighter_than_b_matching_for_large_groups():
    """32 experts in 4 groups of 8: planted blocks plus noise. The b-matching lets every expert keep its own
    8 best partners; the spectral bound knows they must form groups."""
    rng = np.random.default_rng(0)
    E, K = 32, 4
    g = rng.permutation(np.arange(E) % K)
    a = rng.gamma(0.5, size=(E, E)) + 1.5 * (g[:, None] == g[None, :])
    planted = float(a[g[:, None] == g[None, :]].sum())
    size = np.full(E, E // K)
    bm, _, _ = colocation_upper(a, size, size, K * (E // K) ** 2)
    up, _ = partition_upper(a, K, time_limit=5)
    assert planted - 1e-9 <= up < bm


def test_node_level_bound_is_tighter_and_valid():
    prob = affinity_from_trace(synthetic_trace(3000, 4, 32, 4, seed=3))
    spec = PlaceSpec(8, nodes=2)
    ones = np.ones((4, 32), dtype=np.int64)
    plain = pair_lower_bound(prob, spec, ones, time_limit=10, spectral=False)
    tight = pair_lower_bound(prob, spec, ones, time_limit=10)
    placed = solve(prob, 8, nodes=2, time_limit=1)
    assert plain.value < tight.value <= placed.objective + 1e-9
    assert "spectral" in tight.info["bound_method"] and len(tight.state) == 3
    warm = pair_lower_bound(prob, spec, ones, time_limit=1, state=tight.state)
    assert warm.value >= tight.value - 1e-9                     # the warm start begins where the last one ended
