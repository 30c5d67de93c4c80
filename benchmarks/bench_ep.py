"""Expert parallelism on Ray: bytes crossing workers per generated token, local fraction and tokens/s for
{standard, coherent} x {round_robin, affinity}, then what the measured local fractions mean at 64 workers on
two-tier links (``moeyard.placement.simulate``).

    RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 .venv/bin/python benchmarks/bench_ep.py [--model default]

``--matrix``: every scheme x placement x shuffling on/off in one run, with the hindsight ceiling of each run's
form beside it (``bench_ep_matrix.py``); ``--model tiny-deepseek`` builds a tiny random DeepSeek-V3 (MLA)
checkpoint for it. ``--spec``: the speculative shuffling ablation.

Without the default model (``moe/default_model``) pass ``--random`` to benchmark a random Mixtral of the same
shape (routing of a random model has no structure, so affinity has little to find there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEXTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The theory of relativity changed the way physicists think about space and time because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The best way to learn a new language is to",
    "In 1969 the first humans landed on the moon, and",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The stock market fell sharply on Monday after investors",
    "To make a simple tomato sauce, first heat the olive oil and",
]


def random_mixtral(path: str):
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.experts import ParamExperts
    from moeyard.moe.model import MoEForCausalLM
    from moeyard.moe.save import mixtral_config_dict, save_mixtral
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    d = mixtral_config_dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                            num_experts=16, top_k=2, intermediate_size=512, max_position_embeddings=1024,
                            dtype="float32")
    cfg = MoEConfig.from_dict(d)
    torch.manual_seed(0)
    m = MoEForCausalLM(cfg, max_positions=1024)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.experts = ParamExperts(cfg, init_std=0.05)
    save_mixtral(m.state_dict(), m.experts, cfg, d, path, dtype=torch.float32)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--random", action="store_true", help="use a random Mixtral if the model is missing")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--placement-time-limit", type=float, default=20.0)
    ap.add_argument("--out", default="runs/bench/ep.json")
    ap.add_argument("--spec", action="store_true",
                    help="speculative shuffling ablation (standard scheme): placement alone, shuffling alone, both; "
                         "records docs/BENCHMARKS.md '## Speculative shuffling'")
    ap.add_argument("--no-record", action="store_true", help="with --spec: do not write docs/BENCHMARKS.md")
    ap.add_argument("--form", type=int, choices=(1, 2), default=None,
                    help="with --spec: only form 1 (data-parallel) or form 2 (tensor-parallel) runs")
    ap.add_argument("--matrix", action="store_true",
                    help="{standard, coherent, tp} x {round_robin, affinity, coactivation} x shuffling on/off with "
                         "ceilings; records docs/BENCHMARKS.md '## Expert parallelism: every scheme (<model>)'")
    ap.add_argument("--runs", default=None,
                    help="with --matrix: only these runs, 'scheme/placement/slack' comma-separated (slack 'off' = "
                         "no shuffling; e.g. tp/affinity/0.25), plus the standard/round_robin/off baseline; "
                         "records '## Expert parallelism: selected runs (<model>, <n> prompts)'")
    a = ap.parse_args()
    if a.matrix:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_ep_matrix import matrix_main
        return matrix_main(a)
    if a.spec:
        return spec_main(a)

    import ray

    from moeyard.moe.loader import resolve_model_path
    from moeyard.runtime import LLM, SamplingParams
    try:
        path = resolve_model_path(a.model)
    except Exception:
        if not a.random:
            raise
        path = random_mixtral("/tmp/moeyard_bench_random_mixtral")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)

    results, affinity_file = [], None
    for placement in ("round_robin", "affinity"):
        for scheme in ("standard", "coherent"):
            pl = placement if (placement != "affinity" or affinity_file is None) else affinity_file
            t0 = time.perf_counter()
            llm = LLM(path, mode="ray", num_workers=a.workers, placement=pl, ep_scheme=scheme,
                      max_num_seqs=a.prompts, placement_time_limit=a.placement_time_limit)
            start_s = time.perf_counter() - t0
            ex = llm.engine.executor
            if placement == "affinity" and affinity_file is None:      # solve once, reuse for the other scheme
                affinity_file = os.path.abspath(os.path.join(os.path.dirname(a.out), "ep_affinity_placement.json"))
                os.makedirs(os.path.dirname(affinity_file), exist_ok=True)
                h = ex.placement_info["holders"]
                with open(affinity_file, "w") as f:
                    json.dump({"num_workers": a.workers, "assignment": [[list(c) for c in row] for row in h]}, f)
            if llm.tokenizer is not None:
                prompts = [llm.tokenizer.encode(TEXTS[i % len(TEXTS)]) for i in range(a.prompts)]
            else:
                rng = np.random.default_rng(0)
                prompts = [rng.integers(0, llm.cfg.vocab_size, 24).tolist() for _ in range(a.prompts)]
            outs, wall, s0, s1 = measured_run(llm, prompts, params)
            gen = s1["tokens_generated"] - s0["tokens_generated"]
            proc = gen + sum(len(p) for p in prompts)
            d = {k: s1[k] - s0.get(k, 0) for k in ("a2a_bytes", "moe_bytes", "kv_bytes", "hidden_bytes",
                                                     "meta_bytes", "a2a_calls", "routed_assignments")}
            loc = (s1["local_fraction"] * s1["routed_assignments"] - s0["local_fraction"] * s0["routed_assignments"])
            r = {"placement": placement, "scheme": scheme, "generated": gen, "prompt_tokens": proc - gen,
                 "bytes_per_generated_token": d["a2a_bytes"] / gen,
                 "bytes_per_processed_token": d["a2a_bytes"] / proc,
                 "breakdown_per_generated_token": {k: d[k] / gen for k in ("moe_bytes", "kv_bytes", "hidden_bytes",
                                                                           "meta_bytes")},
                 "a2a_calls_per_step": d["a2a_calls"] / max(1, (s1["ep_steps"] - s0["ep_steps"])),
                 "local_fraction": loc / d["routed_assignments"], "tokens_per_s": gen / wall,
                 "startup_s": start_s, "errors": sum(o.finish_reason == "error" for o in outs),
                 "tokens": [o.token_ids for o in outs]}
            results.append(r)
            print(f"{placement:12s} {scheme:9s} bytes/gen-token {r['bytes_per_generated_token']:10.0f}  "
                  f"local {r['local_fraction']:.3f}  tok/s {r['tokens_per_s']:6.1f}  "
                  f"{ {k: round(v) for k, v in r['breakdown_per_generated_token'].items()} }", flush=True)
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print("all four configurations produce identical greedy tokens:", same)

    # what the measured local fractions mean at 64 workers (8 nodes x 8), two-tier links
    sim = []
    try:
        from moeyard.placement import simulate
        from moeyard.moe.config import MoEConfig
        cfg = MoEConfig.from_dir(path)
        for r in results:
            for hidden in (cfg.hidden_size, 4096):
                s = simulate(None, None, 64, 8, intra_gbps=150.0, inter_gbps=25.0, hidden_size=hidden,
                             bytes_per_elem=2, tokens_per_step=256, local_fraction=r["local_fraction"],
                             num_layers=len(cfg.moe_layers), top_k=cfg.top_k)
                sim.append({"placement": r["placement"], "scheme": r["scheme"], "hidden": hidden, "local_fraction": r["local_fraction"],
                            "bytes_intra": s.bytes_intra, "bytes_inter": s.bytes_inter, "seconds": s.seconds})
                print(f"sim 64w/8n hidden {hidden}: {r['placement']:12s} {r['scheme']:9s} local {r['local_fraction']:.3f} "
                      f"bytes/step {s.bytes_total / 1e6:8.2f} MB  time/step {s.seconds * 1e6:8.1f} us")
    except Exception as exc:  # noqa: BLE001
        print("placement simulator not usable:", exc)
    write_json(a, path, results, same, simulation=sim)


# -- speculative shuffling (cluster/planner.py) ---------------------------------------------------------------
SPEC_RUNS = [  # name, ep_scheme, placement, speculative_shuffle, shuffle_options
    # form 1: data-parallel attention, request placement (cluster/planner.py)
    ("round_robin (baseline)", "standard", "round_robin", False, None),
    ("affinity (placement alone)", "standard", "affinity", False, None),
    ("round_robin + shuffle (shuffling alone)", "standard", "round_robin", True, {}),
    ("affinity + shuffle (both)", "standard", "affinity", True, {}),
    ("affinity + shuffle, admission only (no KV moves)", "standard", "affinity", True, {"move": False}),
    ("affinity + shuffle, eager KV moves (horizon 1e6)", "standard", "affinity", True,
     {"horizon": 1e6, "max_moves": 8}),
    ("affinity + shuffle, no balance bound (slack 8)", "standard", "affinity", True, {"slack": 8}),
    # form 2: tensor-parallel attention, token shuffling (comm/tp.py)
    ("TP round_robin (form-2 baseline)", "tp", "round_robin", False, None),
    ("TP coactivation (grouping alone)", "tp", "coactivation", False, None),
    ("TP round_robin + shuffle (shuffling alone)", "tp", "round_robin", True, {}),
    ("TP coactivation + shuffle (both)", "tp", "coactivation", True, {}),
    ("TP affinity + shuffle", "tp", "affinity", True, {}),
    ("TP coactivation + shuffle, loose balance (slack 8)", "tp", "coactivation", True, {"slack": 8.0}),
]


def write_json(a, path, results, same, **extra):
    """The run's raw results to ``a.out`` (with command, date, machine), then shut Ray down."""
    import ray
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}",
           "model": path, "workers": a.workers, "results": results, "identical_tokens": same, **extra}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    ray.shutdown()


