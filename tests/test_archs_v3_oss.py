"""DeepSeek-V3 (MLA, group-limited sigmoid routing, shared experts, dense-first layers, YaRN) and gpt-oss (sink
attention, sliding window, clamped SwiGLU experts with biases, fused transposed layout) against transformers."""

import copy
import json
import os

import pytest
import torch

from moeyard.moe.config import MoEConfig
from moeyard.moe.errors import ModelError
from moeyard.runtime import LLM, SamplingParams
from tiny_models import assert_logits_match, build_hf, save_hf

# lengths 5, 3, 30, 4, 13: batched decode of unequal sequences; 30 and 13 exceed gpt-oss's sliding window of 8
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [200, 13, 99, 4], list(range(100, 226, 10))[:13]]
LAYOUTS = [("deepseek_v3", False), ("deepseek_v3", True), ("gpt_oss", False)]
IDS = ["deepseek_v3-per_expert", "deepseek_v3-fused", "gpt_oss"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def make(arch, fused=False, **over):
        key = (arch, fused, json.dumps(over, sort_keys=True))
        if key not in cache:
            hf = build_hf(arch, **over)
            path = str(tmp_path_factory.mktemp(f"{arch}{'_fused' if fused else ''}"))
            save_hf(hf, path, fused=fused)
            cache[key] = (path, hf)
        return cache[key]
    return make


def _hf_greedy(hf, p, n=24):
    return hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist()


@pytest.mark.parametrize("arch,fused", LAYOUTS, ids=IDS)
def test_logits_match(ckpt, arch, fused):
    path, hf = ckpt(arch, fused)
    assert_logits_match(path, hf)


def test_on_disk_layouts(ckpt):
    """transformers writes DeepSeek-V3 experts per expert (default) or fused; gpt-oss always fused+transposed."""
    from moeyard.moe.checkpoint import CheckpointReader
    per, _ = ckpt("deepseek_v3", False)
    fused, _ = ckpt("deepseek_v3", True)
    oss, _ = ckpt("gpt_oss", False)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in CheckpointReader(per)
    assert "model.layers.1.mlp.experts.gate_up_proj" in CheckpointReader(fused)
    r = CheckpointReader(oss)
    assert r.shape("model.layers.0.mlp.experts.gate_up_proj") == (8, 64, 64)      # [E, D, 2F]
    assert r.shape("model.layers.0.mlp.experts.down_proj") == (8, 32, 64)         # [E, F, D]


@pytest.mark.parametrize("arch,fused", LAYOUTS, ids=IDS)
def test_greedy_matches(ckpt, arch, fused):
    path, hf = ckpt(arch, fused)
    llm = LLM(path, max_num_seqs=8)
    outs = llm.generate(prompt_token_ids=PROMPTS,
                        sampling_params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _hf_greedy(hf, p), f"prompt of {len(p)} tokens"
        assert o.finish_reason == "length"


def test_deepseek_variants(ckpt):
    """q_lora_rank null (plain q_proj), non-interleaved rope, no YaRN, no group limit, norm_topk_prob off."""
    path, hf = ckpt("deepseek_v3", False, q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                    norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = MoEConfig.from_dir(path)
    assert cfg.q_lora_rank is None and cfg.rope_type == "default"
    llm = LLM(path, max_num_seqs=4)
    outs = llm.generate(prompt_token_ids=PROMPTS[:3],
                        sampling_params=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS[:3], outs):
        assert o.token_ids == _hf_greedy(hf, p, 16)


def test_config_and_cache_shapes(ckpt):
    path, _ = ckpt("deepseek_v3", False)
    cfg = MoEConfig.from_dir(path)
    assert cfg.moe_layers == [1, 2] and cfg.dense_layers == (0,)
    assert cfg.kv_shape == (1, 32 + 8, 1, 0)
    from moeyard.runtime.modes import new_kv_cache
    kv = new_kv_cache(cfg, 2, 64, torch.float32, torch.device("cpu"))
    assert kv.bytes_per_token() == 3 * 40 * 4                       # latent + rope key, no values
    assert kv.k[0].shape[-2:] == (1, 40) and kv.v[0].shape[-1] == 0
    path, _ = ckpt("gpt_oss", False)
    cfg = MoEConfig.from_dir(path)
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.sliding_window == 8 and cfg.moe_layers == [0, 1, 2]
    kv = new_kv_cache(cfg, 2, 64, torch.float32, torch.device("cpu"))
    assert kv.bytes_per_token() == 3 * 2 * 2 * 16 * 4


def test_gpt_oss_read_expert_per_expert(ckpt):
    """read_expert slices one expert (weights and biases) out of the interleaved, transposed fused tensors."""
    from moeyard.moe.checkpoint import CheckpointReader
    from moeyard.moe.experts import read_expert
    path, hf = ckpt("gpt_oss", False)
    cfg = MoEConfig.from_dir(path)
    ex = hf.model.layers[1].mlp.experts
    w = read_expert(cfg, CheckpointReader(path), 1, 5)
    torch.testing.assert_close(w.gate, ex.gate_up_proj[5][:, 0::2].T, rtol=0, atol=0)
    torch.testing.assert_close(w.up, ex.gate_up_proj[5][:, 1::2].T, rtol=0, atol=0)
    torch.testing.assert_close(w.down, ex.down_proj[5].T, rtol=0, atol=0)
    torch.testing.assert_close(w.gate_bias, ex.gate_up_proj_bias[5][0::2], rtol=0, atol=0)
    torch.testing.assert_close(w.up_bias, ex.gate_up_proj_bias[5][1::2], rtol=0, atol=0)
    torch.testing.assert_close(w.down_bias, ex.down_proj_bias[5], rtol=0, atol=0)
    assert w.act == "swiglu_oss" and w.limit == cfg.swiglu_limit


def _ds_dict():
    import transformers as tf
    from tiny_models import hf_config
    return hf_config("deepseek_v3").to_dict()


@pytest.mark.parametrize("over,fields", [
    ({"topk_group": 5}, ["topk_group", "n_group"]),
    ({"n_group": 3, "topk_group": 1}, ["n_routed_experts", "n_group"]),
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok", "n_routed_experts"]),
    ({"num_experts_per_tok": 5, "n_group": 4, "topk_group": 2}, ["num_experts_per_tok", "topk_group"]),
    ({"first_k_dense_replace": 7}, ["first_k_dense_replace", "num_hidden_layers"]),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, ["rope type"]),
])
def test_deepseek_contradictory_config(over, fields):
    d = {**_ds_dict(), **over}
    with pytest.raises(ModelError) as e:
        MoEConfig.from_dict(d)
    for f in fields:
        assert f in str(e.value)


def test_gpt_oss_contradictory_config(ckpt):
    path, _ = ckpt("gpt_oss", False)
    d = json.load(open(os.path.join(path, "config.json")))
    for over, fields in (({"num_experts_per_tok": 9}, ["num_experts_per_tok", "num_local_experts"]),
                         ({"layer_types": ["full_attention"]}, ["layer_types", "num_hidden_layers"]),
                         ({"layer_types": ["chunked", "full_attention", "full_attention"]}, ["layer_types"])):
        with pytest.raises(ModelError) as e:
            MoEConfig.from_dict({**copy.deepcopy(d), **over})
        for f in fields:
            assert f in str(e.value)


def _mode_or_skip(module: str):
    import importlib
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{module} is not importable yet ({type(e).__name__}: {e})")


@pytest.mark.parametrize("arch,fused", [("deepseek_v3", True), ("deepseek_v3", False), ("gpt_oss", False)],
                         ids=["deepseek_v3-fused", "deepseek_v3-per_expert", "gpt_oss"])
def test_offload_lossless(ckpt, arch, fused):
    _mode_or_skip("moeyard.offload.mode")
    path, hf = ckpt(arch, fused)
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.5)
    outs = llm.generate(prompt_token_ids=PROMPTS[:3],
                        sampling_params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS[:3], outs):
        assert o.token_ids == _hf_greedy(hf, p)
    llm.close()


@pytest.fixture(scope="module")
def ray_cluster():
    _mode_or_skip("moeyard.cluster.mode")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("arch,fused", [("deepseek_v3", True), ("gpt_oss", False)], ids=["deepseek_v3", "gpt_oss"])
def test_ray_lossless(ray_cluster, ckpt, arch, fused):
    """Expert-parallel over 2 Ray workers, standard scheme, against transformers (the coherent and tp schemes on
    these architectures: tests/ep/test_schemes_archs.py and test_spec_ray.py)."""
    path, hf = ckpt(arch, fused)
    llm = LLM(path, mode="ray", num_workers=2, placement="round_robin", ep_scheme="standard", max_num_seqs=4)
    try:
        outs = llm.generate(prompt_token_ids=PROMPTS[:3],
                            sampling_params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        for p, o in zip(PROMPTS[:3], outs):
            assert o.token_ids == _hf_greedy(hf, p)
    finally:
        llm.close()
