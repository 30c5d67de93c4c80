"""The embedded models — ``default`` (moe/default_model, Mixtral-shaped) and ``deepseek-mini`` (moe/deepseek_mini,
DeepSeek-V3 architecture, fine-grained experts): each loads in our loader and in transformers with the same greedy
tokens, tokenizer and chat template, size and architecture limits, the routing trace and its routing health."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
MODEL_DIRS = {"default": os.environ.get("MOEYARD_DEFAULT_MODEL_DIR", os.path.join(ROOT, "moe", "default_model")),
              "deepseek-mini": os.path.join(ROOT, "moe", "deepseek_mini")}
MAX_BYTES = {"default": 64 * 2**20, "deepseek-mini": 100 * 2**20}

PROMPTS = ["\\begin{theorem}\nLet $G$ be a finite group and", "def main():\n    "]


@pytest.fixture(scope="module", params=list(MODEL_DIRS))
def name(request):
    if not os.path.isfile(os.path.join(MODEL_DIRS[request.param], "config.json")):
        pytest.skip(f"the {request.param} model is absent ({MODEL_DIRS[request.param]}/config.json)")
    return request.param


def _greedy(model, ids, n):
    from moeyard.moe.model import ForwardBatch
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(out), ForwardBatch.blocks(1, len(out), "cpu"))
            out.append(int(logits[-1].argmax()))
    return out[len(ids):]


@pytest.fixture(scope="module")
def lm(name):
    from moeyard.moe.loader import load_model
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(name, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def cfg_json(name):
    with open(os.path.join(MODEL_DIRS[name], "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trace(name):
    p = os.path.join(MODEL_DIRS[name], "trace.npz")
    if not os.path.isfile(p):
        pytest.skip(f"{p} is absent")
    return dict(np.load(p))


def test_architecture_and_size(name, cfg_json):
    assert cfg_json["num_hidden_layers"] >= 8
    if name == "default":
        assert cfg_json["model_type"] == "mixtral"
        assert cfg_json["num_local_experts"] >= 16
        assert cfg_json["num_experts_per_tok"] == 2
    else:
        assert cfg_json["model_type"] == "deepseek_v3" and cfg_json["architectures"] == ["DeepseekV3ForCausalLM"]
        assert cfg_json["first_k_dense_replace"] == 1
        assert cfg_json["n_routed_experts"] >= 64 and cfg_json["num_experts_per_tok"] in (6, 8)
        assert 1 <= cfg_json["n_shared_experts"] <= 2
        # active routed-expert parameters per token comparable to the default model's (top-2 of 256-wide)
        assert 0.5 <= cfg_json["num_experts_per_tok"] * cfg_json["moe_intermediate_size"] / (2 * 256) <= 2
        with open(os.path.join(MODEL_DIRS["default"], "tokenizer.json")) as a, \
                open(os.path.join(MODEL_DIRS[name], "tokenizer.json")) as b:
            assert a.read() == b.read(), "the same tokenizer as the default model"
    d = MODEL_DIRS[name]
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert files
    assert sum(os.path.getsize(os.path.join(d, f)) for f in files) <= MAX_BYTES[name]


def test_tokenizer_round_trip_and_chat_template(lm, cfg_json):
    tok = lm.tokenizer
    assert 4096 <= tok.vocab_size <= 8192
    for text in ["Hello, world! The quick brown fox.", "Größe über Straße — naïve café", "$\\alpha_i^2 + \\beta$",
                 "def f(x):\n\treturn {'a': [1, 2]}  # ok\n", "日本語のテキスト 😀"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == cfg_json["eos_token_id"]
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|endoftext|>"
    assert tok.chat_template and "messages" in tok.chat_template
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    ids = tok.encode(text)
    for role in ("system", "user", "assistant"):
        rid = tok._tok.token_to_id(f"<|{role}|>")
        assert rid is not None and rid in ids


def test_transformers_parity(name, lm):
    from transformers import AutoModelForCausalLM
    from moeyard.moe.model import ForwardBatch
    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIRS[name], dtype=torch.float32).eval()
    for p in PROMPTS:
        ids = lm.tokenizer.encode(p)
        with torch.no_grad():
            ours = lm.model(torch.tensor(ids), ForwardBatch.blocks(1, len(ids), "cpu"))
            theirs = hf(torch.tensor([ids])).logits[0].float()
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            g_hf = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert _greedy(lm.model, ids, 12) == g_hf


def test_model_beats_uniform_on_text(lm):
    from moeyard.moe.model import ForwardBatch
    text = ("The city is located on the banks of the river and has a population of about 20,000 people. "
            "It is known for its historic old town, its university and its annual music festival.")
    ids = torch.tensor(lm.tokenizer.encode(text))
    with torch.no_grad():
        logits = lm.model(ids[:-1], ForwardBatch.blocks(1, len(ids) - 1, "cpu"))
    loss = float(torch.nn.functional.cross_entropy(logits, ids[1:]))
    assert loss < 0.75 * math.log(lm.cfg.vocab_size)


def test_trace_fields(trace, cfg_json):
    ex, w, tid, dom = trace["experts"], trace["weights"], trace["token_ids"], trace["domain"]
    T = len(tid)
    L = cfg_json["num_hidden_layers"] - cfg_json.get("first_k_dense_replace", 0)
    E, K = int(trace["num_experts"]), int(trace["top_k"])
    assert E == cfg_json.get("num_local_experts", cfg_json.get("n_routed_experts"))
    assert K == cfg_json["num_experts_per_tok"]
    assert ex.dtype == np.int16 and ex.shape == (T, L, K)
    assert w.dtype == np.float16 and w.shape == (T, L, K)
    assert tid.dtype == np.int32 and dom.dtype == np.int8 and dom.shape == (T,)
    assert T >= 10_000
    assert ex.min() >= 0 and ex.max() < E
    assert tid.min() >= 0 and tid.max() < cfg_json["vocab_size"]
    assert (np.sort(ex, -1)[..., 1:] != np.sort(ex, -1)[..., :-1]).all()     # distinct experts per token
    scale = cfg_json.get("routed_scaling_factor", 1.0)   # DeepSeek-V3: normalised weights times the scale
    assert np.allclose(w.astype(np.float32).sum(-1), scale, atol=1e-2 * scale) and (w >= 0).all()
    names = [str(s) for s in trace["domains"]]
    assert {"arxiv", "c4", "github", "wikipedia"} <= set(names)
    assert set(np.unique(dom)) == set(range(len(names)))


def test_routing_health(name, lm, trace):
    """default: pooled trace balanced (<= 3) with affinity >= 2.5x uniform. deepseek-mini: every domain's held-out
    text and Python source not in the corpus balanced (worst layer <= 3) with affinity >= 4x uniform."""
    from corpus import python_source_ids
    from routing_stats import affinity, load_imbalance
    E = int(trace["num_experts"])
    if name == "default":
        imb = load_imbalance(trace["experts"], E)
        assert (imb <= 3.0).all(), f"expert load max/mean per layer {imb}"
        aff, _ = affinity(trace["experts"], E)
        assert aff >= 2.5 / E, f"affinity {aff:.4f} < 2.5 x uniform ({2.5 / E:.4f})"
        return
    from moeyard.moe.model import ForwardBatch
    sets = {str(d): trace["experts"][trace["domain"] == i] for i, d in enumerate(trace["domains"])}
    py = python_source_ids(lm.tokenizer._tok)[:8192]
    rec = {}
    fb = ForwardBatch.blocks(len(py) // 256, 256, "cpu")
    fb.route_hooks.append(lambda layer, x, ids, w: rec.__setitem__(layer, ids))
    with torch.no_grad():
        lm.model.hidden(torch.from_numpy(py[:len(py) // 256 * 256].astype(np.int64)), fb)
    sets["python"] = torch.stack([rec[l] for l in lm.cfg.moe_layers], 1).numpy()
    for s, ex in sets.items():
        imb = load_imbalance(ex, E)
        aff, _ = affinity(ex, E)
        assert imb.max() <= 3.0, f"{s}: expert load max/mean per layer {imb.round(2)}"
        assert aff * E >= 4.0, f"{s}: affinity {aff * E:.2f}x uniform < 4x"
