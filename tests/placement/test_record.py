import numpy as np
import pytest

from moeyard.placement import Placement, PlacementError


def test_json_round_trip(tmp_path):
    p = Placement(((0, 1, (0, 1), 1), (1, 0, 0, 1)), 2, objective=1.5, bound=1.25, solver={"x": 1})
    p.to_json(tmp_path / "placement.json")
    q = Placement.from_json(tmp_path / "placement.json")
    assert q == p and q.solver == {"x": 1} and q.bound == 1.25
    d = p.to_dict()
    assert d["assignment"][0][2] == [0, 1] and d["num_layers"] == 2 and d["num_experts"] == 4


def test_queries():
    p = Placement(((0, 1, (0, 1), 1), (1, 0, 0, 1)), 2)
    assert p.workers_of(0, 2) == (0, 1) and p.workers_of(1, 0) == (1,)
    assert p.local_experts(0) == [[0, 2], [1, 2]]
    assert p.membership_LEG().sum() == 9 and p.replicated


def test_validate_for():
    p = Placement.from_array(np.zeros((3, 4), int), 2)
    p.validate_for(3, 4, 2)
    with pytest.raises(PlacementError, match="experts: placement has 4, expected 8"):
        p.validate_for(3, 8, 2)


def test_bad_worker_ids():
    with pytest.raises(PlacementError, match="outside"):
        Placement(((0, 5),), 2)
    with pytest.raises(PlacementError, match="distinct"):
        Placement((((0, 0), 1),), 2)
