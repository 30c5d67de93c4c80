"""``bench_ep.py --matrix``: {standard, coherent, tp} x {round_robin, affinity, coactivation} x speculative
shuffling off/on, 4 Ray workers, one run per model; beside each run the hindsight ceiling of its form, computed on
the workload's own routing (a local-mode run of the same prompts: outputs are identical in every mode).

Ceilings (share of (token, expert) pairs served on the token's worker, no balance constraint): form 1 (standard,
coherent: a sequence's home is chosen) — every sequence on its best worker for all its tokens and layers; form 2
(tp: a worker per token per layer) — every token at every layer on the worker holding most of its k experts.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from bench_ep import TEXTS, measured_run, write_json
from common import record, table

SCHEMES = ("standard", "coherent", "tp")
PLACEMENTS = ("round_robin", "affinity", "coactivation")
# shuffling runs per scheme: its default balance bound, then a tight one (busiest worker <= 1.25x the mean):
# form 1 caps a worker at ceil(n / G) + slack sequences, form 2 at ceil(N / G * (1 + slack)) tokens per layer
SLACKS = {"standard": (1, 0), "coherent": (1,), "tp": (0.5, 0.25)}


def tiny_deepseek(path="/tmp/moeyard_bench_tiny_deepseek_v3") -> str:
    """The tests' tiny random DeepSeek-V3 (MLA, 8 experts top-2, 4 heads) saved as a checkpoint."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny_models import build_hf, save_hf
        save_hf(build_hf("deepseek_v3"), path)
    return path


def workload_texts(n: int) -> list[str]:
    """``TEXTS``, then MT-Bench first turns (``../shared/prompts``) when more than 8 prompts are asked for."""
    texts = list(TEXTS[:n])
    mt = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "prompts",
                      "mt_bench_questions.jsonl")
    if len(texts) < n and os.path.isfile(mt):
        texts += [json.loads(line)["turns"][0][:300] for line in open(mt)][:n - len(texts)]
    return [texts[i % len(texts)] for i in range(n)]


def selected(a, scheme, placement, slack) -> bool:
    """``--runs scheme/placement/slack,...`` (slack 'off' = no shuffling); the baseline standard/round_robin/off
    always runs. Without ``--runs``: every run of the matrix."""
    if not getattr(a, "runs", None) or (scheme, placement, slack) == ("standard", "round_robin", None):
        return True
    return f"{scheme}/{placement}/{'off' if slack is None else slack}" in a.runs.split(",")


def workload_routing(path, prompts, params, max_num_seqs):
    """(experts [T, L, K], sequence index [T], greedy tokens) of the workload in local mode."""
    import torch

    from moeyard.runtime import LLM
    llm = LLM(path, max_num_seqs=max_num_seqs)
    rec, seq = {}, []
    ex = llm.engine.executor
    ex.route_hooks.append(lambda l, x, ids, w: rec.setdefault(l, []).append(ids.cpu()))
    orig = ex.execute

    def execute(items):
        for it in items:
            seq.extend([it.request_id] * len(it.token_ids))
        return orig(items)
    ex.execute = execute
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    experts = np.stack([torch.cat(rec[l]).numpy() for l in llm.cfg.moe_layers], 1)
    ids = {r: i for i, r in enumerate(dict.fromkeys(seq))}
    llm.close()
    return experts, np.array([ids[r] for r in seq]), [o.token_ids for o in outs]


def ceilings(experts_TLK, seq_T, holders):
    """(form 1, form 2, average worker) hindsight local fractions for ``holders`` ([L][E] -> worker list)."""
    L, E, K = experts_TLK.shape[1], len(holders[0]), experts_TLK.shape[2]
    G = 1 + max(w for row in holders for ws in row for w in ws)
    hold = np.zeros((L, E, G))
    for l, row in enumerate(holders):
        for e, ws in enumerate(row):
            hold[l, e, list(ws)] = 1
    per = hold[np.arange(L)[None, :, None], experts_TLK.astype(np.int64)].sum(2)      # [T, L, G]
    pairs = experts_TLK.shape[0] * L * K
    by_seq = np.zeros((seq_T.max() + 1, G))
    np.add.at(by_seq, seq_T, per.sum(1))
    return float(by_seq.max(1).sum() / pairs), float(per.max(2).sum() / pairs), float(per.sum() / G / pairs)


