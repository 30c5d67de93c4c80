#!/usr/bin/env python
"""Placement benchmark: cross-worker rate of ours vs baselines, optimality, scale, balance, replicas.

Prints a markdown report; ``--append docs/BENCHMARKS.md`` replaces that file's ``## Placement``
section with it (creating the file with a ``# Benchmarks`` heading if missing).

  python benchmarks/bench_placement.py --append docs/BENCHMARKS.md

Sections: generalisation on synthetic traces (fit on the first half of tokens, score on the second),
on the OLMoE-paper routing statistics (fit on one text domain, score on the other three), and on the
default model's trace when ``moe/default_model/trace.npz`` exists; proven optimum on a small instance;
time and gap at 32x64x8 and at DeepSeek-V3 scale (58x256x32, 4 nodes); balance; replication.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # tiny BLAS calls crawl when cores are shared
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from moeyard.placement import (BASELINES, PlacementError, PlaceSpec, affinity_from_trace, evaluate,  # noqa: E402
                               get_policy, load_routing_stats, load_trace, solve, split_tokens)
from moeyard.placement.synthetic import synthetic_trace  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "routing", "olmoe-paper")
DEFAULT_TRACE = os.path.join(ROOT, "moe", "default_model", "trace.npz")


def machine() -> str:
    try:
        model = [l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if l.startswith("Model name")][0]
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()}-core CPU ({model}), shared with other jobs; Python {platform.python_version()}"


def compare(fit, held, G, *, trace=None, time_limit, seed=0, exflow=True):
    """Row cells: cross-worker rate on ``held`` for ours and each baseline, plus our gap and seconds."""
    spec = PlaceSpec(G)
    r = solve(fit, G, time_limit=time_limit, seed=seed)
    cells = {"affinity": evaluate(r.placement, held).cross_rate}
    for name in BASELINES:
        if name == "exflow" and (not exflow or trace is None):
            cells[name] = None
            continue
        try:
            p = get_policy(name)(fit, spec, trace=trace, time_limit=time_limit, seed=seed, max_tokens=200)
            cells[name] = evaluate(p, held).cross_rate
        except PlacementError:
            cells[name] = None
    return cells, r


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def table_generalisation(rows):
    out = ["| data | G | ours (affinity) | round_robin | contiguous | eplb | exflow | ours vs best baseline | gap (fit) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, G, cells, r in rows:
        base = [v for k, v in cells.items() if k != "affinity" and v is not None]
        rel = (1 - cells["affinity"] / min(base)) if base else None
        out.append(f"| {label} | {G} | **{fmt(cells['affinity'])}** | {fmt(cells['round_robin'])} | "
                   f"{fmt(cells['contiguous'])} | {fmt(cells['eplb'])} | {fmt(cells['exflow'])} | "
                   f"{'n/a' if rel is None else f'-{rel:.1%}'} | {r.gap:.1%} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="per solve in the generalisation tables")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--skip-scale", action="store_true", help="skip the 58x256x32 run (~2.5 min)")
    ap.add_argument("--append", default=None, help="write the report as the ## Placement section of this file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cmd = "python benchmarks/bench_placement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["## Placement", "",
          f"Command: `{cmd}`  ", f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ",
          f"Machine: {machine()}", "",
          "Metric: cross-worker rate = fraction of consecutive-layer top-k transitions (token at layer l via "
          "expert i -> layer l+1 expert j, all k x k pairs) whose experts sit on different workers; lower is "
          "better. All policies in a table come from the same run. Gap = (objective - proven lower bound) / "
          "objective on the fitted statistics (bound: HiGHS MILP dual bound when exact, else the per-layer-pair "
          "b-matching bound).", ""]

    # 1. generalisation, synthetic traces
    rows = []
    cases = [("synthetic OLMoE-like 16L x 64E top-8", 16, 64, 8, (4, 8), False),
             ("synthetic Mixtral-like 8L x 8E top-2", 8, 8, 2, (4, 8), True)]
    for label, L, E, k, Gs, exf in cases:
        trace = synthetic_trace(args.tokens, L, E, k, seed=1)
        fit_t, held_t = split_tokens(trace)
        fit, held = affinity_from_trace(fit_t), affinity_from_trace(held_t)
        for G in Gs:
            cells, r = compare(fit, held, G, trace=fit_t, time_limit=args.time_limit, exflow=exf and G == 4)
            rows.append((label + ", held-out half", G, cells, r))
            print(label, G, cells, f"gap {r.gap:.3f}", flush=True)
    if os.path.exists(DEFAULT_TRACE):
        trace = load_trace(DEFAULT_TRACE)
        fit_t, held_t = split_tokens(trace)
        for G in (4, 8):
            if trace.num_experts % G:
                continue
            cells, r = compare(affinity_from_trace(fit_t), affinity_from_trace(held_t), G, trace=fit_t,
                               time_limit=args.time_limit, exflow=False)
            rows.append((f"default model trace ({trace.num_layers}L x {trace.num_experts}E), held-out half", G, cells, r))
    md += ["### Generalisation: synthetic traces (fit on first half of tokens, scored on second half)", ""]
    md += table_generalisation(rows) + [""]
    if not os.path.exists(DEFAULT_TRACE):
        md += [f"(`moe/default_model/trace.npz` not present yet; it is included automatically when it exists.)", ""]

    # 2. OLMoE-paper statistics: fit on one domain, score on the other three
    rows = []
    if os.path.isdir(SHARED):
        for model in ("olmoe-1b-7b", "mixtral-8x7b"):
            files = sorted(glob.glob(os.path.join(SHARED, f"{model}_*.npz")))
            for G in (4, 8):
                agg, gaps = {}, []
                for f in files:
                    others = [o for o in files if o != f]
                    fit, held = load_routing_stats(f), load_routing_stats(others)
                    cells, r = compare(fit, held, G, time_limit=min(args.time_limit, 5.0), exflow=False)
                    for kname, v in cells.items():
                        agg.setdefault(kname, []).append(v)
                    gaps.append(r.gap)
                cells = {kname: (None if any(v is None for v in vs) else float(np.mean(vs))) for kname, vs in agg.items()}

                class R:   # mean gap over the four fits
                    gap = float(np.mean(gaps))
                rows.append((f"{model} layers 0/7/15, fit 1 domain -> other 3 (mean of 4)", G, cells, R))
                print(model, G, cells, flush=True)
        md += ["### Generalisation: real routing statistics (`../shared/routing/olmoe-paper`)", "",
               "These files hold counts, not tokens, so ExFlow's token-level ILP cannot run (n/a); the three "
               "recorded layers (0, 7, 15) are treated as consecutive. Mixtral at G=8 has one expert per worker, "
               "so every placement is a relabelling.", ""]
        md += table_generalisation(rows) + [""]

    # 3. proven optimum on a small instance
    md += ["### Exact solve on a small instance", "", "| instance | objective | bound | status | seconds |",
           "|---|---|---|---|---|"]
    small = affinity_from_trace(synthetic_trace(4000, 4, 8, 2, seed=1))
    r = solve(small, 4, method="exact", time_limit=60)
    md.append(f"| 4L x 8E x 4 workers, top-2 (HiGHS MILP) | {r.objective:.4f} | {r.bound:.4f} | {r.status} | {r.seconds:.1f} |")
    rs = solve(small, 4, method="search", time_limit=2)
    md.append(f"| same, layer search (2 s) | {rs.objective:.4f} | {rs.bound:.4f} (pair bound) | {rs.status} | {rs.seconds:.1f} |")
    md.append("")
    print("exact", r.objective, r.bound, r.status, r.seconds, flush=True)

    # 4. scale
    md += ["### Scale: time and proven gap", "",
           "| instance | time limit | seconds | cross-worker rate | weighted cost/transition | gap | bound method "
           "| round_robin rate / weighted |",
           "|---|---|---|---|---|---|---|---|"]
    scale_cases = [(32, 64, 8, 1, 20000, 30.0)]
    if not args.skip_scale:
        scale_cases += [(58, 256, 32, 4, 8000, 120.0), (58, 256, 32, 1, 8000, 60.0)]
    for L, E, G, N, T, tl in scale_cases:
        prob = affinity_from_trace(synthetic_trace(T, L, E, 8, seed=2))
        r = solve(prob, G, nodes=N, time_limit=tl)
        m = evaluate(r.placement, prob, nodes=N)
        md.append(f"| {L}L x {E}E x {G} workers, {N} node(s), top-8, {T} tokens | {tl:.0f} s | {r.seconds:.1f} | "
                  f"{m.cross_rate:.3f} | {m.weighted_rate:.3f} | {r.gap:.1%} | {r.placement.solver.get('bound_method')} |")
        rr = evaluate(get_policy("round_robin")(prob, PlaceSpec(G, N)), prob, nodes=N)
        md[-1] += f" {rr.cross_rate:.3f} / {rr.weighted_rate:.3f} |"
        print("scale", L, E, G, N, r.seconds, r.gap, flush=True)
    md += ["", "Weighted cost: 1 per intra-node crossing, 4 per inter-node crossing (worker w on node w // (G/N)). "
           "The per-pair b-matching bound is tight when a worker holds few experts per layer (8 here) but loose "
           "for large groups: with 4 nodes the node-level term groups 64 experts per node, and that term "
           "dominates the 4-node gap; the same instance on one node (worker level only) shows the search itself "
           "is within a few % of optimal there. With several nodes the node level is also bounded by the spectral "
           "partition bound (`placement/spectral.py`) in the bound's share of the time limit; with more time it "
           "tightens further: before/after gaps in 'Placement at DeepSeek-V3 scale' (`benchmarks/bench_resolve.py`).",
           ""]

    # 5. balance and 6. replication, synthetic OLMoE-like, held-out half
    trace = synthetic_trace(args.tokens, 16, 64, 8, seed=3)
    fit_t, held_t = split_tokens(trace)
    fit, held = affinity_from_trace(fit_t), affinity_from_trace(held_t)
    md += ["### Balance and replication (synthetic 16L x 64E top-8, 8 workers, held-out half)", "",
           "Balance is enforced on the fitted half; the held-out half's loads drift slightly.", "",
           "| policy | cross-worker rate | load max/mean (worst layer) | load max/mean (mean of layers) "
           "| load max/mean on fitted half | gap |",
           "|---|---|---|---|---|---|"]
    for label, kw in (("ours, no constraint", {}), ("ours, balance eps=0.10", {"balance": 0.1}),
                      ("ours, 1 replica slot/worker", {"replicas": 1}), ("ours, 2 replica slots/worker", {"replicas": 2}),
                      ("ours, 2 replicas + balance 0.10", {"replicas": 2, "balance": 0.1})):
        try:
            r = solve(fit, 8, time_limit=args.time_limit, **kw)
        except PlacementError as exc:
            md.append(f"| {label} | n/a ({exc}) | | | | |")
            continue
        m = evaluate(r.placement, held)
        mf = evaluate(r.placement, fit)
        md.append(f"| {label} | {m.cross_rate:.3f} | {m.load_max_mean:.3f} | {m.load_max_mean_avg:.3f} | "
                  f"{mf.load_max_mean:.3f} | {r.gap:.1%} |")
    for name, R in (("eplb", 0), ("eplb", 2), ("round_robin", 0)):
        p = get_policy(name)(fit, PlaceSpec(8, replicas=R))
        m, mf = evaluate(p, held), evaluate(p, fit)
        md.append(f"| {name}{f', {R} replica slots' if R else ''} | {m.cross_rate:.3f} | {m.load_max_mean:.3f} | "
                  f"{m.load_max_mean_avg:.3f} | {mf.load_max_mean:.3f} | |")
    md += ["", f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    text = "\n".join(md)
    print(text)
    if args.append:
        write_section(args.append, text)
    return 0


def write_section(path, section):
    """Replace (or add) the ``## Placement`` section of ``path``, leaving other sections untouched."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pat = re.compile(r"^## Placement\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: section.rstrip() + "\n\n", old) if pat.search(old) else old.rstrip() + "\n\n" + section.rstrip() + "\n"
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    sys.exit(main())
