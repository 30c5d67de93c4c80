"""The prefetch gate: per-rank precision learned online decides what is read; the byte budget caps reads in flight."""

import pytest

from moeyard.offload.gate import PrefetchGate, batch_class


def test_gate_reads_only_ranks_that_are_right_often_enough():
    g = PrefetchGate(min_p=0.5)
    assert g.allowed(1, 1, [4, 7, 9]) == [4, 7, 9]            # no evidence yet: the prior 1/2 passes
    for _ in range(50):                                        # rank 0 always right, rank 1 half, rank 2 never
        g.record(1, 1, [4, 7, 9], {4, 7})
        g.record(1, 1, [4, 8, 9], {4, 2})
    assert g.precision(1, 1, 0) > 0.95 and g.precision(1, 1, 2) < 0.05
    assert abs(g.precision(1, 1, 1) - 0.5) < 0.05
    assert g.allowed(1, 1, [1, 2, 3]) in ([1], [1, 2])
    assert PrefetchGate(min_p=0.9).allowed(1, 1, [1]) == []   # 0.9: nothing without evidence
    # kinds and batch classes learn apart: the step-start table and 8-token batches know nothing yet
    assert g.precision(0, 1, 2) == 0.5 and g.precision(1, 8, 2) == 0.5
    assert batch_class(1) == 0 and batch_class(3) == 1 and batch_class(16) == 2 and batch_class(17) == 3
    assert g.stats()["gated_out"] >= 1


def test_gate_forgets_old_evidence():
    g = PrefetchGate(min_p=0.5, decay=0.9)
    for _ in range(100):
        g.record(0, 1, [3], set())
    assert g.allowed(0, 1, [3]) == []
    for _ in range(30):                                        # the workload changed: rank 0 is right again
        g.record(0, 1, [3], {3})
    assert g.allowed(0, 1, [3]) == [3]


def test_byte_budget_from_bandwidth_and_layer_time(monkeypatch):
    import moeyard.offload.gate as gate
    t = [100.0]
    monkeypatch.setattr(gate.time, "perf_counter", lambda: t[0])
    g = PrefetchGate(budget_layers=2.0)
    assert g.max_loads(1e9, 1 << 20) is None                   # no layer time measured yet
    g.layer_tick(0.0)
    t[0] += 0.010                                              # 10 ms per layer, 4 ms of it stalled
    g.layer_tick(0.004)
    assert g.stats()["gate_layer_ms"] == pytest.approx(6.0)
    # 1 GB/s x 6 ms x 2 layers = 12 MB = 11 slots of 1 MiB
    assert g.max_loads(1e9, 1 << 20) == 11
    g.step_break()                                             # sampling between steps is not layer time
    t[0] += 5.0
    g.layer_tick(0.004)
    assert g.stats()["gate_layer_ms"] == pytest.approx(6.0)
    assert PrefetchGate(budget_layers=0).max_loads(1e9, 1) is None
    with pytest.raises(ValueError, match="min_p"):
        PrefetchGate(min_p=1.5)
