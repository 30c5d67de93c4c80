import numpy as np

from moeyard.placement import Placement, evaluate
from moeyard.placement.synthetic import synthetic_trace


def _reference(trace, placement, node_size):
    cross = inter = total = 0
    for tok in trace.experts_TLk:
        for l in range(trace.num_layers - 1):
            for i in tok[l]:
                for j in tok[l + 1]:
                    a, b = set(placement.workers_of(l, i)), set(placement.workers_of(l + 1, j))
                    total += 1
                    cross += not (a & b)
                    inter += not ({w // node_size for w in a} & {w // node_size for w in b})
    return cross / total, inter / total


def test_matches_token_level_reference():
    t = synthetic_trace(60, 3, 8, 2, seed=2)
    rng = np.random.default_rng(0)
    w = np.stack([rng.permutation(np.arange(8) % 4) for _ in range(3)])
    rows = [list(r) for r in w]
    rows[1][3] = (int(w[1][3]), (int(w[1][3]) + 1) % 4)       # one replicated expert
    p = Placement(tuple(tuple(r) for r in rows), 4)
    m = evaluate(p, t, nodes=2, inter_node_cost=3.0)
    cross, inter = _reference(t, p, 2)
    assert np.isclose(m.cross_rate, cross) and np.isclose(m.inter_node_rate, inter)
    assert np.isclose(m.weighted_rate, (cross - inter) + 3.0 * inter)


def test_load_split_over_replicas():
    from moeyard.placement import AffinityProblem
    prob = AffinityProblem(np.ones((1, 2, 2)), np.array([[3.0, 1.0], [2.0, 2.0]]))
    p = Placement((((0, 1), 1), (0, 1)), 2)
    m = evaluate(p, prob)
    # layer 0: worker0 1.5, worker1 1.5 + 1 -> max/mean = 2.5/2
    assert np.isclose(m.load_max_mean, 1.25)
