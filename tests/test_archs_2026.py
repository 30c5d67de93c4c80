"""GLM-4.5 (glm4_moe), MiniMax-M2 (minimax_m2) and Qwen3-Next (qwen3_next, hybrid Gated-DeltaNet / gated attention)
against transformers' own modeling code: logits, greedy tokens in every mode, and Qwen3-Next's recurrent state
under chunked prefill, abort and slot reuse."""

import copy
import json
import os

import pytest
import torch

from moeyard.moe.config import MoEConfig
from moeyard.moe.errors import ModelError
from moeyard.runtime import LLM, SamplingParams
from tiny_models import ARCHS_2026, assert_logits_match, build_hf, save_hf

# mixed lengths: 1 token (prefill of one), 77 (more than one 64-token chunk of the delta rule)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [42], list(range(3, 80))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def make(arch):
        if arch not in cache:
            hf = build_hf(arch)
            cache[arch] = (save_hf(hf, str(tmp_path_factory.mktemp(arch))), hf)
        return cache[arch]
    return make


def _hf_greedy(hf, p, n=GREEDY.max_tokens):
    return hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist()


@pytest.fixture(scope="module")
def want(ckpt):
    memo = {}

    def get(arch, p):
        if (arch, tuple(p)) not in memo:
            memo[(arch, tuple(p))] = _hf_greedy(ckpt(arch)[1], p)
        return memo[(arch, tuple(p))]
    return get


@pytest.mark.parametrize("arch", ARCHS_2026)
def test_logits_match(ckpt, arch):
    path, hf = ckpt(arch)
    assert_logits_match(path, hf)


def test_config_fields(ckpt):
    g = MoEConfig.from_dir(ckpt("glm4_moe")[0])
    assert (g.rotary_dim, g.qk_norm, g.attention_bias, g.dense_layers, g.n_group) == (8, "head", True, (0,), 2)
    m = MoEConfig.from_dir(ckpt("minimax_m2")[0])
    assert (m.rotary_dim, m.qk_norm, m.router_kind) == (8, "full", "sigmoid_bias")
    q = MoEConfig.from_dir(ckpt("qwen3_next")[0])
    assert [q.is_linear_layer(i) for i in range(4)] == [True, False, True, False]
    assert q.rotary_dim == 4 and q.dense_layers == (2,) and q.rmsnorm_offset


@pytest.mark.parametrize("arch", ARCHS_2026)
def test_greedy_matches(ckpt, want, arch):
    """Batched prefill of unequal prompts, then batched decode, against transformers one prompt at a time."""
    llm = LLM(ckpt(arch)[0], max_num_seqs=8)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == want(arch, p), f"prompt of {len(p)} tokens"


def test_qwen3_next_chunked_prefill_abort_and_slot_reuse(ckpt, want):
    """Prompts prefilled in 7-token chunks beside decoding sequences; one request aborted mid-prefill and another
    mid-decode, their slots reused by new requests: the survivors' and the newcomers' tokens equal transformers'."""
    llm = LLM(ckpt("qwen3_next")[0], max_num_seqs=3, max_num_batched_tokens=7)
    eng = llm.engine
    seqs = {rid: eng.add_request(prompt_token_ids=p, params=GREEDY, request_id=rid)
            for rid, p in (("a", PROMPTS[2]), ("b", PROMPTS[4]), ("c", PROMPTS[0]))}
    late = {"d": PROMPTS[1], "e": PROMPTS[3]}
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps == 3:
            assert seqs["b"].num_computed < len(PROMPTS[4])           # aborted in the middle of its prefill
            eng.abort("b")
            seqs["d"] = eng.add_request(prompt_token_ids=late["d"], params=GREEDY, request_id="d")
        if "e" not in seqs and len(seqs["c"].output_ids) == 4:
            eng.abort("c")                                             # aborted mid-decode
            seqs["e"] = eng.add_request(prompt_token_ids=late["e"], params=GREEDY, request_id="e")
    assert seqs["b"].finish_reason == "abort" and seqs["c"].finish_reason == "abort"
    assert seqs["c"].output_ids == want("qwen3_next", PROMPTS[0])[:4]
    for rid, p in (("a", PROMPTS[2]), ("d", late["d"]), ("e", late["e"])):
        assert seqs[rid].output_ids == want("qwen3_next", p), rid


def test_recurrent_state_survives_a_rerun_step(ckpt):
    """A step run twice for a sequence (the engine reruns the unaffected requests of a step that failed for
    others) reads the same input state both times: the state of ctx tokens is never overwritten by ctx + n."""
    from moeyard.runtime.modes import new_kv_cache
    cfg = MoEConfig.from_dir(ckpt("qwen3_next")[0])
    kv = new_kv_cache(cfg, 2, 32, torch.float32, torch.device("cpu"))
    C, W = kv.conv[0].shape[-2:]
    S = kv.ssm[0].shape[-3:]
    st = lambda v: (torch.full((1, C, W), v), torch.full((1, *S), v))      # noqa: E731
    kv.set_states(0, [1], [0], [5], *st(1.0))                   # prompt: 5 tokens
    for _ in range(2):                                          # decode step at ctx 5, run twice
        conv, ssm = kv.state(0, 1, 5)
        assert conv.eq(1.0).all() and ssm.eq(1.0).all()
        kv.set_states(0, [1], [5], [1], *st(2.0))
    conv, ssm = kv.states(0, [1], [6])
    assert conv.eq(2.0).all() and ssm.eq(2.0).all()
    kv.set_states(0, [1], [0], [3], *st(3.0))                   # a new sequence in the slot forgets both
    with pytest.raises(RuntimeError, match="no recurrent state of slot 1 after 6 tokens"):
        kv.state(0, 1, 6)
    assert kv.state(0, 1, 0) == (None, None)


