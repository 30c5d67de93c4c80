"""Worked example (pinned): 5 tokens, 3 layers, top-2, 4 experts, 2 workers.

Tokens 0-1 use {0,1} -> {2,3} -> {0,1}; tokens 2-3 use {2,3} -> {0,1} -> {2,3}; token 4 is noise.
Per token and layer pair there are 4 transitions (2 x 2), 40 in all. The optimum keeps
{0,1 | 2,3 | 0,1} on one worker and {2,3 | 0,1 | 2,3} on the other (worker 0 holds expert 0 of
layer 0, which fixes the labels); only token 4's transitions cross: 4 of 40, 0.8 per token.
"""
import numpy as np

from moeyard.placement import Placement, Trace, evaluate, solve
from tests.placement.conftest import tiny_trace_arrays


def test_golden_small_example():
    t = Trace(tiny_trace_arrays().astype(np.int64), 4)
    r = solve(t, 2, time_limit=20)
    assert r.status == "optimal" and np.isclose(r.objective, r.bound)
    assert r.placement.assignment == ((0, 0, 1, 1), (1, 1, 0, 0), (0, 0, 1, 1))
    m = evaluate(r.placement, t)
    assert np.isclose(m.cross_rate, 4 / 40) and np.isclose(r.objective, 4 / 5)
    expected = Placement(((0, 0, 1, 1), (1, 1, 0, 0), (0, 0, 1, 1)), 2)
    assert np.isclose(evaluate(expected, t).cross_rate, 0.1)
