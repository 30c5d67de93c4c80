"""Measure the embedded default model: the figures of docs/MODEL_CARD.md.

    .venv/bin/python benchmarks/eval_default_model.py [--model default] [--json out.json]

1. validation loss (nats/token) per corpus domain vs a unigram baseline on the same tokenizer (token frequencies
   of the training split, add-one smoothed), both on the same validation tokens;
2. greedy continuations of one prompt per domain;
3. routing health from ``trace.npz`` (per-layer expert load max/mean, inter-layer affinity, domain lift);
4. parity with ``transformers.MixtralForCausalLM`` (logits allclose, greedy tokens identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from corpus import DOMAINS, encode_stream  # noqa: E402
from routing_stats import affinity, domain_lift, load_imbalance  # noqa: E402

from moeyard.moe.loader import load_model  # noqa: E402
from moeyard.moe.model import ForwardBatch  # noqa: E402

PROMPTS = {
    "arxiv": "\\begin{theorem}\nLet $G$ be a finite group and",
    "c4": "Our team of experienced professionals",
    "github": "for (int i = 0; i <",
    "wikipedia": "# Berlin\n\nBerlin ist",
}


@torch.no_grad()
def val_loss(lm, ids: np.ndarray, seq_len: int, batch: int = 8) -> tuple[float, int, np.ndarray]:
    """Mean next-token NLL over windows of ``seq_len + 1`` tokens (tail dropped); also the scored targets."""
    n = (len(ids) - 1) // seq_len
    tot, cnt, targets = 0.0, 0, []
    for i in range(0, n, batch):
        B = min(batch, n - i)
        x = np.stack([ids[(i + b) * seq_len:(i + b + 1) * seq_len + 1] for b in range(B)]).astype(np.int64)
        x = torch.from_numpy(x)
        logits = lm.model(x[:, :-1].reshape(-1), ForwardBatch.blocks(B, seq_len, "cpu"))
        tot += float(F.cross_entropy(logits, x[:, 1:].reshape(-1), reduction="sum"))
        cnt += B * seq_len
        targets.append(x[:, 1:].reshape(-1).numpy())
    return tot / cnt, cnt, np.concatenate(targets)


def unigram_nll(train_ids: np.ndarray, targets: np.ndarray, V: int) -> float:
    p = (np.bincount(train_ids, minlength=V).astype(np.float64) + 1.0)
    p /= p.sum()
    return float(-np.log(p[targets]).mean())


@torch.no_grad()
def greedy(model, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by recomputing the whole prefix each step (no KV cache)."""
    out = list(ids)
    for _ in range(n):
        x = torch.tensor(out, dtype=torch.long)
        logits = model(x, ForwardBatch.blocks(1, len(out), "cpu"))
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
    return out[len(ids):]


@torch.no_grad()
def hf_parity(lm, path: str, prompts: list[str], n: int = 24) -> dict:
    from transformers import MixtralForCausalLM
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res = {"max_abs_logit_diff": 0.0, "greedy_equal": True, "cases": []}
    for p in prompts:
        ids = lm.tokenizer.encode(p)
        x = torch.tensor(ids, dtype=torch.long)
        ours = lm.model(x, ForwardBatch.blocks(1, len(ids), "cpu"))
        theirs = hf(x[None]).logits[0].float()
        diff = float((ours - theirs).abs().max())
        g_ours = greedy(lm.model, ids, n)
        g_hf = hf.generate(x[None], max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()
        g_hf = g_hf + [None] * (n - len(g_hf))
        eq = g_ours == g_hf
        res["max_abs_logit_diff"] = max(res["max_abs_logit_diff"], diff)
        res["greedy_equal"] &= eq
        res["cases"].append({"prompt": p, "max_abs_logit_diff": diff,
                             "allclose": bool(torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)),
                             "greedy_equal": eq})
    res["allclose"] = all(c["allclose"] for c in res["cases"])
    return res


