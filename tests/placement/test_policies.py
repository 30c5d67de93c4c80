import numpy as np
import pytest

from moeyard.placement import POLICIES, AffinityProblem, PlacementError, PlaceSpec, evaluate, get_policy
from moeyard.placement.spec import replica_counts


def test_registry_names():
    assert {"contiguous", "round_robin", "eplb", "exflow", "affinity"} <= set(POLICIES)
    with pytest.raises(PlacementError, match="unknown placement policy 'nope'"):
        get_policy("nope")


def test_static_baselines():
    prob = AffinityProblem(np.ones((1, 8, 8)), np.ones((2, 8)))
    assert get_policy("contiguous")(prob, PlaceSpec(4)).assignment[0] == (0, 0, 1, 1, 2, 2, 3, 3)
    assert get_policy("round_robin")(prob, PlaceSpec(4)).assignment[1] == (0, 1, 2, 3, 0, 1, 2, 3)


def test_eplb_worked_example():
    # one layer, loads 90, 30, 20, 20, 10, 10 on 2 workers with 1 extra slot each (4 slots per worker)
    load = np.array([[90.0, 30, 20, 20, 10, 10], [1, 1, 1, 1, 1, 1]])
    assert replica_counts(load, 2, 4).tolist()[0] == [2, 2, 1, 1, 1, 1]
    prob = AffinityProblem(np.ones((1, 6, 6)), load)
    p = get_policy("eplb")(prob, PlaceSpec(2, replicas=1))
    assert p.workers_of(0, 0) == (0, 1) and p.workers_of(0, 1) == (0, 1)
    assert evaluate(p, prob).load_max_mean == pytest.approx(1.0)


def test_exflow_needs_trace():
    prob = AffinityProblem(np.ones((1, 4, 4)), np.ones((2, 4)))
    with pytest.raises(PlacementError, match="needs a token trace"):
        get_policy("exflow")(prob, PlaceSpec(2))
