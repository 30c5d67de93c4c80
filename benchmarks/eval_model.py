"""Measure an embedded model: the figures of docs/MODEL_CARD.md and docs/MODEL_CARD_DEEPSEEK_MINI.md.

    .venv/bin/python benchmarks/eval_model.py [--model default|deepseek-mini] [--compare default] [--json out.json]

1. validation loss (nats/token) per corpus domain vs a unigram baseline on the same tokenizer (token frequencies
   of the training split, add-one smoothed), and vs the ``--compare`` model on the same tokens;
2. greedy continuations of one prompt per domain;
3. routing health per domain from ``trace.npz`` and on Python source that is not in the corpus (standard library
   modules, see tools/corpus.py): per-layer expert load max/mean, inter-layer affinity (mean over layers of the
   best next-layer expert's conditional probability, as a multiple of uniform 1/E), domain lift;
4. parity with transformers (``AutoModelForCausalLM``: logits allclose, greedy tokens identical).
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
from corpus import DOMAINS, encode_stream, python_source_ids  # noqa: E402
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
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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


def health(ex: np.ndarray, E: int) -> dict:
    """Load max/mean and affinity (x uniform) per layer of a routing ``ex[T, L, K]``."""
    imb = load_imbalance(ex, E)
    aff, aff_layers = affinity(ex, E)
    return {"tokens": int(ex.shape[0]), "load_max_over_mean": [round(float(v), 3) for v in imb],
            "worst_load": round(float(imb.max()), 3), "affinity_over_uniform": round(aff * E, 3),
            "affinity_over_uniform_per_layer": [round(float(v) * E, 3) for v in aff_layers]}


@torch.no_grad()
def route(lm, ids: np.ndarray, seq_len: int, batch: int = 8) -> np.ndarray:
    """Experts [T, L, K] chosen for ``ids`` cut into windows of ``seq_len`` (tail dropped)."""
    n = len(ids) // seq_len
    out = []
    for i in range(0, n, batch):
        B = min(batch, n - i)
        x = torch.from_numpy(ids[i * seq_len:(i + B) * seq_len].astype(np.int64))
        rec: dict[int, torch.Tensor] = {}
        fb = ForwardBatch.blocks(B, seq_len, "cpu")
        fb.route_hooks.append(lambda layer, x_ND, ids_NK, w_NK: rec.__setitem__(layer, ids_NK))
        lm.model.hidden(x, fb)
        out.append(torch.stack([rec[l] for l in lm.cfg.moe_layers], 1).numpy())
    return np.concatenate(out)


def routing(trace_path: str, lift_layers=None, python_ex: np.ndarray | None = None) -> dict:
    t = np.load(trace_path)
    ex, E, K = t["experts"], int(t["num_experts"]), int(t["top_k"])
    T, L, _ = ex.shape
    names = [str(s) for s in t["domains"]]
    per = {"all": health(ex, E)}
    for d, name in enumerate(names):
        per[name] = health(ex[t["domain"] == d], E)
    if python_ex is not None:
        per["python (not in corpus)"] = health(python_ex, E)
    lift_layers = lift_layers or [0, L // 2, L - 1]
    spec = {}
    for l in lift_layers:
        lift = domain_lift(ex, t["domain"], E, l)
        spec[l] = {names[d]: [(int(e), round(float(lift[d, e]), 2)) for e in np.argsort(-lift[d])[:3]]
                   for d in range(len(names))}
    return {"tokens": int(T), "layers": int(L), "num_experts": E, "top_k": K, "uniform": 1.0 / E,
            "per_set": per, "domain_top_experts": spec}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--compare", default=None, help="another model whose validation loss is reported beside")
    ap.add_argument("--trace", default=None, help="default: <model dir>/trace.npz")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens-per-domain", type=int, default=0, help="0: the whole validation split")
    ap.add_argument("--sample-tokens", type=int, default=40)
    ap.add_argument("--python-tokens", type=int, default=12288, help="tokens of Python source routed")
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
        other = load_model(a.compare, dtype="float32", device="cpu") if a.compare else None
        if other is not None and other.tokenizer._tok.to_str() != tok._tok.to_str():
            raise SystemExit(f"--compare {a.compare}: a different tokenizer; losses would not be comparable")
        col = f" {a.compare} |" if other else ""
        print(f"## validation loss (nats/token)\n\n| domain | tokens | model |{col} unigram |\n"
              f"|---|---|---|{'---|' if other else ''}---|")
        report["val_loss"] = {}
        for d in DOMAINS:
            val = encode_stream(tok._tok, d, "val")
            if a.max_tokens_per_domain:
                val = val[:a.max_tokens_per_domain + 1]
            loss, n, targets = val_loss(lm, val, a.seq_len)
            uni = unigram_nll(encode_stream(tok._tok, d, "train"), targets, V)
            report["val_loss"][d] = {"tokens": n, "model": loss, "unigram": uni}
            if other is not None:
                report["val_loss"][d]["compare"] = val_loss(other, val, a.seq_len)[0]
            cmp = f" {report['val_loss'][d]['compare']:.3f} |" if other else ""
            print(f"| {d} | {n} | {loss:.3f} |{cmp} {uni:.3f} |", flush=True)
        vl = report["val_loss"]
        m = np.mean([v["model"] for v in vl.values()])
        u = np.mean([v["unigram"] for v in vl.values()])
        cm = f" {np.mean([v['compare'] for v in vl.values()]):.3f} |" if other else ""
        print(f"| mean | | {m:.3f} |{cm} {u:.3f} |\n")

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
        py = python_source_ids(tok._tok)[:a.python_tokens]
        r = routing(tp, python_ex=route(lm, py, a.seq_len))
        report["routing"] = r
        print(f"## routing health ({r['tokens']} traced tokens, E = {r['num_experts']}, top-{r['top_k']})\n")
        print("| set | tokens | worst load max/mean | load max/mean per layer | affinity x uniform | per layer pair |")
        print("|---|---|---|---|---|---|")
        for name, h in r["per_set"].items():
            print(f"| {name} | {h['tokens']} | {h['worst_load']:.2f} | {h['load_max_over_mean']} | "
                  f"{h['affinity_over_uniform']:.2f} | {h['affinity_over_uniform_per_layer']} |")
        print()
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
