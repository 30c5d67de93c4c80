#!/usr/bin/env python
"""Placement that follows the traffic, live on Ray: bytes crossing workers per token while the workload switches
domain, measured by the expert-parallel executor's counters (not modelled), for a static affinity placement,
online affinity rebalancing and EPLB-style load-only rebalancing, each a fresh ``LLM(mode="ray")``.

    RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 nice -n 5 \
        .venv/bin/python benchmarks/bench_drift_live.py [--model deepseek-mini] [--workers 4] [--requests 96]
        [--prompt-len 124] [--gen 4] [--window 8] [--json out.json]

Workload (the text source of ``bench_drift.py``, through its helpers): phase 1 is held-out code (Python
standard-library source not in the corpus, then the github validation split), phase 2 held-out prose (the
wikipedia and arxiv validation splits). Validation text the model's shipped ``trace.npz`` already covers is
skipped, so the start-up placement has seen neither phase. ``--requests`` requests per phase, half from each
stream, each a prompt of ``--prompt-len`` consecutive tokens plus ``--gen`` greedy generated tokens (prefill-heavy:
routed tokens are what the rebalancer counts, prompts are most of them), served in order in windows of
``--window`` requests (one ``generate`` call each; the rebalancer's own window is ``--rb-window`` routed tokens).

Runs (4 Ray workers, ``ep_scheme="coherent"``, each from the same start-up placement: the affinity solver on the
shipped trace, solved once here and passed as a placement.json):
- static: rebalance off;
- online: ``rebalance="periodic"``, ``rebalance_options['policy'] = 'affinity'`` (cluster/rebalance.py);
- load_only: the same with ``policy='load_only'`` (EPLB's balanced packing of each window's loads);
- hindsight (ceiling, phase 2 only): a static placement solved with the same solver on phase 2's own routing
  (recorded in local mode on exactly its prompts), served live with rebalance off.

Per window: bytes handed to collectives that cross workers (``a2a_bytes``: MoE rows, replicated cache entries,
moved residual streams, split sizes) per routed token (``routed_assignments / (layers x top_k)``), expert moves
and bytes moved (``rebalance_bytes_moved``); "net" adds the bytes moved to the window in which they are moved.
Every run's tokens are asserted identical to local mode's (``LLM(model)``) for the same requests.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_drift import encode_stream, phase_trace, python_source_ids  # noqa: E402  (adds tools/ to the path)

from moeyard.cluster import layout  # noqa: E402
from moeyard.moe.loader import load_model, resolve_model_path  # noqa: E402
from moeyard.runtime import LLM, SamplingParams  # noqa: E402

COUNTERS = ("a2a_bytes", "moe_bytes", "kv_bytes", "hidden_bytes", "meta_bytes", "routed_assignments",
            "rebalance_moves", "rebalance_experts_moved", "rebalance_bytes_moved")


def held_out(tok, trace_path: str) -> dict[str, np.ndarray]:
    """Token streams of each source, minus the validation-split prefix the shipped trace was recorded on."""
    z = np.load(trace_path)
    domains = [str(d) for d in z["domains"]]
    out = {"python": python_source_ids(tok)}
    for d in ("github", "wikipedia", "arxiv"):
        s = encode_stream(tok, d, "val")
        ids = z["token_ids"][z["domain"] == domains.index(d)]
        assert np.array_equal(s[:len(ids)], ids), f"{d}: the trace is not a prefix of the validation split"
        out[d] = s[len(ids):]
    return out


def phase_prompts(streams: list[np.ndarray], n: int, plen: int) -> list[list[int]]:
    """``n`` prompts of ``plen`` tokens, the first half from streams[0], the rest from streams[1], in order
    (the windows ``phase_trace`` records)."""
    per = -(-n // len(streams))
    out = []
    for s in streams:
        assert len(s) >= per * plen, f"a stream of {len(s)} tokens is too short for {per} x {plen}"
        out += [s[i * plen:(i + 1) * plen].tolist() for i in range(per)]
    return out[:n]


def write_placement(pl, path: str):
    with open(path, "w") as f:
        json.dump({"num_workers": pl.num_workers,
                   "assignment": [[list(pl.workers_of(i, e)) for e in range(pl.num_experts)]
                                  for i in range(pl.num_layers)]}, f)


def serve(model, placement_file, phases, a, params, policy=None):
    """One fresh Ray-mode LLM over ``phases`` [(name, prompts)]: per-window counters and the tokens."""
    kw = dict(mode="ray", num_workers=a.workers, ep_scheme="coherent", placement=placement_file,
              max_num_seqs=a.window, max_num_batched_tokens=a.window * (a.prompt_len + a.gen))
    if policy is not None:
        kw.update(rebalance="periodic", rebalance_window=a.rb_window, rebalance_min_gain=0.0,
                  rebalance_byte_budget=a.budget_mb * 2**20,
                  rebalance_options={"policy": policy, "time_limit": a.resolve_time,
                                     **(json.loads(a.online_options) if policy == "affinity" else {})})
    t0 = time.perf_counter()
    llm = LLM(model, **kw)
    start_s = time.perf_counter() - t0
    per_tok = len(llm.cfg.moe_layers) * llm.cfg.top_k
    rows, tokens, t1 = [], [], time.perf_counter()
    try:
        prev = llm.stats()
        for phase, prompts in phases:
            for w in range(0, len(prompts), a.window):
                outs = llm.generate(prompt_token_ids=prompts[w:w + a.window], sampling_params=params)
                assert all(o.finish_reason == "length" for o in outs), [o.finish_reason for o in outs]
                tokens += [o.token_ids for o in outs]
                st = llm.stats()
                d = {k: st.get(k, 0) - prev.get(k, 0) for k in COUNTERS}
                prev = st
                n = d["routed_assignments"] / per_tok
                rows.append({"phase": phase, "window": len(rows), "tokens": n, "bytes": d["a2a_bytes"] / n,
                             "net": (d["a2a_bytes"] + d["rebalance_bytes_moved"]) / n,
                             "placement_bytes": (d["moe_bytes"] + d["hidden_bytes"]) / n,
                             "kv_per_token": d["kv_bytes"] / n, "moves": d["rebalance_moves"],
                             "experts_moved": d["rebalance_experts_moved"], "bytes_moved": d["rebalance_bytes_moved"],
                             **{k: d[k] for k in COUNTERS}})
        wall = time.perf_counter() - t1
        final = {k: v for k, v in llm.stats().items() if k.startswith("rebalance_")}
    finally:
        llm.close()
    return {"rows": rows, "tokens": tokens, "start_s": start_s, "wall_s": wall, "rebalance": final}


def phase_sum(run, phase):
    rs = [r for r in run["rows"] if r["phase"] == phase]
    n = sum(r["tokens"] for r in rs)
    a2a = sum(r["a2a_bytes"] for r in rs)
    moved = sum(r["bytes_moved"] for r in rs)
    plc = sum(r["moe_bytes"] + r["hidden_bytes"] for r in rs)
    return {"tokens": n, "gross": a2a / n, "net": (a2a + moved) / n, "placement_net": (plc + moved) / n,
            "moves": sum(r["moves"] for r in rs), "experts_moved": sum(r["experts_moved"] for r in rs),
            "bytes_moved": moved}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-mini")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=96, help="requests of each phase")
    ap.add_argument("--prompt-len", type=int, default=124)
    ap.add_argument("--gen", type=int, default=4, help="greedy tokens generated per request")
    ap.add_argument("--window", type=int, default=8, help="requests per measured window (one generate call)")
    ap.add_argument("--rb-window", type=int, default=1024, help="rebalance_window (routed tokens)")
    ap.add_argument("--resolve-time", type=float, default=3.0, help="seconds per warm re-solve")
    ap.add_argument("--startup-time", type=float, default=10.0, help="seconds of the start-up / hindsight solve")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="rebalance_byte_budget in MiB")
    ap.add_argument("--online-options", default="{}", help="JSON: more rebalance_options of the online run")
    ap.add_argument("--runs", default="static,online,load_only,hindsight", help="runs to make (static and "
                    "hindsight are needed for the summary)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.requests % 2:
        ap.error("--requests must be even (half from each stream of a phase)")
    import ray
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)   # actors take fractions of them

    T0 = time.perf_counter()
    path = resolve_model_path(a.model)
    lm = load_model(a.model)
    cfg = lm.cfg
    streams = held_out(lm.tokenizer._tok, os.path.join(path, "trace.npz"))
    phases = [("code", phase_prompts([streams["python"], streams["github"]], a.requests, a.prompt_len)),
              ("prose", phase_prompts([streams["wikipedia"], streams["arxiv"]], a.requests, a.prompt_len))]
    params = SamplingParams(max_tokens=a.gen, temperature=0.0, ignore_eos=True)
    tmp = tempfile.mkdtemp(prefix="moeyard_drift_live_")

    # start-up placement (shipped trace) and the hindsight one (phase 2's own prompts, recorded in local mode)
    start, _ = layout.affinity_placement(layout.trace_of_model(path), cfg, a.workers, a.startup_time)
    prose_ids = [np.asarray(p, dtype=np.int32) for p in phases[1][1]]
    half = len(prose_ids) // 2
    prose_tr = phase_trace(lm, [np.concatenate(prose_ids[:half]), np.concatenate(prose_ids[half:])],
                           len(prose_ids) * a.prompt_len, seq_len=a.prompt_len)
    best, _ = layout.affinity_placement(prose_tr, cfg, a.workers, a.startup_time)
    files = {"start": os.path.join(tmp, "start.json"), "hindsight": os.path.join(tmp, "hindsight.json")}
    write_placement(start, files["start"])
    write_placement(best, files["hindsight"])
    del lm
    print(f"# {a.model}: {len(cfg.moe_layers)} MoE layers x {cfg.num_experts} experts top-{cfg.top_k}; "
          f"{a.requests} requests x ({a.prompt_len} prompt + {a.gen} generated) per phase; placements solved "
          f"({time.perf_counter() - T0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    local = LLM(a.model, max_num_seqs=a.window, max_num_batched_tokens=a.window * (a.prompt_len + a.gen))
    want = []
    for _, prompts in phases:
        for w in range(0, len(prompts), a.window):
            want += [o.token_ids for o in local.generate(prompt_token_ids=prompts[w:w + a.window],
                                                         sampling_params=params)]
    local.close()
    print(f"local mode reference: {len(want)} requests ({time.perf_counter() - t0:.0f} s)", flush=True)

    runs = {}
    for name, pfile, ph, policy in (("static", files["start"], phases, None),
                                    ("online", files["start"], phases, "affinity"),
                                    ("load_only", files["start"], phases, "load_only"),
                                    ("hindsight", files["hindsight"], phases[1:], None)):
        if name not in a.runs.split(","):
            continue
        r = serve(a.model, pfile, ph, a, params, policy)
        ref = want if name != "hindsight" else want[len(phases[0][1]):]
        assert r["tokens"] == ref, f"{name}: tokens differ from local mode"
        runs[name] = r
        print(f"{name}: start {r['start_s']:.0f} s, served {sum(x['tokens'] for x in r['rows']):.0f} routed "
              f"tokens in {r['wall_s']:.0f} s; tokens identical to local mode", flush=True)
        for x in r["rows"]:
            print(f"  w{x['window']:02d} {x['phase']:5s} {x['bytes']:8.0f} B/tok (net {x['net']:8.0f}, placement "
                  f"{x['placement_bytes']:7.0f}, kv {x['kv_per_token']:6.0f})  moves {x['moves']} experts "
                  f"{x['experts_moved']} ({x['bytes_moved'] / 2**20:.2f} MiB)", flush=True)
        if policy is not None:
            print(f"  counters: { {k: v for k, v in r['rebalance'].items() if not isinstance(v, list)} }")
            print(f"  predicted / measured saving per adoption (B/token): "
                  f"{[round(v) for v in r['rebalance']['rebalance_predicted_saving']]} / "
                  f"{[round(v) for v in r['rebalance']['rebalance_measured_saving']]}", flush=True)

    summary = {f"{ph}_{k}": phase_sum(r, ph) for k, r in runs.items() for ph in ("code", "prose")
               if any(x["phase"] == ph for x in r["rows"])}
    s, o, e, h = (summary.get(f"prose_{k}", {"net": float("nan")})["net"]
                  for k in ("static", "online", "load_only", "hindsight"))
    summary["prose_online_vs_static"] = 1 - o / s
    summary["prose_load_only_vs_static"] = 1 - e / s
    summary["prose_hindsight_vs_static"] = 1 - h / s
    summary["prose_fraction_of_ceiling"] = (s - o) / (s - h) if s != h else float("nan")
    print("\nbytes / routed token net of moves (placement-dependent part: MoE rows + residual moves + moves):")
    for k in runs:
        cells = [f"{ph} {summary[f'{ph}_{k}']['net']:.0f} ({summary[f'{ph}_{k}']['placement_net']:.0f})"
                 for ph in ("code", "prose") if f"{ph}_{k}" in summary]
        print(f"  {k:10s} " + "  ".join(cells))
    print(f"prose: online {summary['prose_online_vs_static']:+.1%} below static, load-only "
          f"{summary['prose_load_only_vs_static']:+.1%}, hindsight ceiling {summary['prose_hindsight_vs_static']:+.1%};"
          f" online reached {summary['prose_fraction_of_ceiling']:.0%} of the ceiling")
    print(f"total wall {time.perf_counter() - T0:.0f} s")
    out = {"model": a.model, "args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": platform.processor() or platform.machine(), "summary": summary,
           "runs": {k: {kk: v for kk, v in r.items() if kk != "tokens"} for k, r in runs.items()}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    ray.shutdown()
    return out


if __name__ == "__main__":
    main()
