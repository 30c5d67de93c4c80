import os

import numpy as np

from moeyard.placement import Trace, affinity_from_trace, load_routing_stats
from moeyard.placement.affinity import transition_counts
from moeyard.placement.synthetic import synthetic_trace


def test_counts_match_loop():
    t = synthetic_trace(40, 3, 6, 2, seed=3)
    ref = np.zeros((2, 6, 6))
    for tok in t.experts_TLk:
        for l in range(2):
            for i in tok[l]:
                for j in tok[l + 1]:
                    ref[l, i, j] += 1
    assert np.array_equal(transition_counts(t), ref)
    p = affinity_from_trace(t)
    assert np.allclose(p.aff_PEE, ref / 40) and np.isclose(p.load_LE.sum(1), 2).all()


def test_weighted_counts():
    x = np.array([[[0, 1], [1, 0]]])
    w = np.array([[[0.75, 0.25], [0.5, 0.5]]])
    c = transition_counts(Trace(x, 2, w), weighted=True)
    assert np.allclose(c[0], [[0.375, 0.375], [0.125, 0.125]])


def test_smoothing_pulls_toward_independence():
    t = synthetic_trace(20, 3, 8, 2, seed=1)
    raw = affinity_from_trace(t).aff_PEE
    sm = affinity_from_trace(t, smoothing=1000.0).aff_PEE
    assert (sm > 0).all() and (raw == 0).any()
    assert np.isclose(sm.sum(), raw.sum(), rtol=1e-6)


def test_olmoe_paper_stats(shared_stats_dir):
    p = load_routing_stats(os.path.join(shared_stats_dir, "olmoe-1b-7b_c4.npz"))
    assert p.num_layers == 3 and p.num_experts == 64
    assert np.isclose(p.load_LE.sum(1), 8).all()          # top-8: 8 experts per token per layer
    assert np.isclose(p.aff_PEE.sum((1, 2)), 8).all()     # rank-aligned pairs: 8 per token
    both = load_routing_stats([os.path.join(shared_stats_dir, f"mixtral-8x7b_{d}.npz") for d in ("c4", "arxiv")])
    assert both.num_experts == 8 and np.isclose(both.load_LE.sum(1), 2).all()
