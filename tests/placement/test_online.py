"""Online rebalancing decisions (placement/online.py): forgetting counts from a prior, a re-solve validated on
held-out sequences, adoption only when the held-out saving pays for the moves, skips counted."""
import numpy as np
import pytest

from moeyard.placement import PlaceSpec, PlacementError, Trace, solve
from moeyard.placement.affinity import expert_load, transition_counts
from moeyard.placement.online import OnlineRebalancer, bytes_per_token, counts_of
from moeyard.placement.rebalance import RebalanceConfig
from moeyard.placement.synthetic import synthetic_trace

L, E, G, K = 6, 16, 4, 2


def _cfg(**kw):
    d = dict(window_tokens=1e5, byte_budget=1e12, expert_bytes=1e5, crossing_bytes=1e3, time_limit=1.0)
    d.update(kw)
    return RebalanceConfig(**d)


@pytest.fixture(scope="module")
def start():
    tr = synthetic_trace(6000, L, E, K, seed=3)
    return tr, solve(tr, G, time_limit=1.5, seed=0).placement


def _feed(rb, x_TLk, seq=200):
    for i in range(0, len(x_TLk), seq):
        rb.observe(x_TLk[i:i + seq])


def _prior(tr):
    return transition_counts(tr), expert_load(tr), tr.num_tokens


def test_counts_match_the_trace_counters(start):
    tr, _ = start
    trans, load = counts_of(tr.experts_TLk, E)
    np.testing.assert_array_equal(trans, transition_counts(tr))
    np.testing.assert_array_equal(load, expert_load(tr))


def test_stationary_traffic_moves_nothing(start):
    tr, p0 = start
    fresh = synthetic_trace(4000, L, E, K, seed=3)          # same routing law, new tokens
    # a horizon of 1e4 tokens and 1 MB experts: only a real gain pays for a move
    rb = OnlineRebalancer(p0, PlaceSpec(G), _cfg(window_tokens=1e4, expert_bytes=1e6), E, prior=_prior(tr),
                          prior_windows=2)
    _feed(rb, fresh.experts_TLk[2000:])
    assert rb.step() is None
    assert rb.last["decision"] in ("not_worth", "held_out_rejected", "no_change")
    assert rb.current is p0 and rb.counters["adopted"] == 0 and rb.counters["bytes_moved"] == 0
    assert rb.counters["proposals"] == 1


def test_a_domain_switch_is_followed_and_the_saving_is_real(start):
    tr, p0 = start
    rng = np.random.default_rng(0)
    x = tr.experts_TLk.copy()
    for l in range(L):                                        # same structure under new expert ids
        x[:, l] = rng.permutation(E)[x[:, l]]
    switched = Trace(x, E)
    fit, test = switched.take(np.arange(3000)), switched.take(np.arange(3000, 6000))
    rb = OnlineRebalancer(p0, PlaceSpec(G), _cfg(), E, prior=_prior(tr), prior_windows=0.2)
    _feed(rb, fit.experts_TLk)
    prop = rb.step()
    assert prop is not None and rb.current is prop.placement
    assert rb.counters["adopted"] == 1 and rb.counters["moves"] == len(prop.moves) > 0
    assert rb.last["held_out_saving_per_token"] > 0
    trans_t = transition_counts(test)
    before = bytes_per_token(p0, trans_t, test.num_tokens, PlaceSpec(G), 1e3)
    after = bytes_per_token(prop.placement, trans_t, test.num_tokens, PlaceSpec(G), 1e3)
    assert after < 0.9 * before                               # on tokens it never saw
    assert rb.step() is None                                  # nothing observed since: nothing to decide


def test_moves_that_cost_more_than_they_save_are_refused(start):
    tr, p0 = start
    rng = np.random.default_rng(1)
    x = tr.experts_TLk.copy()
    x[:, 2] = rng.permutation(E)[x[:, 2]]
    rb = OnlineRebalancer(p0, PlaceSpec(G), _cfg(window_tokens=10, expert_bytes=1e9), E)
    _feed(rb, x[:3000])
    assert rb.step() is None and rb.current is p0
    assert rb.counters["adopted"] == 0
    assert rb.counters["not_worth"] + rb.counters["held_out_rejected"] + rb.counters["no_change"] == 1


def test_infeasible_balance_is_skipped_and_counted(start):
    tr, p0 = start
    x = tr.experts_TLk[:2000].copy()
    x[:, 1, 0] = 5                                            # one expert takes every token's first slot
    rb = OnlineRebalancer(p0, PlaceSpec(G, balance=0.05), _cfg(), E)
    _feed(rb, x)
    assert rb.step() is None and rb.current is p0
    assert rb.counters["infeasible"] == 1 and "balance" in rb.last["error"]


def test_bad_decay_names_the_parameter(start):
    _, p0 = start
    with pytest.raises(PlacementError, match="decay"):
        OnlineRebalancer(p0, PlaceSpec(G), _cfg(), E, decay=1.5)