def imbalance(s0, s1, spec):
    """Busiest worker's tokens / the mean over the measured run only (the warm-up excluded), summed over steps
    and MoE layers (form 1: a step's tokens per worker; form 2: tokens per destination)."""
    if not spec:
        return None
    b = s1["shuffle_busiest_tokens"] - s0.get("shuffle_busiest_tokens", 0)
    return b / max(1e-9, s1["shuffle_even_tokens"] - s0.get("shuffle_even_tokens", 0))


def matrix_main(a):
    import ray

    from moeyard.moe.loader import resolve_model_path
    from moeyard.runtime import LLM, SamplingParams
    path = tiny_deepseek() if a.model == "tiny-deepseek" else resolve_model_path(a.model)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    from moeyard.moe.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(path)
    if tok is not None:
        prompts = [tok.encode(t) for t in workload_texts(a.prompts)]
    else:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 256, 12 + 4 * i).tolist() for i in range(a.prompts)]
    experts, seq, local_tokens = workload_routing(path, prompts, params, a.prompts)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    results, files, ceil = [], {}, {}
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    for placement in PLACEMENTS:
        for scheme in SCHEMES:
            for slack in (None,) + SLACKS[scheme]:
                if not selected(a, scheme, placement, slack):
                    continue
                spec = slack is not None
                pl = files.get(placement, placement)
                kw = dict(speculative_shuffle=True, shuffle_options={"slack": slack}) if spec else {}
                llm = LLM(path, mode="ray", num_workers=a.workers, placement=pl, ep_scheme=scheme,
                          max_num_seqs=a.prompts, placement_time_limit=a.placement_time_limit, **kw)
                info = llm.engine.executor.placement_info
                if placement not in files:     # solve once per placement, reuse the file for the other runs
                    files[placement] = os.path.join(out_dir, f"ep_matrix_{placement}.json")
                    info["placement_record"].to_json(files[placement])
                    ceil[placement] = ceilings(experts, seq, info["holders"])
                outs, wall, s0, s1 = measured_run(llm, prompts, params)
                gen = s1["tokens_generated"] - s0["tokens_generated"]
                d = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("a2a_bytes", "moe_bytes", "kv_bytes", "hidden_bytes",
                                                              "meta_bytes", "shuffle_bytes", "tp_bytes")}
                routed = s1["routed_assignments"] - s0["routed_assignments"]
                loc = s1["local_fraction"] * s1["routed_assignments"] - s0["local_fraction"] * s0["routed_assignments"]
                form = 2 if scheme == "tp" else 1
                r = {"scheme": scheme, "placement": placement, "speculative_shuffle": spec, "slack": slack,
                     "generated": gen,
                     "bytes_per_generated_token": d["a2a_bytes"] / gen,
                     "breakdown_per_generated_token": {k: v / gen for k, v in d.items() if k != "a2a_bytes"},
                     "local_fraction": loc / routed if routed else 0.0, "form": form,
                     "ceiling": ceil[placement][form - 1], "average_worker": ceil[placement][2],
                     "imbalance": imbalance(s0, s1, spec), "moves": s1.get("shuffle_moves"),
                     "tokens_per_s": gen / wall, "errors": sum(o.finish_reason == "error" for o in outs),
                     "tokens": [o.token_ids for o in outs]}
                results.append(r)
                print(f"{scheme:9s} {placement:12s} slack={slack!s:5s} bytes/gen {r['bytes_per_generated_token']:9.0f}"
                      f"  local {r['local_fraction']:.3f} (ceiling f{form} {r['ceiling']:.3f})  tok/s "
                      f"{r['tokens_per_s']:6.1f}", flush=True)
    same = all(r["tokens"] == local_tokens for r in results)
    print("greedy tokens identical to local mode in all runs:", same)
    write_json(a, path, results, same, ceilings=ceil)
    base = next(r for r in results if (r["scheme"], r["placement"], r["speculative_shuffle"])
                == ("standard", "round_robin", False))["bytes_per_generated_token"]
    rows = []
    for r in results:
        b = r["breakdown_per_generated_token"]
        rows.append([r["scheme"], r["placement"], f"slack {r['slack']}" if r["speculative_shuffle"] else "off",
                     f"{r['bytes_per_generated_token']:,.0f}", f"{100 * (r['bytes_per_generated_token'] / base - 1):+.0f}%",
                     f"{b['moe_bytes']:,.0f}", f"{b['kv_bytes']:,.0f}", f"{b['hidden_bytes']:,.0f}",
                     f"{b['tp_bytes'] + b['shuffle_bytes']:,.0f}", f"{b['meta_bytes']:,.0f}",
                     f"{r['local_fraction']:.3f}", f"{r['ceiling']:.3f} (form {r['form']})",
                     "-" if not r["speculative_shuffle"] or r["scheme"] == "coherent"
                     or r["ceiling"] <= r["average_worker"] else
                     f"{(r['local_fraction'] - r['average_worker']) / (r['ceiling'] - r['average_worker']):.0%}",
                     "-" if r["imbalance"] is None else f"{r['imbalance']:.2f}", f"{r['tokens_per_s']:.1f}"])
    name = os.path.basename(os.path.normpath(path))
    body = [f"Model: `{path}`; {a.workers} Ray worker actors; {a.prompts} prompts x {a.max_tokens} greedy tokens "
            f"({results[0]['generated']} generated); shuffling (form 1 table from the model's trace.npz when it "
            f"ships one, else a calibration run) at its default balance bound (`slack` 1 sequence for form 1, 0.5 "
            f"for form 2) and a tight one (`slack` 0 for form 1: at most ceil(n / G) sequences a worker; 0.25 for "
            f"form 2: at most 1.25x the even share of tokens a destination). Bytes = everything handed to collectives that "
            f"crosses workers (MoE rows, replicated cache entries, moved residual streams, split sizes and token "
            f"bookkeeping, KV moves, TP all-gathers / head scatters), prefill included, / generated tokens. Local "
            f"fraction = (token, expert) pairs served on the worker the token is on. Ceiling = hindsight local "
            f"fraction of the run's form on this workload's routing (form 1: each sequence on its best worker; "
            f"form 2: each token at each layer on its best worker; no balance bound); 'of ceiling' = (local - "
            f"average worker) / (ceiling - average worker), average worker = {ceil['round_robin'][2]:.3f} for "
            f"round robin (coherent: '-', its locality follows its own rule, form 1 only picks where a step starts). "
            f"Busiest / mean (shuffling, measured run only): form 1 tokens per worker per step, form 2 tokens per "
            f"destination per MoE layer. Greedy tokens identical to local mode in all runs: "
            f"**{same}**. Raw: `{a.out}`.", "",
            table(["scheme", "placement", "shuffle", "net bytes / gen. token", "vs standard rr", "MoE rows",
                   "cache entries", "residual moves", "TP / shuffle collectives", "meta", "local fraction",
                   "ceiling", "of ceiling", "busiest / mean", "tokens/s"], rows)]
    title = f"every scheme ({name})" if not a.runs else f"selected runs ({name}, {a.prompts} prompts)"
    record(f"Expert parallelism: {title}",
           "RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 .venv/bin/python " + " ".join(sys.argv), "\n".join(body))
