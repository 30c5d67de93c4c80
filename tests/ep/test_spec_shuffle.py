"""Speculative token shuffling (request placement with KV moves): lossless vs local mode, counters, errors."""

import warnings

import numpy as np
import pytest
import torch

from moeyard.cluster import layout
from moeyard.moe.errors import MoeyardError
from moeyard.runtime import LLM, SamplingParams
from moeyard.cluster.executor import thread_executor
from moeyard.cluster.planner import SpecShuffler, check_config

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12],
           [200, 201, 202, 203], list(range(120, 140))]
# move as eagerly as possible so that KV moves happen in a short test
EAGER = dict(max_moves=4, horizon=1e6, history=0.5)


@pytest.fixture(scope="module")
def local_run(tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    llm = LLM(path, max_num_seqs=6, max_num_batched_tokens=64)
    rec, toks = {}, []
    llm.engine.executor.route_hooks.append(lambda l, x, ids, w: rec.setdefault(l, []).append(ids.clone()))
    want = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    experts = np.stack([torch.cat(rec[l]).numpy() for l in llm.cfg.moe_layers], 1)
    return path, llm, want, experts


def run_with(llm, ex, prompts=PROMPTS):
    old, llm.engine.executor = llm.engine.executor, ex
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    finally:
        llm.engine.executor = old


def trace_with_tokens(llm, experts):
    """A trace with token ids: re-run local mode recording (token, routing) pairs."""
    rec, tok = {}, []
    ex = llm.engine.executor
    hook = lambda l, x, ids, w: rec.setdefault(l, []).append(ids.clone())  # noqa: E731
    ex.route_hooks.append(hook)
    orig = ex.execute

    def execute(items):
        for it in items:
            tok.extend(it.token_ids)
        return orig(items)
    ex.execute = execute
    try:
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    finally:
        ex.route_hooks.remove(hook)
        del ex.execute
    ex_TLK = np.stack([torch.cat(rec[l]).numpy() for l in llm.cfg.moe_layers], 1).astype(np.int16)
    return {"experts": ex_TLK, "token_ids": np.array(tok, dtype=np.int32)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("placement", ["round_robin", "affinity"])
def test_lossless_with_moves(local_run, world, placement):
    path, llm, want, experts = local_run
    trace = trace_with_tokens(llm, experts)
    tr = layout.make_trace(experts, llm.cfg.num_experts)
    placement = (layout.solved_placement("affinity", tr, llm.cfg, world, 3)[0]
                 if placement == "affinity" else layout.static_placement(placement, llm.cfg, world))
    ex = thread_executor(path, placement, world, "standard", max_num_seqs=6, max_model_len=llm.max_model_len,
                          speculative_shuffle=True, trace=trace, shuffle_options=EAGER)
    assert ex.spec.table_source.startswith("trace.npz")
    got = run_with(llm, ex)
    assert got == want
    st = ex.stats()
    assert st["shuffle_moves"] > 0 and st["shuffle_bytes"] > 0
    assert st["a2a_bytes"] == sum(st[f"{k}_bytes"] for k in ("moe", "kv", "hidden", "meta", "shuffle"))
    # every moved position carries all layers' K and V rows plus an int64 (slot, pos) row
    assert st["shuffle_bytes"] == st["shuffle_moved_positions"] * ex.spec.kv_bytes_per_position
    assert 0 < st["spec_expert_precision"] <= 1 and 0 < st["spec_worker_accuracy"] <= 1
    assert abs(st["spec_local_fraction"] - st["local_fraction"]) < 1e-6
    assert len(st["spec_expert_precision_per_layer"]) == len(llm.cfg.moe_layers)


def test_trace_table_predicts_better_than_nothing(local_run):
    """Seeded from the same workload's trace, the table's top-k precision is well above chance (k/E)."""
    path, llm, want, experts = local_run
    trace = trace_with_tokens(llm, experts)
    placement = layout.static_placement("round_robin", llm.cfg, 2)
    ex = thread_executor(path, placement, 2, "standard", max_num_seqs=6, max_model_len=llm.max_model_len,
                          speculative_shuffle=True, trace=trace)
    assert run_with(llm, ex) == want
    st = ex.stats()
    assert st["spec_expert_precision"] > 2 * llm.cfg.top_k / llm.cfg.num_experts


def test_missing_table_rebuilt_with_warning(local_run):
    path, llm, want, experts = local_run
    placement = layout.static_placement("round_robin", llm.cfg, 2)
    for trace in (None, {"experts": experts.astype(np.int16)},                      # no token ids
                  {"experts": experts[:, :1].astype(np.int16), "tokens": np.zeros(len(experts), np.int32)}):
        with pytest.warns(UserWarning, match="rebuilding the token-identity table from a calibration run"):
            ex = thread_executor(path, placement, 2, "standard", max_num_seqs=6, max_model_len=llm.max_model_len,
                                  speculative_shuffle=True, trace=trace, shuffle_options={"calibration_tokens": 256})
        assert ex.spec.table_source.startswith("calibration run")
        assert float(ex.spec.table.C.sum()) > 0
        # calibration traffic is not the workload's: counters start after it only for the placement state
        assert run_with(llm, ex) == want


def test_no_moves_when_kv_too_costly(local_run):
    path, llm, want, experts = local_run
    placement = layout.static_placement("round_robin", llm.cfg, 2)
    trace = trace_with_tokens(llm, experts)
    ex = thread_executor(path, placement, 2, "standard", max_num_seqs=6, max_model_len=llm.max_model_len,
                          speculative_shuffle=True, trace=trace, shuffle_options={"horizon": 0.0})
    assert run_with(llm, ex) == want
    st = ex.stats()
    assert st["shuffle_moves"] == 0 and st["shuffle_bytes"] == 0


def test_balance_bound():
    from types import SimpleNamespace
    cfg = SimpleNamespace(moe_layers=[0, 1], num_experts=4, top_k=1, hidden_size=8, kv_shape=(1, 4, 1, 4),
                          num_layers=2, vocab_size=16)
    from moeyard.placement import Placement
    sp = SpecShuffler(cfg, Placement([[0, 0, 1, 1]] * 2, 2), 2, slack=0)
    # token 3 always routes to expert 0 (worker 0)
    sp.table.C[3] = torch.tensor([10.0, 0, 0, 0])
    from moeyard.runtime.executor import StepItem
    home, moves = sp.plan([StepItem(s, [3, 3], 0, True) for s in range(4)])
    assert sorted(home.values()) == [0, 0, 1, 1] and moves == []


def test_errors(tiny_ckpt):
    from moeyard.moe.config import MoEConfig
    path, _ = tiny_ckpt("mixtral")
    cfg = MoEConfig.from_dir(path)
    with pytest.raises(MoeyardError, match="num_workers >= 2"):
        check_config("standard", cfg, 1, shuffle=True)
    with pytest.raises(MoeyardError, match="ep_scheme must be one of 'standard', 'coherent', 'tp', got 'nope'"):
        check_config("nope", cfg, 2, shuffle=True)
    # an option the form does not take names the scheme, the option and the ones it takes
    with pytest.raises(MoeyardError, match=r"ep_scheme='coherent' \(speculative shuffling form 1\) does not take "
                                           r"'slak'; it takes: max_moves, horizon, slack"):
        check_config("coherent", cfg, 2, shuffle=True, options={"slak": 0.5})
    assert check_config("standard", cfg, 2, shuffle=True, options={"slack": 0, "horizon": 4.0}).spec_form == 1
    with pytest.raises(MoeyardError, match="speculative_shuffle not valid for mode 'local'"):
        LLM(path, speculative_shuffle=True)
    with pytest.raises(MoeyardError, match="num_workers >= 2"):
        LLM(path, mode="ray", num_workers=1, speculative_shuffle=True)
    with pytest.raises(MoeyardError, match="ep_scheme must be one of"):
        LLM(path, mode="ray", num_workers=2, ep_scheme="nope", speculative_shuffle=True)
