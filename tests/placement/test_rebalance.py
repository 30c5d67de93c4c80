"""Warm re-solve (placement/rebalance.py): drifted traffic, the adoption rule, the byte budget, the two-tier
move cost, replicas and balance, and a domain switch on the shipped trace of the default model."""
import os

import numpy as np
import pytest

from moeyard.placement import PlaceSpec, Placement, PlacementError, Trace, evaluate, load_trace, solve
from moeyard.placement.affinity import expert_load, transition_counts
from moeyard.placement.evaluate import worker_load_LG
from moeyard.placement.rebalance import RebalanceConfig, propose
from moeyard.placement.synthetic import synthetic_trace

L, E, G = 6, 16, 4
EXPERT_B, CROSS_B = 1e6, 1e3
DEFAULT_TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "moe", "default_model", "trace.npz")


@pytest.fixture(scope="module")
def base():
    tr = synthetic_trace(4000, L, E, 2, seed=1)
    return tr, solve(tr, G, time_limit=1.5, seed=0).placement


def _shuffled(tr, layers, seed=0):
    """The same affinity structure under new expert ids in ``layers``; returns (trace, perm per layer)."""
    rng = np.random.default_rng(seed)
    x = tr.experts_TLk.copy()
    perms = {l: rng.permutation(E) for l in layers}
    for l, p in perms.items():
        x[:, l] = p[x[:, l]]
    return Trace(x, E), perms


def _propose(placement, tr, spec=None, **cfg):
    kw = dict(window_tokens=1e5, byte_budget=1e12, expert_bytes=EXPERT_B, crossing_bytes=CROSS_B, time_limit=1.0)
    kw.update(cfg)
    return propose(placement, transition_counts(tr), expert_load(tr), tr.num_tokens, spec or PlaceSpec(G),
                   RebalanceConfig(**kw))


def _apply(placement, p):
    m = placement.membership_LEG()
    for mv in p.moves:
        assert m[mv.layer, mv.expert, mv.src] and not m[mv.layer, mv.expert, mv.dst]
        m[mv.layer, mv.expert, mv.dst] = True
    for l, e, g in p.evictions:
        m[l, e, g] = False
    return m


