import numpy as np
import pytest

from moeyard.placement import PlacementError, Trace, load_trace, save_trace, split_tokens
from moeyard.placement.synthetic import synthetic_trace


def _write(tmp_path, **arrays):
    p = tmp_path / "trace.npz"
    np.savez(p, **arrays)
    return p


def test_round_trip(tmp_path):
    t = synthetic_trace(50, 3, 8, 2, seed=0)
    save_trace(t, tmp_path / "t.npz")
    u = load_trace(tmp_path / "t.npz")
    assert (u.experts_TLk == t.experts_TLk).all() and u.num_experts == 8 and u.top_k == 2
    assert u.weights_TLk is not None


def test_wrong_shape(tmp_path):
    p = _write(tmp_path, experts=np.zeros((4, 3), np.int16), num_experts=8)
    with pytest.raises(PlacementError, match=r"'experts' must have shape \[T, L, k\]"):
        load_trace(p)


def test_wrong_dtype(tmp_path):
    p = _write(tmp_path, experts=np.zeros((4, 3, 2), np.float32), num_experts=8)
    with pytest.raises(PlacementError, match="integer array"):
        load_trace(p)


def test_ids_out_of_range(tmp_path):
    x = np.zeros((4, 3, 2), np.int16)
    x[2, 1, 0] = 9
    p = _write(tmp_path, experts=x, num_experts=8)
    with pytest.raises(PlacementError, match=r"\[0, 8\).*found 9 at token 2, layer 1, slot 0"):
        load_trace(p)


def test_missing_key_and_file(tmp_path):
    p = _write(tmp_path, experts=np.zeros((4, 3, 2), np.int16))
    with pytest.raises(PlacementError, match="missing required array 'num_experts'"):
        load_trace(p)
    with pytest.raises(PlacementError, match="not found"):
        load_trace(tmp_path / "nope.npz")


def test_is_value_error():
    assert issubclass(PlacementError, ValueError)


def test_split_by_tokens():
    t = Trace(np.arange(10 * 2 * 1).reshape(10, 2, 1) % 4, 4)
    a, b = split_tokens(t, 0.5)
    assert a.num_tokens == 5 and b.num_tokens == 5
    assert (a.experts_TLk == t.experts_TLk[:5]).all() and (b.experts_TLk == t.experts_TLk[5:]).all()
