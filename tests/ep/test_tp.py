"""Tensor-parallel attention (ep_scheme="tp") and speculative token shuffling form 2: lossless vs local mode,
byte accounting, prediction counters, errors. Workers in threads over gloo (no Ray); Ray in test_spec_ray.py."""

import numpy as np
import pytest
import torch

from moeyard.cluster import layout
from moeyard.runtime import LLM, SamplingParams
from moeyard.comm.tp import balanced_destinations
from moeyard.cluster.executor import thread_executor
from executors import generate_with

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12], [200, 201, 202]]


@pytest.fixture(scope="module")
def local_runs(tiny_ckpt):
    out = {}
    for arch in ("mixtral", "qwen2_moe", "olmoe"):
        path, _ = tiny_ckpt(arch)
        llm = LLM(path, max_num_seqs=5, max_num_batched_tokens=64)
        rec = {}
        llm.engine.executor.route_hooks.append(lambda l, x, ids, w: rec.setdefault(l, []).append(ids.clone()))
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        llm.engine.executor.route_hooks.clear()
        trace = np.stack([torch.cat(rec[l]).numpy() for l in llm.cfg.moe_layers], 1)
        out[arch] = (path, llm, toks, layout.make_trace(trace, llm.cfg.num_experts))
    return out


def run(llm, ex):
    return generate_with(llm, ex, PROMPTS, GREEDY)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("placement", ["round_robin", "affinity"])
def test_tp_lossless_with_and_without_shuffling(local_runs, arch, world, placement):
    path, llm, want, trace = local_runs[arch]
    placement = (layout.solved_placement("affinity", trace, llm.cfg, world, time_limit=3)[0] if placement == "affinity"
               else layout.static_placement(placement, llm.cfg, world))
    res = {}
    for spec in (False, True):
        ex = thread_executor(path, placement, world, "tp", max_num_seqs=5, max_model_len=llm.max_model_len,
                              speculative_shuffle=spec)
        assert run(llm, ex) == want, (arch, world, placement, spec)
        res[spec] = st = ex.stats()
        kinds = ("moe", "kv", "hidden", "meta", "shuffle", "tp")
        assert st["a2a_bytes"] == sum(st[f"{k}_bytes"] for k in kinds)
        assert st["kv_bytes"] == 0 and st["hidden_bytes"] == 0
    base, spec = res[False], res[True]
    # the baseline pays the attention all-gather (tp bytes), shuffling replaces it (shuffle bytes)
    assert base["tp_bytes"] > 0 and base["shuffle_bytes"] == 0
    assert spec["tp_bytes"] == 0 and spec["shuffle_bytes"] > 0
    assert spec["shuffle_bytes"] < base["tp_bytes"]
    for k in ("spec_expert_precision_per_layer", "spec_worker_accuracy_per_layer"):
        assert len(spec[k]) == len(llm.cfg.moe_layers) and all(0 <= v <= 1 for v in spec[k])
    assert "spec_expert_precision" not in base
    assert spec["shuffle_imbalance"] >= 1.0 and spec["shuffle_busiest_tokens"] > 0


@pytest.mark.parametrize("spec", [False, True])
def test_tp_fewer_tokens_than_workers(local_runs, spec):
    """A lone sequence decoding on 4 workers (N = 1 < G): idle owners still take part in every collective."""
    path, llm, _, _ = local_runs["mixtral"]
    want = run_one(llm, None)
    ex = thread_executor(path, layout.static_placement("round_robin", llm.cfg, 4), 4, "tp", max_num_seqs=5,
                          max_model_len=llm.max_model_len, speculative_shuffle=spec)
    assert run_one(llm, ex) == want


def run_one(llm, ex):
    old = llm.engine.executor
    if ex is not None:
        llm.engine.executor = ex
    try:
        return llm.generate(prompt_token_ids=[[7, 8, 9]], sampling_params=GREEDY)[0].token_ids
    finally:
        llm.engine.executor = old


def test_tp_bytes_accounting(local_runs):
    """Exact byte counts of the attention collectives for one prefill of one sequence (N tokens, G = 2)."""
    path, llm, _, _ = local_runs["mixtral"]
    cfg = llm.cfg
    G, N, D = 2, 6, cfg.hidden_size
    placement = layout.static_placement("round_robin", cfg, G)
    from moeyard.runtime.executor import StepItem
    for spec in (False, True):
        ex = thread_executor(path, placement, G, "tp", max_num_seqs=2, max_model_len=64, speculative_shuffle=spec)
        ex.execute([StepItem(0, list(range(10, 10 + N)), 0, True)])
        st = ex.stats()
        if not spec:
            # per layer: head outputs (N x D/G floats) to the other worker from each side, residual rows of each
            # owner's tokens to the other worker: G * N * D/G + N * D floats
            assert st["tp_bytes"] == cfg.num_layers * (N * D + N * D) * 4
        else:
            # head scatter: each worker sends the heads of tokens destined elsewhere; all-gather: N rows once
            assert st["shuffle_bytes"] <= cfg.num_layers * (N * D // 2 * 2 + N * D) * 4
            assert st["shuffle_bytes"] >= cfg.num_layers * N * D * 4


def test_balanced_destinations():
    s = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    assert balanced_destinations(s, 10.0).tolist() == [0, 0, 0, 1]
    d = balanced_destinations(s, 0.0)                    # cap 2 per worker: the weakest preference moves
    assert torch.bincount(d, minlength=2).tolist() == [2, 2] and d[0] == 0 and d[3] == 1
    assert balanced_destinations(torch.empty(0, 3), 0.5).numel() == 0


def test_tp_worker_errors(tiny_ckpt):
    from moeyard.cluster.worker import EPWorker
    from moeyard.placement import Placement
    path, _ = tiny_ckpt("mixtral")             # 4 heads, 3 MoE layers of 8 experts
    with pytest.raises(ValueError, match=r"num_heads \(4\) < num_workers \(8\)"):
        EPWorker(path, 0, 8, Placement([[e % 8 for e in range(8)]] * 3, 8), "tp")
    with pytest.raises(ValueError, match="needs ep_scheme='tp'"):
        EPWorker(path, 0, 2, Placement([[e % 2 for e in range(8)]] * 3, 2), "standard", shuffle=True)


def test_tp_bad_options_fail_before_ray_starts(tiny_ckpt):
    from moeyard.moe.errors import MoeyardError
    path, _ = tiny_ckpt("mixtral")                 # 4 attention heads, 8 experts
    with pytest.raises(MoeyardError, match=r"num_heads \(4\) < num_workers \(8\)"):
        LLM(path, mode="ray", num_workers=8, ep_scheme="tp")
    with pytest.raises(MoeyardError, match=r"ep_scheme='tp' \(speculative shuffling form 2\) does not take 'horizon'; it takes: slack"):
        LLM(path, mode="ray", num_workers=2, ep_scheme="tp", speculative_shuffle=True,
            shuffle_options={"horizon": 3})
    with pytest.raises(MoeyardError, match="num_workers >= 2"):
        LLM(path, mode="ray", num_workers=1, ep_scheme="tp", speculative_shuffle=True)
    with pytest.raises(MoeyardError, match=r"num_heads \(4\) is not a multiple of num_workers \(3\)"):
        LLM(path, mode="ray", num_workers=3, ep_scheme="tp")
    hybrid, _ = tiny_ckpt("qwen3_next")
    with pytest.raises(MoeyardError, match="ep_scheme='tp'.*qwen3_next"):
        LLM(hybrid, mode="ray", num_workers=2, ep_scheme="tp")
