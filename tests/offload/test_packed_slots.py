"""Offload slots in the compute plan's storage: ``moeyard quantize`` checkpoints (int8/int4 bytes read straight into
slots) and bf16 checkpoints (bf16 bytes as on disk), multiplied by ``moe.compute.matmul``; tokens equal local mode
with the same quantization / plan."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moeyard.moe import compute as C
from moeyard.moe.config import MoEConfig
from moeyard.moe.errors import CheckpointError, ModelError
from moeyard.moe.quantize import quantize_checkpoint
from moeyard.offload.mode import OffloadConfigError
from moeyard.runtime.llm import LLM
from moeyard.runtime.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 30, 77, 12], [3, 4, 100, 2], [42]]
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _gen(llm):
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    st = llm.stats()
    llm.close()
    return out, st


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory):
    src, _ = tiny_ckpt("mixtral")
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for q in ("int8", "int4"):
        dst = str(root / q)
        quantize_checkpoint(src, dst, q)
        out[q] = dst
    return src, out


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_quantized_checkpoint_local_and_offload_equal_local_quantized(quantized, q):
    src, dst = quantized[0], quantized[1][q]
    ref, _ = _gen(LLM(src, quantization=q, max_num_seqs=4))
    assert _gen(LLM(dst, max_num_seqs=4))[0] == ref                     # loaded as stored, not re-quantized
    assert _gen(LLM(dst, quantization=q, max_num_seqs=4))[0] == ref
    full = MoEConfig.from_dir(src).expert_bytes(4)
    for io in ("thread", "process"):
        toks, st = _gen(LLM(dst, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25, io_mode=io))
        assert toks == ref, io
        assert st["expert_slot_kind"] == q and st["io_mode"] == io
        slot = st["expert_cache_bytes"] // st["expert_slots"]
        assert slot < full / (3.5 if q == "int8" else 7)                 # int8 ~1/4, int4 ~1/8 of fp32


def test_quantize_cli_and_bad_input(quantized, tmp_path):
    src, dst = quantized[0], quantized[1]["int8"]
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", "quantize", src, str(out), "--quantization",
                        "int4"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "config.json"))["quantization_config"] == {"quant_method": "moeyard",
                                                                         "weights": "int4"}
    with pytest.raises(ModelError, match="not an empty directory"):
        quantize_checkpoint(src, str(out), "int8")
    with pytest.raises(ModelError, match="already a moeyard checkpoint"):
        quantize_checkpoint(dst, str(tmp_path / "again"), "int8")
    with pytest.raises(ModelError, match=r"stored as int8 \(moeyard quantize\)"):
        LLM(dst, quantization="int4")
    with pytest.raises(OffloadConfigError, match="moeyard quantize SRC DST --quantization int4"):
        LLM(src, mode="offload", quantization="int4")


def _rewrite(src, dst, name, fn):
    """A copy of checkpoint ``src`` with tensor ``name`` replaced by ``fn(tensor)``."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            t = load_file(os.path.join(src, f))
            if name in t:
                t[name] = fn(t[name])
            save_file(t, os.path.join(dst, f))
        else:
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())


@pytest.mark.parametrize("mode", ["local", "offload"])
def test_mismatched_packed_tensor_is_named(quantized, tmp_path, mode):
    dst = quantized[1]["int4"]
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    bad_shape = str(tmp_path / "shape")
    _rewrite(dst, bad_shape, name, lambda t: t[:, :-1].contiguous())
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape .* needs"):
        LLM(bad_shape, mode=mode)
    bad_dtype = str(tmp_path / "dtype")
    _rewrite(dst, bad_dtype, name + "_scale", lambda t: t.float())
    with pytest.raises(CheckpointError, match=rf"'{name}_scale' has dtype F32 but int4 stores F16"):
        LLM(bad_dtype, mode=mode)


def test_packed_budget_too_small_names_the_minimum(quantized):
    dst = quantized[1]["int4"]
    probe = LLM(dst, mode="offload", max_num_seqs=4)
    slot = probe.stats()["expert_cache_bytes"] // probe.stats()["expert_slots"]
    probe.close()
    with pytest.raises(OffloadConfigError, match=rf"minimum is 2 slots = {2 * slot} bytes"):
        LLM(dst, mode="offload", expert_cache_bytes=slot)


def test_bf16_slots_hold_the_checkpoint_bytes(tiny_ckpt, tmp_path, monkeypatch):
    """Where the plan stores bf16 experts (native kernel with avx512 in plan_for; forced here so the torch fallback
    is covered on any CPU), slots hold the bf16 bytes as read and offload gives local mode's tokens."""
    import sys as _s
    _s.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from tiny_models import build_hf, save_hf
    path = str(tmp_path / "bf16")
    save_hf(build_hf("mixtral").to(torch.bfloat16), path)
    real = C.plan_for

    def bf16_plan(ckpt_dtype, compute_dtype, device, quantization=None):
        if ckpt_dtype in ("bfloat16", "bf16") and quantization is None and compute_dtype == torch.float32:
            return C.ComputePlan("bf16", "bf16", "bf16", C.native_status(), C.isa_summary(), "test: bf16 forced")
        return real(ckpt_dtype, compute_dtype, device, quantization)

    monkeypatch.setattr(C, "plan_for", bf16_plan)
    ref, _ = _gen(LLM(path, max_num_seqs=4))
    fp32_slot = MoEConfig.from_dir(path).expert_bytes(4)
    for io in ("thread", "process"):
        toks, st = _gen(LLM(path, mode="offload", max_num_seqs=4, expert_cache_fraction=0.25, io_mode=io))
        assert toks == ref and st["expert_slot_kind"] == "bf16"
        assert st["expert_cache_bytes"] // st["expert_slots"] == fp32_slot // 2


def test_quantized_checkpoint_in_ray_mode(quantized):
    src, dst = quantized[0], quantized[1]["int8"]
    ref, _ = _gen(LLM(src, quantization="int8", max_num_seqs=4))
    toks, _ = _gen(LLM(dst, mode="ray", num_workers=2, placement="round_robin", ep_scheme="standard",
                       max_num_seqs=4))
    assert toks == ref
