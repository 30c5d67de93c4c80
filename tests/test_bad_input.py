"""Bad checkpoints and bad requests give one clear error naming the problem; the CLI exits 2 without a traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from moeyard.moe.errors import CheckpointError, ModelError
from moeyard.moe.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", *args], capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stderr


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_model_type_lists_supported(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ModelError, match="unsupported model_type 'llama'.*mixtral.*qwen2_moe.*olmoe"):
        load_model(p)


def test_contradictory_config_names_fields(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["num_experts_per_tok"] = 99
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(ModelError, match="experts per token"):
        load_model(p)


def test_truncated_safetensors_names_file(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    f = os.path.join(p, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_model(p)


def test_corrupt_header_names_file(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    f = os.path.join(p, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_model(p)


def _rewrite(p, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(p, "model.safetensors")
    d = load_file(f)
    fn(d)
    save_file(d, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    _rewrite(p, lambda d: d.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight.*not found"):
        load_model(p)


def test_wrong_shape_names_tensor_and_shapes(tiny_ckpt, tmp_path):
    import torch
    p = _copy(tiny_ckpt("mixtral")[0], tmp_path / "m")
    _rewrite(p, lambda d: d.__setitem__("model.layers.0.block_sparse_moe.experts.3.w2.weight", torch.zeros(64, 95)))
    with pytest.raises(CheckpointError, match=r"experts.3.w2.weight.*\[64, 95\].*\[64, 96\]"):
        load_model(p)


def test_cli_errors_are_one_line_exit_2(tiny_ckpt, tmp_path):
    rc, err = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert rc == 2 and err.strip().startswith("error: model directory not found")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    path = tiny_ckpt("mixtral")[0]
    rc, err = _cli("generate", "--model", path, "--prompt", "hi", "--mode", "warp")
    assert rc == 2 and "valid modes" in err and "Traceback" not in err
    rc, err = _cli("generate", "--model", path, "--prompt", "hi", "--max-tokens", "-3")
    assert rc == 2 and "max_tokens" in err and "Traceback" not in err