def hold_matrix(holders) -> np.ndarray:
    """[L, E, G] 1 where worker g holds expert e of MoE layer l."""
    L, E = len(holders), max(len(r) for r in holders)
    G = 1 + max(w for row in holders for ws in row for w in ws)
    hold = np.zeros((L, E, G))
    for l, row in enumerate(holders):
        for e, ws in enumerate(row):
            hold[l, e, list(ws)] = 1
    return hold


def measured_run(llm, prompts, params):
    """Warm up, then generate ``prompts`` once; returns (outputs, wall seconds, stats before, stats after) and
    closes the engine."""
    from moeyard.runtime import SamplingParams
    llm.generate(prompt_token_ids=[prompts[0][:4]], sampling_params=SamplingParams(max_tokens=2))  # warm
    s0 = llm.stats()
    t1 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    wall = time.perf_counter() - t1
    s1 = llm.stats()
    llm.close()
    return outs, wall, s0, s1


def oracle_locality(experts_TLK, holders, windows: int):
    """Upper bounds of data-parallel placement on a routing trace: each token on its own best worker (all MoE
    layers), and each window of ``windows`` consecutive tokens (a stand-in for a sequence) on its best worker."""
    L = experts_TLK.shape[1]
    hold = hold_matrix(holders)
    G = hold.shape[2]
    loc = hold[np.arange(L)[None, :, None], experts_TLK.astype(np.int64)].sum((1, 2))   # [T, G]
    pairs = L * experts_TLK.shape[2]
    T = len(loc) // windows * windows
    return (float(loc.max(1).mean() / pairs), float(loc[:T].reshape(-1, windows, G).sum(1).max(1).mean()
                                                   / (windows * pairs)), float(loc.mean() / pairs))


