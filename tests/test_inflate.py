"""``moeyard inflate``: wider experts, identical outputs, in every architecture's on-disk layout and in offload."""

import json
import os

import pytest

from moeyard.moe.checkpoint import CheckpointReader
from moeyard.moe.config import MoEConfig
from moeyard.moe.errors import ModelError
from moeyard.moe.inflate import inflate
from moeyard.runtime import LLM, SamplingParams
from moeyard.runtime.cli import main as cli

PROMPTS = [[5, 6, 7, 8], list(range(20, 37)), [99, 3]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

LAYOUTS = [("mixtral", False), ("qwen2_moe", False), ("olmoe", False), ("deepseek_v3", False),
           ("deepseek_v3", True), ("gpt_oss", False)]


def _tokens(path, **kw):
    llm = LLM(path, max_num_seqs=4, **kw)
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    finally:
        llm.close()


@pytest.mark.parametrize("arch,fused", LAYOUTS, ids=[f"{a}{'-fused' if f else ''}" for a, f in LAYOUTS])
def test_inflated_tiny_checkpoint_is_token_identical(tiny_ckpt, tmp_path, arch, fused):
    src, _ = tiny_ckpt(arch, fused=fused)
    F = MoEConfig.from_dir(src).expert_intermediate_size
    dst = str(tmp_path / "big")
    s = inflate(src, dst, 3 * F + 5)
    cfg = MoEConfig.from_dir(dst)
    assert cfg.expert_intermediate_size == 3 * F + 5 and s["expert_width"] == [F, 3 * F + 5]
    r = CheckpointReader(dst)
    assert sum(r.nbytes(n) for n in r.names()) > sum(CheckpointReader(src).nbytes(n)
                                                      for n in CheckpointReader(src).names())
    assert _tokens(dst) == _tokens(src)


def test_inflated_default_model_local_and_offload(tmp_path):
    dst = str(tmp_path / "default_x3")
    inflate(_embedded("default"), dst, 768)
    assert os.path.isfile(os.path.join(dst, "tokenizer.json")) and os.path.isfile(os.path.join(dst, "trace.npz"))
    ref = _tokens("default")
    assert _tokens(dst) == ref
    assert _tokens(dst, mode="offload", expert_cache_fraction=0.25) == ref


def _embedded(name):
    from moeyard.moe.loader import resolve_model_path
    return resolve_model_path(name)


def test_inflate_bad_input(tiny_ckpt, tmp_path, capsys):
    src, _ = tiny_ckpt("mixtral")
    F = MoEConfig.from_dir(src).expert_intermediate_size
    with pytest.raises(ModelError, match=f"smaller than the source's expert width {F}"):
        inflate(src, str(tmp_path / "a"), F - 1)
    with pytest.raises(ModelError, match="inside the source"):
        inflate(src, os.path.join(src, "sub"), 2 * F)
    odd = tmp_path / "odd"
    odd.mkdir()
    d = json.load(open(os.path.join(src, "config.json")))
    json.dump({**d, "model_type": "llama"}, open(odd / "config.json", "w"))
    with pytest.raises(ModelError, match="unsupported model_type 'llama'"):
        inflate(str(odd), str(tmp_path / "b"), 2 * F)
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    json.dump({**d, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]}}, open(fp8 / "config.json", "w"))
    with pytest.raises(ModelError, match="is a fp8 checkpoint; inflate works on unquantized weights"):
        inflate(str(fp8), str(tmp_path / "c"), 2 * F)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    capsys.readouterr()
    assert cli(["inflate", src, str(full), "--expert-intermediate", str(2 * F)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: inflate: destination") and "not an empty directory" in err and "\n" not in err
    assert (full / "x").read_text() == "keep me"


def test_inflated_shards_keep_each_expert_in_one_run(tiny_ckpt, tmp_path):
    """Small shards: an expert's matrices never straddle two files, so offload keeps one run per expert (the bf16
    slots' raw layout; a split expert made the inflated deepseek-mini fall back to float32 slots)."""
    from moeyard.offload.tiers import DiskTier
    src, _ = tiny_ckpt("deepseek_v3")
    cfg0 = MoEConfig.from_dir(src)
    dst = str(tmp_path / "big")
    F = cfg0.expert_intermediate_size
    per = 3 * cfg0.hidden_size * 4 * F * 2
    s = inflate(src, dst, 4 * F, shard_bytes=int(per * 2.5))
    assert s["files"] > 2
    cfg = MoEConfig.from_dir(dst)
    assert DiskTier(cfg, CheckpointReader(dst)).raw is not None
    assert _tokens(dst) == _tokens(src)