def routing(trace_path: str, lift_layers=None) -> dict:
    t = np.load(trace_path)
    ex, E, K = t["experts"], int(t["num_experts"]), int(t["top_k"])
    T, L, _ = ex.shape
    imb = load_imbalance(ex, E)
    aff, aff_layers = affinity(ex, E)
    names = [str(s) for s in t["domains"]]
    lift_layers = lift_layers or [0, L // 2, L - 1]
    spec = {}
    for l in lift_layers:
        lift = domain_lift(ex, t["domain"], E, l)
        spec[l] = {names[d]: [(int(e), round(float(lift[d, e]), 2)) for e in np.argsort(-lift[d])[:3]]
                   for d in range(len(names))}
    return {"tokens": int(T), "layers": int(L), "num_experts": E, "top_k": K,
            "load_max_over_mean": [round(float(v), 3) for v in imb],
            "affinity": aff, "affinity_per_layer": [round(float(v), 4) for v in aff_layers],
            "uniform": 1.0 / E, "affinity_over_uniform": aff * E, "domain_top_experts": spec}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--trace", default=None, help="default: <model dir>/trace.npz")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens-per-domain", type=int, default=0, help="0: the whole validation split")
    ap.add_argument("--sample-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: loss,samples,routing,hf")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.time()
    lm = load_model(a.model, dtype="float32", device="cpu")
    tok, V = lm.tokenizer, lm.cfg.vocab_size
    report: dict = {"model": lm.path}

    if "loss" not in skip:
        print("## validation loss (nats/token)\n\n| domain | tokens | model | unigram |\n|---|---|---|---|")
        report["val_loss"] = {}
        for d in DOMAINS:
            val = encode_stream(tok._tok, d, "val")
            if a.max_tokens_per_domain:
                val = val[:a.max_tokens_per_domain + 1]
            loss, n, targets = val_loss(lm, val, a.seq_len)
            uni = unigram_nll(encode_stream(tok._tok, d, "train"), targets, V)
            report["val_loss"][d] = {"tokens": n, "model": loss, "unigram": uni}
            print(f"| {d} | {n} | {loss:.3f} | {uni:.3f} |", flush=True)
        vl = report["val_loss"]
        m = np.mean([v["model"] for v in vl.values()])
        u = np.mean([v["unigram"] for v in vl.values()])
        print(f"| mean | | {m:.3f} | {u:.3f} |\n")

    if "samples" not in skip:
        print("## greedy samples\n")
        report["samples"] = {}
        for d, p in PROMPTS.items():
            cont = tok.decode(greedy(lm.model, tok.encode(p), a.sample_tokens, tok.eos_token_id),
                              skip_special_tokens=False)
            report["samples"][d] = {"prompt": p, "continuation": cont}
            print(f"### {d}\n\n```\n{p}\u2016{cont}\n```\n", flush=True)

    if "routing" not in skip:
        tp = a.trace or os.path.join(lm.path, "trace.npz")
        r = routing(tp)
        report["routing"] = r
        print(f"## routing health ({r['tokens']} traced tokens)\n")
        print("load max/mean per layer:", r["load_max_over_mean"])
        print(f"affinity {r['affinity']:.4f} = {r['affinity_over_uniform']:.2f}x uniform (1/E = {r['uniform']:.4f});"
              f" per layer pair {r['affinity_per_layer']}")
        for l, spec in r["domain_top_experts"].items():
            print(f"layer {l} top experts by lift:", {d: v for d, v in spec.items()})
        print()

    if "hf" not in skip:
        res = hf_parity(lm, lm.path, list(PROMPTS.values())[:2])
        report["hf_parity"] = res
        print(f"## transformers parity\n\nmax |logit diff| {res['max_abs_logit_diff']:.2e}, allclose "
              f"{res['allclose']}, greedy 24 tokens equal {res['greedy_equal']}\n")
    print(f"(took {time.time() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
