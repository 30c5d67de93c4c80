"""Checkpoints as published in block-scaled FP8 (DeepSeek-V3, MiniMax-M2, Qwen3-Next FP8 releases) and MXFP4
(gpt-oss): our dequantization equals transformers' bit for bit, greedy tokens equal transformers on the dequantized
model, offload reads the quantized bytes, and bad quantized checkpoints fail with one line naming the tensor."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeyard.moe.checkpoint import CheckpointReader
from moeyard.moe.config import MoEConfig
from moeyard.moe.errors import CheckpointError, ModelError
from moeyard.moe.experts import read_expert
from moeyard.moe.loader import load_model
from moeyard.moe.quant_formats import dequant_fp8, dequant_mxfp4
from moeyard.runtime import LLM, SamplingParams
from quant_ckpt import dequantized_copy, linear_modules, to_fp8, to_mxfp4
from tiny_models import build_hf, save_hf

PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 40))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# MiniMax-M2's release keeps its router and router bias unquantized: the not-converted list is honoured
FP8 = {"deepseek_v3": (), "minimax_m2": ("gate", "e_score_correction_bias", "lm_head"), "qwen3_next": ()}


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """arch -> (fp8 checkpoint, transformers' model of its dequantization)."""
    import transformers as tf
    cache = {}

    def make(arch):
        if arch not in cache:
            hf = build_hf(arch)
            path = save_hf(hf, str(tmp_path_factory.mktemp(f"{arch}_fp8")))
            to_fp8(path, linear_modules(hf), block=(8, 16), skip=FP8[arch])
            oracle = dequantized_copy(path, str(tmp_path_factory.mktemp(f"{arch}_fp8_deq")) + "/m")
            cache[arch] = (path, tf.AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32).eval())
        return cache[arch]
    return make


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """(gpt-oss MXFP4 checkpoint, transformers' model loading it with dequantize=True)."""
    import transformers as tf
    path = save_hf(build_hf("gpt_oss"), str(tmp_path_factory.mktemp("oss_mxfp4")))
    to_mxfp4(path)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=tf.Mxfp4Config(dequantize=True))
    return path, hf.eval()


def _greedy(hf, p):
    return hf.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist()


