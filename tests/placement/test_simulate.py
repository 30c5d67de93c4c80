import pytest

from moeyard.placement import PlacementError, simulate


def test_measured_fraction_bytes_and_time():
    r = simulate(None, None, 8, 2, intra_gbps=100, inter_gbps=10, hidden_size=1000, bytes_per_elem=2,
                 tokens_per_step=10, local_fraction=0.5, num_layers=4, top_k=2)
    messages = 2 * 10 * 4 * 2
    inter = 0.5 * 4 / 7                      # remote traffic uniform over the 7 other workers, 4 off-node
    assert r.bytes_inter == pytest.approx(messages * inter * 2000)
    assert r.bytes_intra == pytest.approx(messages * (0.5 - inter) * 2000)
    assert r.seconds_inter == pytest.approx(r.bytes_inter / (8 * 10e9))
    big = simulate(None, None, 256, 32, 100, 10, 1000, 2, 10, local_fraction=0.5, num_layers=4, top_k=2)
    assert big.bytes_inter > r.bytes_inter and big.seconds < r.seconds


def test_needs_rates():
    with pytest.raises(PlacementError, match="measured local_fraction"):
        simulate(None, None, 8, 2, 100, 10)
