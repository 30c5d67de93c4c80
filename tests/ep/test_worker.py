"""Expert-parallel worker and dispatcher without Ray: workers in threads over a gloo FileStore group."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch

from moeyard.cluster import layout
from moeyard.comm.exchange import Exchanger
from moeyard.comm.group import make_group
from moeyard.runtime import LLM, SamplingParams
from moeyard.cluster.executor import run_in_threads, thread_executor

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


def run_threads(fns):
    return run_in_threads(fns, timeout=60)


def groups(world):
    f = tempfile.mktemp(prefix="moeyard_test_")
    return run_threads([lambda r=r: Exchanger(make_group(f"file://{f}", r, world, "gloo", 20), r, world, 20)
                        for r in range(world)])


def test_exchange_uneven_empty_and_reverse():
    world = 3
    exs = groups(world)
    # rank r sends rows to dest pattern; rank 1 sends nothing
    sends = {0: torch.tensor([2, 0, 2, 1]), 1: torch.tensor([], dtype=torch.long), 2: torch.tensor([0, 0])}

    def go(r):
        ex = exs[r]
        d = sends[r]
        x = torch.arange(len(d) * 3, dtype=torch.float32).view(-1, 3) + 100 * r
        (got,), plan = ex.exchange(d, [x], ["moe"])
        (back,) = ex.reverse(plan, [got * 2], ["moe"])
        assert torch.equal(back, x * 2)
        return got, ex.stats()
    out = run_threads([lambda r=r: go(r) for r in range(world)])
    # rank 0 receives: its own row 1, then rank 2's two rows
    assert out[0][0][:, 0].tolist() == [3.0, 200.0, 203.0]
    assert out[1][0][:, 0].tolist() == [9.0]
    assert out[2][0][:, 0].tolist() == [0.0, 6.0]
    # bytes: rows to other ranks only (3 floats each), there and back, plus split sizes (2 int32 per rank)
    assert out[0][1]["moe_bytes"] == (3 + 2) * 12      # 3 rows out to ranks 1,2; 2 rows back to rank 2
    assert out[1][1]["moe_bytes"] == 1 * 12            # sends back the one row it got
    assert out[2][1]["moe_bytes"] == (2 + 2) * 12      # 2 rows to rank 0; rank 0's 2 rows back
    assert all(o[1]["meta_bytes"] == 2 * 4 for o in out)   # int32 on the wire


@pytest.fixture(scope="module")
def local_runs(tiny_ckpt):
    """Greedy tokens of local mode and a routing trace per architecture."""
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        path, _ = tiny_ckpt(arch)
        llm = LLM(path, max_num_seqs=4, max_num_batched_tokens=32)
        rec = {}
        llm.engine.executor.route_hooks.append(lambda l, x, ids, w: rec.setdefault(l, []).append(ids.clone()))
        toks = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        trace = np.stack([torch.cat(rec[l]).numpy() for l in llm.cfg.moe_layers], 1)
        out[arch] = (path, llm, toks, layout.make_trace(trace, llm.cfg.num_experts))
    return out


def placement_for(placement, cfg, world, trace, tmp_path):
    if placement == "affinity":
        return layout.solved_placement("affinity", trace, cfg, world, time_limit=3)[0]
    if placement == "file":
        rng = np.random.default_rng(world)
        assign = [rng.permutation(np.arange(cfg.num_experts) % world).tolist() for _ in cfg.moe_layers]
        f = tmp_path / "placement.json"
        f.write_text(json.dumps({"num_workers": world, "assignment": assign}))
        return layout.resolve(str(f), cfg, world)
    return layout.static_placement(placement, cfg, world)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("placement", ["round_robin", "contiguous", "affinity", "file"])
def test_lossless_threads(local_runs, arch, world, placement, tmp_path):
    path, llm, want, trace = local_runs[arch]
    placement = placement_for(placement, llm.cfg, world, trace, tmp_path)
    for scheme in ("standard", "coherent"):
        ex = thread_executor(path, placement, world, scheme, max_num_seqs=4, max_model_len=llm.max_model_len)
        old = llm.engine.executor
        llm.engine.executor = ex
        try:
            got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        finally:
            llm.engine.executor = old
        assert got == want, (scheme, placement, world)
        st = ex.stats()
        assert st["a2a_bytes"] > 0 and 0 < st["local_fraction"] < 1
        assert (st["kv_bytes"] > 0) == (scheme == "coherent")


def test_single_worker_moves_nothing(local_runs):
    path, llm, want, _ = local_runs["mixtral"]
    placement = layout.static_placement("round_robin", llm.cfg, 1)
    ex = thread_executor(path, placement, 1, "coherent", max_num_seqs=4, max_model_len=llm.max_model_len)
    old, llm.engine.executor = llm.engine.executor, ex
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    finally:
        llm.engine.executor = old
    assert got == want
    st = ex.stats()
    assert st["a2a_bytes"] == 0 and st["local_fraction"] == 1.0


def test_standard_bytes_match_routing(local_runs):
    """Standard scheme: every remote (token, expert) pair moves D floats + an expert id (int32 on the wire) out and D back."""
    path, llm, _, _ = local_runs["mixtral"]
    placement = layout.static_placement("round_robin", llm.cfg, 2)
    ex = thread_executor(path, placement, 2, "standard", max_num_seqs=4, max_model_len=llm.max_model_len)
    old, llm.engine.executor = llm.engine.executor, ex
    try:
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    finally:
        llm.engine.executor = old
    st = ex.stats()
    remote = round(st["routed_assignments"] * (1 - st["local_fraction"]))
    D = llm.cfg.hidden_size
    assert st["moe_bytes"] == remote * (D * 4 + 4) + remote * D * 4


def test_bad_placement_and_worker_count(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt("mixtral")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"num_workers": 2, "assignment": [[0, 1] * 4] * 2}))   # 2 layers, model has 3
    with pytest.raises(layout.PlacementMismatch, match="2 layers, the model has 3"):
        LLM(path, mode="ray", num_workers=2, placement=str(bad))
    bad.write_text(json.dumps({"num_workers": 2, "assignment": [[0, 1] * 3] * 3}))   # 6 experts, model has 8
    with pytest.raises(layout.PlacementMismatch, match="6 experts"):
        LLM(path, mode="ray", num_workers=2, placement=str(bad))
    with pytest.raises(layout.PlacementMismatch, match="made for 2 workers"):
        LLM(path, mode="ray", num_workers=4, placement=str(bad))
    with pytest.raises(layout.PlacementMismatch, match="exceeds the 8 experts"):
        LLM(path, mode="ray", num_workers=9)
    with pytest.raises(layout.PlacementMismatch, match="neither"):
        LLM(path, mode="ray", num_workers=2, placement="no_such_policy")
    with pytest.raises(ValueError, match="ep_scheme"):
        LLM(path, mode="ray", num_workers=2, ep_scheme="nope")


def test_scheme_registry_and_errors(tiny_ckpt):
    from moeyard.comm.schemes import SCHEMES, get_scheme
    from moeyard.moe.config import MoEConfig
    assert set(SCHEMES) == {"standard", "coherent", "tp"}
    for arch in ("mixtral", "deepseek_v3", "gpt_oss"):
        cfg = MoEConfig.from_dir(tiny_ckpt(arch)[0])
        for name in SCHEMES:
            get_scheme(name, cfg, 2)
    cfg = MoEConfig.from_dir(tiny_ckpt("qwen3_next")[0])
    get_scheme("standard", cfg, 2)
    for name in ("coherent", "tp"):          # the scheme and the model are both named
        with pytest.raises(ValueError, match=f"ep_scheme='{name}'.*qwen3_next.*use ep_scheme='standard'"):
            get_scheme(name, cfg, 2)
    with pytest.raises(ValueError, match="ep_scheme must be one of"):
        get_scheme("nope", cfg)