def _rand_fp8(shape, g):
    return (torch.randn(shape, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)


# ---- the arithmetic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_dequant_is_transformers_bit_for_bit(out_dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    g = torch.Generator().manual_seed(0)
    w, s = _rand_fp8((3, 256, 384), g), torch.rand((3, 2, 3), generator=g) * 1e-2
    ref = Fp8Dequantize(None)._dequantize_one(w, s, out_dtype)
    assert torch.equal(dequant_fp8(w, s, (128, 128)).to(out_dtype), ref)
    e8 = torch.randint(110, 140, (2, 3), generator=g, dtype=torch.uint8)          # ue8m0 scales as bytes
    assert torch.equal(dequant_fp8(w[0], e8, (128, 128)), Fp8Dequantize(None)._dequantize_one(w[0], e8, torch.float32))


def test_fp8_partial_edge_blocks():
    """Shapes that are not multiples of the block (DeepSeek-V3's kv_a_proj_with_mqa is 576 rows): edge blocks use
    their own scale; equal to transformers' _dequantize_fp8_weight and to a per-block loop from the spec."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    g = torch.Generator().manual_seed(1)
    w, s = _rand_fp8((40, 72), g), torch.rand((3, 3), generator=g)
    ours = dequant_fp8(w, s, (16, 32))
    assert torch.equal(ours, _dequantize_fp8_weight(w, s, [16, 32], torch.float32))
    spec = torch.empty(40, 72)
    for i in range(3):
        for j in range(3):
            spec[16 * i:16 * i + 16, 32 * j:32 * j + 32] = w[16 * i:16 * i + 16, 32 * j:32 * j + 32].float() * s[i, j]
    assert torch.equal(ours, spec)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequant_is_transformers_bit_for_bit(out_dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 48, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(112, 140, (4, 48, 3), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=out_dtype)                # [4, 96, 48]
    assert torch.equal(dequant_mxfp4(blocks, scales).transpose(-1, -2).to(out_dtype), ref)


# ---- checkpoints ------------------------------------------------------------------------------------------------
def _check_weights(lm, hf, path):
    """Every dense parameter and every expert matrix we load equals transformers' (bit for bit)."""
    ref = dict(hf.named_parameters()) | dict(hf.named_buffers())
    names = {n.replace("block_sparse_moe", "mlp"): n for n in ref}
    n = 0
    for name, p in lm.model.named_parameters():
        hn = name.replace("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias")
        if hn in names:
            assert torch.equal(p, ref[names[hn]].to(p.dtype)), name
            n += 1
    assert n > 20
    cfg, reader = lm.cfg, CheckpointReader(path)
    F = cfg.expert_intermediate_size
    for layer in cfg.moe_layers:
        ex = hf.model.layers[layer].mlp.experts
        for e in (0, cfg.num_experts - 1):
            w = read_expert(cfg, reader, layer, e)
            if cfg.expert_act == "swiglu_oss":      # gpt-oss: [E, D, 2F], gate/up interleaved
                gate, up, down = ex.gate_up_proj[e][:, 0::2].T, ex.gate_up_proj[e][:, 1::2].T, ex.down_proj[e].T
            else:
                gate, up, down = ex.gate_up_proj[e][:F], ex.gate_up_proj[e][F:], ex.down_proj[e]
            assert torch.equal(w.gate, gate) and torch.equal(w.up, up) and torch.equal(w.down, down), (layer, e)


@pytest.mark.parametrize("arch", list(FP8))
def test_fp8_checkpoint_weights_and_greedy(fp8, arch):
    path, hf = fp8(arch)
    cfg = MoEConfig.from_dir(path)
    assert cfg.quant.method == "fp8" and cfg.quant.block == (8, 16)
    r = CheckpointReader(path)
    assert r.dtype(f"model.layers.{cfg.moe_layers[0]}.self_attn.o_proj.weight" if arch != "qwen3_next"
                   else "model.layers.0.linear_attn.in_proj_qkvz.weight") == "F8_E4M3"
    _check_weights(load_model(path, device="cpu"), hf, path)
    llm = LLM(path, max_num_seqs=4)
    for p, o in zip(PROMPTS, llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)):
        assert o.token_ids == _greedy(hf, p)


def test_transformers_reads_our_fp8_files_the_same(fp8):
    """End to end: transformers' own FP8 loader (quantization_config from config.json; it dequantizes on a CPU)
    reads the DeepSeek-V3-layout files into the same weights as the oracle built from its per-tensor dequant."""
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    import transformers as tf
    path, hf = fp8("deepseek_v3")
    direct = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    got = dict(direct.named_parameters())
    for name, p in hf.named_parameters():
        assert torch.equal(got[name], p), name


def test_mxfp4_checkpoint_weights_and_greedy(mxfp4):
    path, hf = mxfp4
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in CheckpointReader(path)
    _check_weights(load_model(path, device="cpu"), hf, path)
    llm = LLM(path, max_num_seqs=4)
    for p, o in zip(PROMPTS, llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)):
        assert o.token_ids == _greedy(hf, p)


def _expert_file_bytes(path, cfg, layer, expert) -> int:
    """Bytes of one expert as stored: its quantized matrices and scales (and biases), from the file headers."""
    r = CheckpointReader(path)
    names = [n for n in r.names() if n.startswith(f"model.layers.{layer}.mlp.experts.")]
    per = [n for n in names if n.split(".")[4] == str(expert)]
    if per:
        return sum(r.nbytes(n) for n in per)
    return sum(r.nbytes(n) for n in names) // cfg.num_experts       # fused: one expert's slice of each


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_offload_reads_the_quantized_bytes(fp8, mxfp4, which):
    path, hf = fp8("deepseek_v3") if which == "fp8" else mxfp4
    cfg = MoEConfig.from_dir(path)
    llm = LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.5)
    try:
        for p, o in zip(PROMPTS, llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)):
            assert o.token_ids == _greedy(hf, p)
        tier = llm.engine.executor.cache.tier
        per = _expert_file_bytes(path, cfg, cfg.moe_layers[0], 0)
        assert tier.reads > 0 and tier.bytes_read == tier.reads * per
        bf16 = 2 * cfg.expert_bytes(1) + (0 if which == "fp8" else 2 * (2 * cfg.expert_intermediate_size
                                                                        + cfg.hidden_size))
        assert per < (0.55 if which == "fp8" else 0.35) * bf16, (per, bf16)
    finally:
        llm.close()


