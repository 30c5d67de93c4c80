import itertools

import numpy as np

from moeyard.placement import PlaceSpec, affinity_from_trace, solve
from moeyard.placement.ilp import solve_exact
from moeyard.placement.search import total_cost
from moeyard.placement.synthetic import synthetic_trace


def _brute_force(prob, G, cost_GG):
    E = prob.num_experts
    S = E // G
    every = [np.array(w) for w in itertools.product(range(G), repeat=E) if (np.bincount(w, minlength=G) == S).all()]
    # relabelling workers maps optima to optima, so layer 0 may keep expert 0 on worker 0
    best = np.inf
    for first in (w for w in every if w[0] == 0):
        for rest in itertools.product(every, repeat=prob.num_layers - 1):
            best = min(best, total_cost(np.stack([first, *rest]), prob.aff_PEE, cost_GG))
    return best


def test_exact_matches_brute_force():
    prob = affinity_from_trace(synthetic_trace(300, 3, 6, 2, seed=5))
    spec = PlaceSpec(2)
    ref = _brute_force(prob, 2, spec.topology.cost_GG())
    r = solve(prob, 2, method="exact", time_limit=30)
    assert r.status == "optimal"
    assert np.isclose(r.objective, ref) and np.isclose(r.bound, ref)


def test_exact_matches_brute_force_with_topology():
    prob = affinity_from_trace(synthetic_trace(300, 3, 4, 2, seed=6))
    spec = PlaceSpec(4, nodes=2, inter_node_cost=3.0)
    ref = _brute_force(prob, 4, spec.topology.cost_GG())
    r = solve(prob, 4, nodes=2, inter_node_cost=3.0, method="exact", time_limit=30)
    assert r.status == "optimal" and np.isclose(r.objective, ref)


def test_search_reaches_proven_optimum_on_small():
    prob = affinity_from_trace(synthetic_trace(1000, 3, 8, 2, seed=7))
    exact = solve_exact(prob, PlaceSpec(2), np.ones((3, 8), int), time_limit=30)
    assert exact.status == "optimal"
    r = solve(prob, 2, method="search", time_limit=1)
    assert r.bound <= exact.objective + 1e-9 <= r.objective + 2e-9
    assert np.isclose(r.objective, exact.objective)


def test_bound_never_exceeds_objective():
    for seed in range(2):
        prob = affinity_from_trace(synthetic_trace(500, 5, 16, 4, seed=seed))
        for kw in ({}, {"nodes": 2}, {"replicas": 1}):
            r = solve(prob, 4, method="search", time_limit=0.5, seed=seed, **kw)
            assert r.bound <= r.objective + 1e-9 and 0 <= r.gap <= 1


def test_exact_with_replicated_first_expert():
    # expert 0 of layer 0 is the hottest, so the EPLB rule replicates it: symmetry breaking must allow that
    from moeyard.placement import AffinityProblem
    rng = np.random.default_rng(0)
    load = np.array([[5.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    prob = AffinityProblem(rng.random((2, 4, 4)), load)
    r = solve(prob, 2, replicas=1, method="exact", time_limit=20)
    assert r.status == "optimal" and r.placement.workers_of(0, 0) == (0, 1)
