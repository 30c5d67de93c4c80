import os

import numpy as np
import pytest

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "routing", "olmoe-paper")


@pytest.fixture
def shared_stats_dir():
    path = os.path.abspath(SHARED)
    if not os.path.isdir(path):
        pytest.skip(f"../shared routing statistics not found at {path} (only present in the project checkout)")
    return path


def tiny_trace_arrays():
    """5 tokens, 3 layers, top-2, 4 experts: hand-written golden example."""
    return np.array([
        [[0, 1], [2, 3], [0, 1]],
        [[0, 1], [2, 3], [0, 1]],
        [[2, 3], [0, 1], [2, 3]],
        [[2, 3], [0, 1], [2, 3]],
        [[0, 2], [1, 2], [3, 0]],
    ], dtype=np.int16)
