#!/usr/bin/env python
"""Placement that follows the traffic, as a replay: bytes crossing workers per token while the workload switches
domain, for a static affinity placement, online affinity rebalancing and EPLB-style load-only rebalancing.

    .venv/bin/python benchmarks/bench_drift.py [--model deepseek-mini] [--workers 4] [--window 1024]
        [--tokens 8192] [--history 2] [--resolve-time 3] [--budget-mb 64] [--balance 0.25] [--json out.json]

Workload: the model's own routing (every MoE layer's top-k, recorded by running the model over the text in
256-token windows) on held-out code first (Python standard-library source not in the corpus, then the github
validation split), then held-out prose (the wikipedia and arxiv validation splits): ``--tokens`` of each phase,
served in windows of ``--window`` tokens in order.

Policies, each starting from the same start-up placement (the affinity solver on the model's shipped
``trace.npz``, which covers all four corpus domains):
- static: never changes;
- online: after each window, ``placement.rebalance.propose`` re-solves warm from the current placement on the
  routing counts of the last ``--history`` windows (the counts a worker records: per-layer loads and
  consecutive-layer transitions), and the proposal is adopted only when its predicted saving over the next
  ``--horizon`` tokens exceeds the cost of moving its experts (the byte budget caps one proposal's moves);
- eplb: after each window, DeepSeek EPLB's balanced packing of the same counts (load only), adopted always.

Bytes: with ExFlow's context-coherent scheme a token's hidden row crosses workers when consecutive experts of its
path live apart; one crossing of the solver's k x k pairs is 1/k of a row (bf16), so a placement under which every
pair crosses costs exactly standard expert parallelism's dispatch (k rows per MoE layer). Moves cost the moved
experts' bf16 bytes, charged to the window in which they are made ("net" figures include them). This is a replay
of recorded routing through the solver's cost model — not a live Ray run: the executor does not move experts yet.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from corpus import encode_stream, python_source_ids
from moeyard.moe.loader import load_model, resolve_model_path
from moeyard.placement import PlaceSpec, affinity_from_trace, evaluate
from moeyard.placement.affinity import (
    affinity_from_counts,
    expert_load,
    transition_counts,
)
from moeyard.placement.online import OnlineRebalancer
from moeyard.placement.policies import get_policy
from moeyard.placement.rebalance import RebalanceConfig
from moeyard.placement.trace import Trace, load_trace
from trace_default_model import trace as record_routes


def phase_trace(lm, streams: list[np.ndarray], tokens: int, seq_len: int = 256) -> Trace:
    """Routing of ``tokens`` tokens taken evenly from ``streams`` (whole windows, in order)."""
    per = -(-tokens // len(streams) // seq_len) * seq_len
    ex = [record_routes(lm, s[:per], seq_len)[0] for s in streams]
    x = np.concatenate(ex)[:tokens]
    return Trace(x.astype(np.int64), lm.cfg.num_experts)


def bytes_per_token(placement, tr: Trace, crossing_bytes: float) -> tuple[float, float]:
    m = evaluate(placement, affinity_from_trace(tr))
    return m.cost_per_token * crossing_bytes, m.load_max_mean


def moved_experts(a, b) -> int:
    """Expert copies ``b`` holds that ``a`` does not (each is one copy over the network)."""
    return int((b.membership_LEG() & ~a.membership_LEG()).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-mini")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each phase")
    ap.add_argument("--horizon", type=int, default=8192,
                    help="tokens a move's saving is counted over when deciding (the re-solve's window_tokens)")
    ap.add_argument("--history", type=int, default=2, help="windows of counts EPLB's repacking sees")
    ap.add_argument("--decay", type=float, default=0.5, help="online counts: forgetting per window")
    ap.add_argument("--resolve-time", type=float, default=3.0, help="seconds per warm re-solve")
    ap.add_argument("--startup-time", type=float, default=20.0, help="seconds of the start-up solve")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="most expert bytes one proposal may move")
    ap.add_argument("--balance", type=float, default=1.0, help="worker load cap: (1 + balance) x mean")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    lm = load_model(a.model)
    cfg = lm.cfg
    D, K = cfg.hidden_size, cfg.top_k
    expert_bytes, crossing_bytes = cfg.expert_bytes(2), 2 * D / K
    tok = lm.tokenizer._tok          # the tokenizers.Tokenizer the corpus helpers take
    t0 = time.perf_counter()
    cache = os.path.join("/tmp", f"moeyard_drift_{a.model}_{a.tokens}.npz")
    if os.path.isfile(cache):
        z = np.load(cache)
        code, prose = Trace(z["code"], cfg.num_experts), Trace(z["prose"], cfg.num_experts)
    else:
        code = phase_trace(lm, [python_source_ids(tok), encode_stream(tok, "github", "val")], a.tokens)
        prose = phase_trace(lm, [encode_stream(tok, "wikipedia", "val"), encode_stream(tok, "arxiv", "val")],
                            a.tokens)
        np.savez(cache, code=code.experts_TLk, prose=prose.experts_TLk)
    print(f"# {a.model}: {len(cfg.moe_layers)} MoE layers x {cfg.num_experts} experts top-{K}, expert "
          f"{expert_bytes / 2**10:.0f} KiB, hidden row {2 * D} B; routing of {code.num_tokens} code + "
          f"{prose.num_tokens} prose tokens recorded in {time.perf_counter() - t0:.0f} s", flush=True)

    spec = PlaceSpec(a.workers, balance=a.balance)
    shipped = load_trace(os.path.join(resolve_model_path(a.model), "trace.npz"))
    start = get_policy("affinity")(affinity_from_trace(shipped), spec, time_limit=a.startup_time)
    rcfg = RebalanceConfig(window_tokens=a.horizon, byte_budget=a.budget_mb * 2**20, expert_bytes=expert_bytes,
                           crossing_bytes=crossing_bytes, time_limit=a.resolve_time)
    windows = [("code", code.take(np.arange(i, min(i + a.window, code.num_tokens))))
               for i in range(0, code.num_tokens, a.window)]
    windows += [("prose", prose.take(np.arange(i, min(i + a.window, prose.num_tokens))))
                for i in range(0, prose.num_tokens, a.window)]
    cur = {"static": start, "online": start, "eplb": start}
    online = OnlineRebalancer(start, spec, rcfg, cfg.num_experts, decay=a.decay,
                              prior=(transition_counts(shipped), expert_load(shipped), shipped.num_tokens))
    charge = {k: 0.0 for k in cur}                       # move bytes to add to the next window
    counters = {"eplb_moves": 0, "eplb_bytes_moved": 0.0}
    rows, pending = [], None
    for w, (phase, tr) in enumerate(windows):
        row = {"window": w, "phase": phase}
        for k, p in cur.items():
            b, load = bytes_per_token(p, tr, crossing_bytes)
            row[k] = b
            row[k + "_net"] = b + charge[k] / tr.num_tokens
            row[k + "_load"] = load
            charge[k] = 0.0
        if pending is not None:          # the measured saving of last window's adoption on this window
            old, predicted = pending
            row["measured_saving"] = bytes_per_token(old, tr, crossing_bytes)[0] - row["online"]
            row["predicted_saving"] = predicted
            pending = None
        rows.append(row)
        print(f"  w{w:02d} {phase:5s} static {row['static']:7.1f}  online {row['online_net']:7.1f} "
              f"(load {row['online_load']:.2f})  eplb {row['eplb_net']:7.1f} (load {row['eplb_load']:.2f}) B/tok",
              flush=True)
        if w + 1 == len(windows):
            break
        # online: the window's routing, per sequence, to the rebalancer (held-out half validates)
        seq = 256
        for i in range(0, tr.num_tokens, seq):
            online.observe(tr.experts_TLk[i:i + seq])
        prop = online.step()
        print(f"      online: {online.last}", flush=True)
        if prop is not None:
            pending = (cur["online"], prop.saving_per_token)
            charge["online"] = prop.move_bytes
            cur["online"] = prop.placement
        # eplb: balanced packing of the last `history` windows' loads
        hist = [t for _, t in windows[max(0, w + 1 - a.history):w + 1]]
        ht = Trace(np.concatenate([t.experts_TLk for t in hist]), cfg.num_experts)
        trans, load, n = transition_counts(ht), expert_load(ht), ht.num_tokens
        new = get_policy("eplb")(affinity_from_counts(trans, load, n), spec)
        mv = moved_experts(cur["eplb"], new)
        counters["eplb_moves"] += mv
        counters["eplb_bytes_moved"] += mv * expert_bytes
        charge["eplb"] = mv * expert_bytes
        cur["eplb"] = new

    def mean(phase, key):
        return float(np.mean([r[key] for r in rows if r["phase"] == phase]))

    summary = {}
    for phase in ("code", "prose"):
        for k in ("static", "online", "eplb"):
            summary[f"{phase}_{k}"] = mean(phase, k + "_net")
            summary[f"{phase}_{k}_load_max"] = float(max(r[k + "_load"] for r in rows if r["phase"] == phase))
    # hindsight ceiling: a placement solved on each phase's own tokens (cold, --startup-time), scored on them
    for phase, tr in (("code", code), ("prose", prose)):
        best = get_policy("affinity")(affinity_from_trace(tr), spec, time_limit=a.startup_time)
        summary[f"{phase}_hindsight"] = bytes_per_token(best, tr, crossing_bytes)[0]
        summary[f"{phase}_static_whole"] = bytes_per_token(start, tr, crossing_bytes)[0]
    summary["prose_hindsight_vs_static"] = 1 - summary["prose_hindsight"] / summary["prose_static_whole"]
    print(f"hindsight ceiling (solved on the phase's own tokens): code {summary['code_hindsight']:.1f} vs static "
          f"{summary['code_static_whole']:.1f}; prose {summary['prose_hindsight']:.1f} vs static "
          f"{summary['prose_static_whole']:.1f} ({summary['prose_hindsight_vs_static']:+.1%})")
    summary["prose_online_vs_static"] = 1 - summary["prose_online"] / summary["prose_static"]
    summary["prose_eplb_vs_static"] = 1 - summary["prose_eplb"] / summary["prose_static"]
    pairs = [(r["predicted_saving"], r["measured_saving"]) for r in rows if "measured_saving" in r]
    print("gross (moves not charged): " + ", ".join(
        f"{ph} {k} {float(np.mean([r[k] for r in rows if r['phase'] == ph])):.1f}"
        for ph in ("code", "prose") for k in ("static", "online", "eplb")))
    print(f"\nmean B/token net of moves — code: static {summary['code_static']:.1f}, online "
          f"{summary['code_online']:.1f}, eplb {summary['code_eplb']:.1f}; prose: static {summary['prose_static']:.1f},"
          f" online {summary['prose_online']:.1f} ({summary['prose_online_vs_static']:+.1%} below static), eplb "
          f"{summary['prose_eplb']:.1f} ({summary['prose_eplb_vs_static']:+.1%})")
    counters.update(online.counters)
    print(f"counters: {counters}")
    if pairs:
        print("predicted vs measured saving per token of each adoption (B): "
              + ", ".join(f"{p:.1f}/{m:.1f}" for p, m in pairs))
    out = {"model": a.model, "args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "expert_bytes": expert_bytes, "crossing_bytes": crossing_bytes, "rows": rows, "summary": summary,
           "counters": counters}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