@pytest.mark.parametrize("arch", ARCHS_2026)
def test_offload_lossless(ckpt, want, arch):
    llm = LLM(ckpt(arch)[0], mode="offload", max_num_seqs=4, expert_cache_fraction=0.5)
    try:
        outs = llm.generate(prompt_token_ids=PROMPTS[:3], sampling_params=GREEDY)
        for p, o in zip(PROMPTS[:3], outs):
            assert o.token_ids == want(arch, p)
        assert llm.stats()["expert_misses"] > 0              # experts really came from disk
    finally:
        llm.close()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("arch,quant", [("minimax_m2", None), ("qwen3_next", "fp8")])
def test_ray_lossless(ray_cluster, ckpt, want, tmp_path, arch, quant):
    """Expert parallelism over 2 Ray workers, standard scheme (the model's own layers, all-to-all dispatcher); the
    hybrid model from a block-scaled FP8 checkpoint (each worker dequantizes its shard at load), its oracle
    transformers on transformers' dequantization of the file. GLM-4.5's MoE block is DeepSeek-V3's, run over Ray in
    test_archs_v3_oss.py."""
    import shutil

    import transformers as tf
    from quant_ckpt import dequantized_copy, linear_modules, to_fp8
    path, hf = ckpt(arch)
    expect = {tuple(p): want(arch, p) for p in PROMPTS[:2]}
    if quant == "fp8":
        path = str(shutil.copytree(path, tmp_path / "fp8"))
        to_fp8(path, linear_modules(hf), block=(8, 16))
        ref = tf.AutoModelForCausalLM.from_pretrained(dequantized_copy(path, str(tmp_path / "deq")),
                                                      dtype=torch.float32).eval()
        expect = {tuple(p): _hf_greedy(ref, p) for p in PROMPTS[:2]}
    llm = LLM(path, mode="ray", num_workers=2, placement="round_robin", ep_scheme="standard", max_num_seqs=4)
    try:
        outs = llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY)
        for p, o in zip(PROMPTS[:2], outs):
            assert o.token_ids == expect[tuple(p)]
    finally:
        llm.close()


def test_hybrid_model_refuses_kv_moving_schemes(ckpt):
    from moeyard.comm.schemes import get_scheme
    from moeyard.cluster.planner import check_config
    cfg = MoEConfig.from_dir(ckpt("qwen3_next")[0])
    with pytest.raises(ValueError, match="speculative_shuffle=False"):
        check_config("standard", cfg, 2, shuffle=True)
    with pytest.raises(ValueError, match="ep_scheme='standard'"):
        get_scheme("coherent", cfg)


def _cfg(ckpt, arch):
    return json.load(open(os.path.join(ckpt(arch)[0], "config.json")))


@pytest.mark.parametrize("arch,over,fields", [
    ("qwen3_next", {"layer_types": ["linear_attention", "full_attention"]}, ["layer_types", "num_hidden_layers"]),
    ("qwen3_next", {"layer_types": ["linear_attention", "mamba", "full_attention", "full_attention"]},
     ["layer_types", "'mamba'"]),
    ("qwen3_next", {"layer_types": None, "full_attention_interval": 0}, ["full_attention_interval"]),
    ("qwen3_next", {"linear_num_value_heads": 3}, ["linear_num_value_heads", "linear_num_key_heads"]),
    ("glm4_moe", {"topk_group": 3}, ["topk_group", "n_group"]),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.05}},
     ["rotary dimension", "partial_rotary_factor"]),
    ("minimax_m2", {"num_experts_per_tok": 9}, ["num_experts_per_tok", "num_local_experts"]),
])
def test_contradictory_configs_name_the_field(ckpt, arch, over, fields):
    d = {**copy.deepcopy(_cfg(ckpt, arch)), **over}
    with pytest.raises(ModelError) as e:
        MoEConfig.from_dict(d)
    for f in fields:
        assert f in str(e.value)


def test_cli_bad_layer_types_exits_2(ckpt, tmp_path):
    import shutil
    import subprocess
    import sys
    p = shutil.copytree(ckpt("qwen3_next")[0], tmp_path / "q")
    d = json.load(open(p / "config.json"))
    d["layer_types"] = ["linear_attention"] * 3
    json.dump(d, open(p / "config.json", "w"))
    r = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", "generate", "--model", str(p), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "layer_types has 3 entries but num_hidden_layers is 4" in r.stderr
