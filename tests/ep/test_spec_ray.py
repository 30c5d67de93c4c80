"""Speculative shuffling in Ray mode: lossless vs local mode with KV moves, counters, table rebuilt with a warning."""

import warnings

import pytest

ray = pytest.importorskip("ray")

from moeyard.runtime import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


def test_ray_lossless_with_shuffling(ray_cluster, tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    local = LLM(path, max_num_seqs=4, max_num_batched_tokens=32)
    want = [o.token_ids for o in local.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    with pytest.warns(UserWarning, match="calibration run"):      # tiny checkpoints ship no trace.npz
        llm = LLM(path, mode="ray", num_workers=2, placement="round_robin", speculative_shuffle=True,
                  shuffle_options={"max_moves": 4, "horizon": 1e6, "calibration_tokens": 256},
                  max_num_seqs=4, max_num_batched_tokens=32)
    try:
        before = llm.stats()
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        st = llm.stats()
    finally:
        llm.close()
    assert got == want
    assert st["shuffle_moves"] > 0 and st["shuffle_bytes"] > before["shuffle_bytes"]
    assert st["a2a_bytes"] == sum(st[f"{k}_bytes"] for k in ("moe", "kv", "hidden", "meta", "shuffle"))
    assert 0 < st["spec_expert_precision_per_layer"][0] <= 1


def test_ray_tp_form2_lossless(ray_cluster, tiny_ckpt):
    """Form 2 on real Ray actors: tensor-parallel attention, head outputs scattered to predicted expert workers,
    co-activation placement from a calibration run (tiny checkpoints ship no trace.npz)."""
    path, _ = tiny_ckpt("qwen2_moe")
    local = LLM(path, max_num_seqs=4, max_num_batched_tokens=32)
    want = [o.token_ids for o in local.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    llm = LLM(path, mode="ray", num_workers=2, placement="coactivation", ep_scheme="tp", speculative_shuffle=True,
              shuffle_options={"slack": 1.0}, max_num_seqs=4, max_num_batched_tokens=32)
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        st = llm.stats()
        info = llm.engine.executor.placement_info
    finally:
        llm.close()
    assert got == want
    assert st["shuffle_bytes"] > 0 and st["tp_bytes"] == 0 and st["kv_bytes"] == 0
    assert 0 < st["spec_expert_precision"] <= 1 and 0 < st["spec_local_fraction"] <= 1
    assert info["coactivation_together"] >= info["coactivation_together_round_robin"]


@pytest.mark.parametrize("arch,scheme,world,spec", [("deepseek_v3", "coherent", 2, True), ("gpt_oss", "tp", 2, True),
                                                    ("deepseek_v3", "tp", 4, False), ("gpt_oss", "coherent", 4, False)])
def test_ray_schemes_on_mla_and_sinks(ray_cluster, tiny_ckpt, arch, scheme, world, spec):
    """The coherent and tensor-parallel schemes on real Ray actors serve MLA and sink attention losslessly."""
    path, _ = tiny_ckpt(arch)
    local = LLM(path, max_num_seqs=4, max_num_batched_tokens=16)
    want = [o.token_ids for o in local.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    opts = ({"slack": 0.5} if scheme == "tp" else {"max_moves": 4, "horizon": 1e6, "calibration_tokens": 256})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # no trace.npz: the shuffling table comes from a calibration run
        llm = LLM(path, mode="ray", num_workers=world, placement="round_robin", ep_scheme=scheme,
                  speculative_shuffle=spec, shuffle_options=opts if spec else None, max_num_seqs=4,
                  max_num_batched_tokens=16)
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        st = llm.stats()
    finally:
        llm.close()
    assert got == want
    assert st["ep_scheme"] == scheme and (st["kv_bytes"] > 0) == (scheme == "coherent")
    assert st["ray_calls_per_step"] <= world + 1e-9 or spec      # calibration calls count too with shuffling
