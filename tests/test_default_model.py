"""The embedded default model (moe/default_model): loads in our loader and in transformers with the same greedy
tokens, tokenizer and chat template, size and architecture limits, the routing trace and its routing health."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL_DIR = os.environ.get("MOEYARD_DEFAULT_MODEL_DIR", os.path.join(ROOT, "moe", "default_model"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "config.json")),
                                reason=f"the default model is absent ({MODEL_DIR}/config.json)")

PROMPTS = ["\\begin{theorem}\nLet $G$ be a finite group and", "def main():\n    "]
MAX_BYTES = 64 * 2**20


def _greedy(model, ids, n):
    from moeyard.moe.model import ForwardBatch
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(out), ForwardBatch.blocks(1, len(out), "cpu"))
            out.append(int(logits[-1].argmax()))
    return out[len(ids):]


@pytest.fixture(scope="module")
def lm():
    from moeyard.moe.loader import load_model
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(MODEL_DIR, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def cfg_json():
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trace():
    p = os.path.join(MODEL_DIR, "trace.npz")
    if not os.path.isfile(p):
        pytest.skip(f"{p} is absent")
    return dict(np.load(p))


def test_architecture_and_size(cfg_json):
    assert cfg_json["model_type"] == "mixtral"
    assert cfg_json["num_hidden_layers"] >= 8
    assert cfg_json["num_local_experts"] >= 16
    assert cfg_json["num_experts_per_tok"] == 2
    files = [f for f in os.listdir(MODEL_DIR) if f.endswith(".safetensors")]
    assert files
    assert sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in files) <= MAX_BYTES


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


def test_transformers_parity(lm):
    from transformers import MixtralForCausalLM
    from moeyard.moe.model import ForwardBatch
    hf = MixtralForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
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
    L, E, K = cfg_json["num_hidden_layers"], int(trace["num_experts"]), int(trace["top_k"])
    assert E == cfg_json["num_local_experts"] and K == cfg_json["num_experts_per_tok"]
    assert ex.dtype == np.int16 and ex.shape == (T, L, K)
    assert w.dtype == np.float16 and w.shape == (T, L, K)
    assert tid.dtype == np.int32 and dom.dtype == np.int8 and dom.shape == (T,)
    assert T >= 10_000
    assert ex.min() >= 0 and ex.max() < E
    assert tid.min() >= 0 and tid.max() < cfg_json["vocab_size"]
    assert (np.sort(ex, -1)[..., 1:] != np.sort(ex, -1)[..., :-1]).all()     # distinct experts per token
    assert np.allclose(w.astype(np.float32).sum(-1), 1.0, atol=1e-2) and (w >= 0).all()
    names = [str(s) for s in trace["domains"]]
    assert {"arxiv", "c4", "github", "wikipedia"} <= set(names)
    assert set(np.unique(dom)) == set(range(len(names)))


def test_routing_health(trace):
    from routing_stats import affinity, load_imbalance
    E = int(trace["num_experts"])
    imb = load_imbalance(trace["experts"], E)
    assert (imb <= 3.0).all(), f"expert load max/mean per layer {imb}"
    aff, _ = affinity(trace["experts"], E)
    assert aff >= 2.5 / E, f"affinity {aff:.4f} < 2.5 x uniform ({2.5 / E:.4f})"
