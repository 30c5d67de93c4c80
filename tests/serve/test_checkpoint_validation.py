"""Finding 6 of issue 15: checkpoint validation (confined files, dtypes, shapes in every mode, NaN, config types)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeyard.moe.errors import ModelError
from moeyard.runtime import LLM
from moeyard.runtime.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer Mixtral-shaped checkpoint with hidden 64 != expert width 32 (so a transposed expert differs)."""
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.experts import ParamExperts
    from moeyard.moe.model import MoEForCausalLM
    from moeyard.moe.save import mixtral_config_dict, save_mixtral
    path = str(tmp_path_factory.mktemp("valid_ckpt"))
    d = mixtral_config_dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            num_experts=4, top_k=2, intermediate_size=32, max_position_embeddings=256,
                            eos_token_id=None, dtype="float32")
    cfg = MoEConfig.from_dict(d)
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():                    # parameters start uninitialised: real values, never NaN garbage
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.fill_(1.0)
    save_mixtral(model.state_dict(), ParamExperts(cfg, init_std=0.2), cfg, d, path, dtype=torch.float32)
    return path


def copy(base, tmp_path) -> str:
    p = str(tmp_path / "ckpt")
    shutil.copytree(base, p)
    return p


def st_file(path):
    return [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")][0]


def rewrite(path, fn):
    f = st_file(path)
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def edit_config(path, fn):
    c = os.path.join(path, "config.json")
    with open(c) as f:
        d = json.load(f)
    d = fn(d)
    with open(c, "w") as f:
        json.dump(d, f)


def expert_name(t, part="w1"):
    return next(k for k in t if f"experts.1.{part}." in k and "layers.1." in k)


def test_valid_checkpoint_loads_in_local_and_offload(base):
    for mode, kw in (("local", {}), ("offload", {"expert_cache_fraction": 0.5})):
        llm = LLM(base, mode=mode, max_num_seqs=1, max_model_len=64, **kw)
        llm.close()


def test_weight_map_outside_model_dir(base, tmp_path):
    p = copy(base, tmp_path)
    names = list(load_file(st_file(p)))
    wm = {n: os.path.basename(st_file(p)) for n in names}
    wm[names[0]] = "../../../../etc/passwd"
    with open(os.path.join(p, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": wm}, f)
    with pytest.raises(ModelError, match=r"outside the model directory"):
        LLM(p, max_num_seqs=1, max_model_len=64)


@pytest.mark.parametrize("mode", ["local", "offload"])
def test_integer_weights_refused(base, tmp_path, mode):
    p = copy(base, tmp_path)
    names = {}

    def to_int(t):
        names["e"] = expert_name(t)
        t[names["e"]] = (t[names["e"]] * 100).to(torch.int32)
    rewrite(p, to_int)
    with pytest.raises(ModelError, match=rf"{names['e']}.*stored as I32"):
        LLM(p, mode=mode, max_num_seqs=1, max_model_len=64)


def test_transposed_expert_refused_in_offload(base, tmp_path):
    p = copy(base, tmp_path)
    names = {}

    def transpose(t):
        names["e"] = expert_name(t, "w2")
        t[names["e"]] = t[names["e"]].t().contiguous()
    rewrite(p, transpose)
    with pytest.raises(ModelError, match=rf"{names['e']}.*shape \[32, 64\] but the config implies \[64, 32\]"):
        LLM(p, mode="offload", expert_cache_fraction=0.5, max_num_seqs=1, max_model_len=64)


def test_nan_weights_refused(base, tmp_path):
    p = copy(base, tmp_path)

    def nan_expert(t):
        t[expert_name(t, "w3")][0, 0] = float("nan")
    rewrite(p, nan_expert)
    with pytest.raises(ModelError, match=r"layer 1 expert 1 up.*NaN"):
        LLM(p, max_num_seqs=1, max_model_len=64)
    p2 = copy(base, tmp_path / "b")

    def nan_dense(t):
        t["model.norm.weight"][3] = float("nan")
    rewrite(p2, nan_dense)
    with pytest.raises(ModelError, match=r"model.norm.weight.*NaN"):
        LLM(p2, mode="offload", expert_cache_fraction=0.5, max_num_seqs=1, max_model_len=64)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: {**d, "hidden_size": "128"}, r"hidden_size must be an integer, got '128'"),
    (lambda d: [d], r"expected a JSON object, got a JSON array"),
    (lambda d: {**d, "num_hidden_layers": 1_000_000}, r"num_hidden_layers \(1000000\) must be between"),
    (lambda d: {**d, "num_hidden_layers": 500}, r"num_hidden_layers = 500 but the checkpoint .* layers 0..1 only"),
    (lambda d: {**d, "num_local_experts": True}, r"num_local_experts must be an integer"),
])
def test_config_types_and_sizes(base, tmp_path, capsys, edit, msg):
    import time
    p = copy(base, tmp_path)
    edit_config(p, edit)
    t0 = time.time()
    with pytest.raises(ModelError, match=msg):
        LLM(p, max_num_seqs=1, max_model_len=64)
    assert time.time() - t0 < 10
    assert main(["generate", "--model", p, "--prompt", "x"]) == 2          # the CLI: one line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("error: config.json") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenizer_config_not_json(serve_ckpt, tmp_path):
    p = str(tmp_path / "tok")
    shutil.copytree(serve_ckpt, p)
    with open(os.path.join(p, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelError, match=r"tokenizer_config.json: not valid JSON"):
        LLM(p, max_num_seqs=1, max_model_len=64)