# ---- bad input --------------------------------------------------------------------------------------------------
def _edit(src, dst, config=None, tensors=None):
    p = shutil.copytree(src, dst)
    if config is not None:
        d = json.load(open(p / "config.json"))
        config(d)
        json.dump(d, open(p / "config.json", "w"))
    if tensors is not None:
        sd = load_file(str(p / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(p / "model.safetensors"))
    return str(p)


W = "model.layers.1.mlp.experts.3.down_proj.weight"
SCALE = W + "_scale_inv"


@pytest.mark.parametrize("case,match", [
    ("method", r"quant_method 'gptq' is not supported; supported: fp8, mxfp4"),
    ("missing", rf"tensor '{SCALE}' \(the fp8 scales of 'model.layers.1.mlp.experts.3.down_proj.weight'\) not found"),
    ("shape", rf"tensor '{SCALE}' has shape \[4, 2\] but the fp8 scales .* need \[8, 2\]"),
    ("skipped", r"tensor 'model.layers.0.self_attn.o_proj.weight' is float8 but quantization_config."
                r"modules_to_not_convert lists 'model.layers.0.self_attn.o_proj'"),
    ("e5m2", r"tensor 'model.layers.1.mlp.experts.3.down_proj.weight' is F8_E5M2: only e4m3"),
])
def test_bad_fp8_checkpoint_names_the_problem(fp8, tmp_path, case, match):
    src = fp8("deepseek_v3")[0]
    edits = {"method": dict(config=lambda d: d["quantization_config"].update(quant_method="gptq")),
             "missing": dict(tensors=lambda sd: sd.pop(SCALE)),
             "shape": dict(tensors=lambda sd: sd.__setitem__(SCALE, sd[SCALE][:4])),
             "skipped": dict(config=lambda d: d["quantization_config"].update(
                 modules_to_not_convert=["model.layers.0.self_attn.o_proj"])),
             "e5m2": dict(tensors=lambda sd: sd.__setitem__(W, sd[W].float().to(torch.float8_e5m2)))}
    p = _edit(src, tmp_path / "m", **edits[case])
    with pytest.raises(ModelError, match=match):
        load_model(p, device="cpu")
    if case == "missing":       # offload reads experts its own way: the same error, at start
        with pytest.raises(CheckpointError, match=match):
            LLM(p, mode="offload", expert_cache_fraction=0.5)
        r = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", "generate", "--model", p, "--prompt", "x"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and SCALE in r.stderr


def test_kimi_k2_is_read_as_deepseek_v3(fp8):
    """Kimi K2 ships DeepSeek-V3's architecture and FP8 layout under model_type "kimi_k2" (its own config code)."""
    d = json.load(open(os.path.join(fp8("deepseek_v3")[0], "config.json")))
    a, b = MoEConfig.from_dict(d), MoEConfig.from_dict({**d, "model_type": "kimi_k2"})
    assert b.model_type == "kimi_k2" and b.quant == a.quant and b.attention_kind == "mla"
    assert {k: v for k, v in vars(b).items() if k not in ("model_type", "raw")} == \
        {k: v for k, v in vars(a).items() if k not in ("model_type", "raw")}


def test_bad_mxfp4_checkpoint_names_the_tensor(mxfp4, tmp_path):
    name = "model.layers.2.mlp.experts.down_proj_scales"
    p = _edit(mxfp4[0], tmp_path / "m", tensors=lambda sd: sd.__setitem__(name, sd[name][:, :5].contiguous()))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[8, 5, 1\] but the config implies "
                                              r"\[8, 64, 1\]"):
        load_model(p, device="cpu")