def test_shuffled_affinity_is_recovered(base):
    tr, p0 = base
    drifted, perms = _shuffled(tr, range(L))
    ref = np.array(p0.assignment)
    for l, perm in perms.items():            # the old placement under the new ids: a near-optimal reference
        ref[l, perm] = np.array(p0.assignment)[l]
    ref_cost = evaluate(Placement.from_array(ref, G), drifted).cost_per_token * CROSS_B
    p = _propose(p0, drifted)
    assert p.adopted and p.predicted_saving > p.move_cost > 0
    assert p.current_bytes_per_token == pytest.approx(evaluate(p0, drifted).cost_per_token * CROSS_B)
    assert p.proposed_bytes_per_token <= 1.03 * ref_cost < p.current_bytes_per_token
    assert (_apply(p0, p) == p.placement.membership_LEG()).all()
    assert (p.placement.membership_LEG().sum(1) == E // G).all()
    assert p.move_bytes == len(p.moves) * EXPERT_B and 0 <= p.gap < 0.5


def test_unchanged_traffic_moves_nothing(base):
    tr, p0 = base
    p = _propose(p0, tr, window_tokens=1e3)
    assert p.decision == "no_change" and p.moves == () and p.placement.assignment == p0.assignment


def test_adoption_rule_counts_the_window(base):
    tr, p0 = base
    drifted, _ = _shuffled(tr, [2])
    small, large = _propose(p0, drifted, window_tokens=50), _propose(p0, drifted, window_tokens=1e6)
    assert large.adopted and large.predicted_saving > large.move_cost
    assert not small.adopted
    for p in (small, large):
        assert p.adopted == (bool(p.moves) and p.predicted_saving > p.move_cost)


def test_byte_budget_trims_whole_layers_or_skips(base):
    tr, p0 = base
    drifted, _ = _shuffled(tr, [1, 4])
    full = _propose(p0, drifted)
    per_layer = {l: sum(m.layer == l for m in full.moves) for l in full.layers}
    budget = max(per_layer.values()) * EXPERT_B                # room for the larger layer's copies, not both
    assert sum(per_layer.values()) * EXPERT_B > budget
    trimmed = _propose(p0, drifted, byte_budget=budget)
    assert trimmed.adopted and trimmed.trimmed_layers >= 1 and 0 < trimmed.move_bytes <= budget
    assert trimmed.proposed_bytes_per_token < trimmed.current_bytes_per_token
    skipped = _propose(p0, drifted, byte_budget=0.5 * EXPERT_B)
    assert skipped.decision == "over_budget" and skipped.moves == () and skipped.move_bytes == 0
    assert skipped.placement.assignment == p0.assignment       # never half-applied


def test_two_tier_cost_prices_inter_node_copies(base):
    """Workers 0, 1 share node 0, workers 2, 3 node 1. Swap two workers' experts of one layer and price the
    window so the repair saves twice its raw bytes: inside a node that pays (copies cost 1 per byte), across
    nodes it does not (copies cost inter_node_cost = 4 per byte)."""
    tr, _ = base
    spec = PlaceSpec(G, nodes=2, inter_node_cost=4.0)
    p0 = solve(tr, G, nodes=2, time_limit=1.5).placement
    cost_GG = spec.topology.cost_GG()
    for (a, b), pays in (((0, 1), True), ((0, 2), False)):
        w = np.array(p0.assignment)
        w[3] = np.where(w[3] == a, b, np.where(w[3] == b, a, w[3]))
        swapped = Placement.from_array(w, G)
        saving = evaluate(swapped, tr, nodes=2).cost_per_token - evaluate(p0, tr, nodes=2).cost_per_token
        copies = 2 * E // G
        p = _propose(swapped, tr, spec=spec, window_tokens=2 * copies * EXPERT_B / (saving * CROSS_B))
        assert p.current_bytes_per_token == pytest.approx(evaluate(swapped, tr, nodes=2).cost_per_token * CROSS_B)
        assert p.move_cost == pytest.approx(EXPERT_B * sum(cost_GG[m.src, m.dst] for m in p.moves))
        if pays:
            assert p.adopted and p.layers == (3,) and all(m.src // 2 == m.dst // 2 for m in p.moves)
        else:
            assert p.decision == "no_change" and not p.moves     # the search itself priced the copies


def test_replicas_and_balance_hold(base):
    tr, _ = base
    spec = PlaceSpec(G, replicas=1, balance=0.3)
    p0 = solve(tr, G, replicas=1, balance=0.3, time_limit=2).placement
    drifted, _ = _shuffled(tr, [0, 3])
    p = _propose(p0, drifted, spec=spec)
    m = p.placement.membership_LEG()
    assert p.adopted and (m.sum(1) == E // G + 1).all()
    load_LE = expert_load(drifted) / drifted.num_tokens
    cap_L = 1.3 * load_LE.sum(1) / G
    assert (worker_load_LG(m, load_LE).max(1) <= cap_L * (1 + 1e-9)).all()


@pytest.mark.skipif(not os.path.exists(DEFAULT_TRACE), reason="moe/default_model/trace.npz not shipped")
def test_domain_switch_on_the_default_model_trace():
    """Placed for code (github), the traffic turns to text (arxiv + wikipedia): the warm re-solve on half of
    the text sequences beats the code placement on the other half, and nearly matches a fresh solve there."""
    tr = load_trace(DEFAULT_TRACE)
    with np.load(DEFAULT_TRACE) as d:
        dom, seq_len = d["domain"], int(d["seq_len"])
    code, text = tr.take(dom == 2), tr.take((dom == 0) | (dom == 3))
    seq = np.arange(text.num_tokens) // seq_len
    fit, held = text.take(seq % 2 == 0), text.take(seq % 2 == 1)
    p0 = solve(code, G, time_limit=2).placement
    p = _propose(p0, fit, window_tokens=1e6, expert_bytes=3 * 64 * 128 * 2, crossing_bytes=2 * 64 * 2)
    fresh = solve(fit, G, time_limit=2).placement
    new, old, ref = (evaluate(x, held).cost_per_token for x in (p.placement, p0, fresh))
    assert p.adopted and new <= 0.8 * old and new <= 1.02 * ref


def test_bad_input(base):
    tr, p0 = base
    other = synthetic_trace(200, L, 8, 2)
    with pytest.raises(PlacementError, match="routing counts cover 6 layers x 8 experts on 4 workers, the current "
                                             "placement 6 x 16 on 4"):
        _propose(p0, other)
    crowded = Placement.from_array(np.zeros((L, E), int), G)
    with pytest.raises(PlacementError, match="holds 16 experts of a layer on one worker, more than the 4 slots"):
        _propose(crowded, tr)
    with pytest.raises(PlacementError, match="window_tokens must be > 0"):
        RebalanceConfig(window_tokens=0, byte_budget=1, expert_bytes=1, crossing_bytes=1)


def test_suffix_move_penalty_is_exact():
    """The G x G matrix a suffix move adds equals the penalty change of relabelling layers >= l."""
    from moeyard.placement.search import penalised_cost, suffix_penalty_LGG
    rng = np.random.default_rng(0)
    w = np.stack([rng.permutation(np.arange(E) % G) for _ in range(L)])
    pen = rng.random((L, E, G))
    zero = np.zeros((L - 1, E, E))
    pen_LGG = suffix_penalty_LGG(w, pen)
    for l in (1, 3, L - 1):
        perm = rng.permutation(G)
        moved = w.copy()
        moved[l:] = perm[w[l:]]
        change = penalised_cost(moved, zero, np.ones((G, G)), pen) - penalised_cost(w, zero, np.ones((G, G)), pen)
        assert change == pytest.approx(pen_LGG[l][np.arange(G), perm].sum())
