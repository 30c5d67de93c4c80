import time

import numpy as np
import pytest

from moeyard.placement import (AffinityProblem, PlacementError, affinity_from_trace, evaluate, solve,
                               split_tokens)
from moeyard.placement.synthetic import planted_chain_trace, synthetic_trace


def test_planted_chains_recovered():
    trace, group_LE = planted_chain_trace(400, 6, 16, 4, top_k=2, seed=1)
    r = solve(trace, 4, method="search", time_limit=5)
    assert r.objective == pytest.approx(0.0, abs=1e-12) and r.status == "optimal"
    w_LE = np.array([[ws[0] for ws in (r.placement.workers_of(l, e) for e in range(16))] for l in range(6)])
    for l in range(6):   # every planted group lands on a single worker, the same one at every layer
        for g in range(4):
            assert len(set(w_LE[l][group_LE[l] == g])) == 1
            assert w_LE[l][group_LE[l] == g][0] == w_LE[0][group_LE[0] == g][0]


def test_time_limit_respected():
    prob = affinity_from_trace(synthetic_trace(3000, 16, 64, 4, seed=0))
    t0 = time.perf_counter()
    r = solve(prob, 8, time_limit=2.0)
    assert time.perf_counter() - t0 < 2.0 + 1.5 and r.seconds < 3.5


def test_balance_respected():
    prob = affinity_from_trace(synthetic_trace(3000, 6, 32, 4, seed=1))
    free = solve(prob, 4, time_limit=2)
    bal = solve(prob, 4, balance=0.1, time_limit=2)
    assert evaluate(free.placement, prob).load_max_mean > 1.1
    assert evaluate(bal.placement, prob).load_max_mean <= 1.1 + 1e-9
    assert bal.bound <= bal.objective
    rep = solve(prob, 4, balance=0.1, replicas=1, time_limit=2)
    assert rep.placement.solver["balance_met"] and evaluate(rep.placement, prob).load_max_mean <= 1.1 + 1e-9


def test_infeasible_balance_message():
    load = np.array([[10.0, 1, 1, 1], [1, 1, 1, 1]])
    prob = AffinityProblem(np.ones((1, 4, 4)), load)
    with pytest.raises(PlacementError, match=r"balance eps=0.1 is infeasible: expert 0 of layer 0"):
        solve(prob, 2, balance=0.1)


def test_workers_must_divide_experts():
    prob = affinity_from_trace(synthetic_trace(100, 3, 8, 2))
    with pytest.raises(PlacementError, match=r"workers \(3\) must divide experts \(8\)"):
        solve(prob, 3)
    assert solve(prob, 3, replicas=1, time_limit=1).placement.num_workers == 3


def test_replication_improves_both_metrics():
    trace = synthetic_trace(6000, 6, 32, 4, skew=1.5, seed=4)
    fit, held = split_tokens(trace)
    base = evaluate(solve(fit, 4, time_limit=2).placement, held)
    rep = evaluate(solve(fit, 4, replicas=2, time_limit=2).placement, held)
    assert rep.cross_rate < base.cross_rate
    assert rep.load_max_mean < base.load_max_mean