def oracle_layer_locality(experts_TLK, holders) -> float:
    """Ceiling of form 2: every token at every MoE layer on the worker holding most of its k experts (hindsight)."""
    L, K = experts_TLK.shape[1], experts_TLK.shape[2]
    hold = hold_matrix(holders)
    per = hold[np.arange(L)[None, :, None], experts_TLK.astype(np.int64)].sum(2)     # [T, L, G]
    return float(per.max(2).mean() / K)


def spec_main(a):
    import ray

    from moeyard.moe.loader import resolve_model_path
    from moeyard.moe.predictors import load_trace
    from moeyard.runtime import LLM, SamplingParams
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import record, table
    path = resolve_model_path(a.model)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    results, affinity_file, holders = [], None, {}
    for name, scheme, placement, spec, sopts in SPEC_RUNS:
        if a.form and (scheme == "tp") != (a.form == 2):
            continue
        pl = placement if (placement != "affinity" or affinity_file is None) else affinity_file
        kw = dict(speculative_shuffle=True, shuffle_options=sopts) if spec else {}
        t0 = time.perf_counter()
        llm = LLM(path, mode="ray", num_workers=a.workers, placement=pl, ep_scheme=scheme,
                  max_num_seqs=a.prompts, placement_time_limit=a.placement_time_limit, **kw)
        start_s = time.perf_counter() - t0
        ex = llm.engine.executor
        holders[placement] = ex.placement_info["holders"]
        if placement == "affinity" and affinity_file is None:
            affinity_file = os.path.abspath(os.path.join(os.path.dirname(a.out), "ep_spec_affinity_placement.json"))
            os.makedirs(os.path.dirname(affinity_file), exist_ok=True)
            with open(affinity_file, "w") as f:
                json.dump({"num_workers": a.workers,
                           "assignment": [[list(c) for c in row] for row in holders[placement]]}, f)
        prompts = [llm.tokenizer.encode(TEXTS[i % len(TEXTS)]) for i in range(a.prompts)]
        outs, wall, s0, s1 = measured_run(llm, prompts, params)
        gen = s1["tokens_generated"] - s0["tokens_generated"]
        dd = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("a2a_bytes", "moe_bytes", "shuffle_bytes", "meta_bytes",
                                                      "tp_bytes",
                                                      "routed_assignments", "shuffle_moves",
                                                      "shuffle_moved_positions")}
        loc = (s1["local_fraction"] * s1["routed_assignments"] - s0["local_fraction"] * s0["routed_assignments"])
        r = {"name": name, "scheme": scheme, "placement": placement, "speculative_shuffle": spec,
             "shuffle_options": sopts, "tp_bytes_per_generated_token": dd["tp_bytes"] / gen,
             "generated": gen, "bytes_per_generated_token": dd["a2a_bytes"] / gen,
             "moe_bytes_per_generated_token": dd["moe_bytes"] / gen,
             "shuffle_bytes_per_generated_token": dd["shuffle_bytes"] / gen,
             "meta_bytes_per_generated_token": dd["meta_bytes"] / gen,
             "moves": dd["shuffle_moves"], "moved_positions": dd["shuffle_moved_positions"],
             "local_fraction": loc / dd["routed_assignments"], "tokens_per_s": gen / wall, "startup_s": start_s,
             "imbalance": s1.get("shuffle_imbalance", 1.0) if spec else None,
             "token_table": ex.placement_info.get("token_table"),
             "tokens": [o.token_ids for o in outs]}
        if spec:   # prediction counters over the whole life of the executor (workload + warm-up)
            r.update({k: v for k, v in s1.items() if k.startswith("spec_")})
        results.append(r)
        print(f"{name:50s} bytes/gen-token {r['bytes_per_generated_token']:9.0f} (tp "
              f"{r['tp_bytes_per_generated_token']:6.0f} shuffle "
              f"{r['shuffle_bytes_per_generated_token']:6.0f})  local {r['local_fraction']:.3f}  moves {r['moves']:3d}"
              f"  tok/s {r['tokens_per_s']:6.1f}" + (f"  expert-prec {r['spec_expert_precision']:.3f} worker-acc "
                                                    f"{r['spec_worker_accuracy']:.3f}" if spec else ""), flush=True)
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print("identical greedy tokens in all runs:", same)
    base = results[0]["bytes_per_generated_token"]
    tp_base = next((r["bytes_per_generated_token"] for r in results if r["scheme"] == "tp"), None)
    trace = load_trace(os.path.join(path, "trace.npz")) if os.path.isfile(os.path.join(path, "trace.npz")) else None
    oracle = {}
    if trace is not None:
        for pl, h in holders.items():
            ex_TLK = np.asarray(trace["experts"])
            oracle[pl] = oracle_locality(ex_TLK, h, int(trace.get("seq_len", 64))) + (oracle_layer_locality(ex_TLK, h),)
    write_json(a, path, results, same, oracle=oracle)
    if a.no_record:
        return
    pct = lambda v, b: "-" if b is None else f"{100 * (v / b - 1):+.0f}%"  # noqa: E731
    rows = [[r["name"], f"{r['bytes_per_generated_token']:,.0f}", f"{r['moe_bytes_per_generated_token']:,.0f}",
             f"{r['tp_bytes_per_generated_token']:,.0f}", f"{r['shuffle_bytes_per_generated_token']:,.0f}",
             pct(r["bytes_per_generated_token"], base),
             pct(r["bytes_per_generated_token"], tp_base) if r["scheme"] == "tp" else "-",
             f"{r['local_fraction']:.3f}", r["moves"], "-" if r["imbalance"] is None else f"{r['imbalance']:.2f}",
             f"{r['tokens_per_s']:.1f}"] for r in results]
    body = [f"Model: `{path}`; {a.workers} worker actors; {a.prompts} prompts x {a.max_tokens} greedy "
            f"tokens ({results[0]['generated']} generated). Bytes = everything handed to "
            f"collectives that crosses workers, prefill included, KV moves and the collectives replacing the "
            f"all-reduce included (net), / generated tokens. Greedy tokens identical in all runs: **{same}**. "
            f"Raw: `{a.out}`.", "",
            table(["run", "net bytes / gen. token", "MoE rows", "TP all-gathers", "shuffle (KV moves / head "
                   "scatter + row all-gather)", f"vs {results[0]['name']}", "vs TP baseline", "local fraction",
                   "KV moves", "busiest worker / mean", "tokens/s"], rows)]
    for both_name in ("affinity + shuffle (both)", "TP coactivation + shuffle (both)"):
        both = next((r for r in results if r["name"] == both_name), None)
        if both is None:
            continue
        L = len(both["spec_expert_precision_per_layer"])
        what = ("the token table's top-k" if both["scheme"] == "standard" else
                "layer l's router on the pre-attention residual: its top-k")
        body += ["", f"Prediction accuracy per MoE layer ({both_name}"
                     + (f"; token table: {both['token_table']}" if both["scheme"] == "standard" else "")
                     + f"): expert precision = share of {what} experts actually routed to; worker accuracy = the "
                     "chosen worker holds the token's first-choice expert; local = share of (token, expert) pairs "
                     "served where the token was.", "",
                 table(["layer"] + [str(i) for i in range(L)] + ["mean"],
                       [[m] + [f"{both[f'{k}_per_layer'][i]:.2f}" for i in range(L)] + [f"{both[k]:.2f}"]
                        for m, k in (("expert precision", "spec_expert_precision"),
                                     ("worker accuracy", "spec_worker_accuracy"),
                                     ("local fraction", "spec_local_fraction"))])]
    if oracle:
        body += ["", "Ceilings on the model's routing trace (share of (token, expert) pairs local, hindsight, no "
                     "balance): form 1, every token on its own best worker for all layers / every trace window "
                     "(a stand-in for a sequence) on its best worker; form 2, every token on its best worker at "
                     "every layer; no placement (average worker):", "",
                 table(["expert placement", "form 1 per-token best", "form 1 per-window best",
                        "form 2 per-token-and-layer best", "average"],
                       [[pl, f"{o[0]:.3f}", f"{o[1]:.3f}", f"{o[3]:.3f}", f"{o[2]:.3f}"] for pl, o in oracle.items()])]
    record("Speculative shuffling", "RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 .venv/bin/python "
           + " ".join(sys.argv), "\n".join(body))


if __name__ == "__main__":
    main()
