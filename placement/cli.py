"""``moeyard place`` and ``moeyard simulate`` subcommands.

The main ``moeyard`` CLI calls ``register(subparsers)`` and dispatches ``args.func(args)``; it prints
``error: <msg>`` and exits 2 for ValueError subclasses (PlacementError). ``main(argv)`` does the same
standalone: ``python -m moeyard.placement.cli place --trace t.npz --workers 8 --out placement.json``.
"""
from __future__ import annotations

import argparse
import sys

from .errors import PlacementError


def register(subparsers) -> None:
    """Add the ``place`` and ``simulate`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("place", help="place experts on workers from a routing trace")
    p.add_argument("--trace", required=True, help="trace.npz (experts[T,L,k]) or OLMoE-paper statistics .npz")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--replicas", type=int, default=0, help="extra expert slots per worker per layer")
    p.add_argument("--balance", type=float, default=None, help="max worker load <= (1+EPS) x mean")
    p.add_argument("--time-limit", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inter-node-cost", type=float, default=4.0)
    p.add_argument("--holdout", type=float, default=0.5,
                   help="fraction of trace tokens held out for the report (0: fit and report on all)")
    p.add_argument("--out", required=True, help="where to write placement.json")
    p.add_argument("--plot", default=None, help="PNG of affinity matrices and the placement")
    p.set_defaults(func=cmd_place)
    s = subparsers.add_parser("simulate", help="estimate all-to-all bytes/time per decode step")
    s.add_argument("--trace", default=None)
    s.add_argument("--placement", default=None)
    s.add_argument("--workers", type=int, required=True)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--intra-gbps", type=float, required=True, help="GB/s per worker within a node")
    s.add_argument("--inter-gbps", type=float, required=True, help="GB/s per worker across nodes")
    s.add_argument("--hidden-size", type=int, default=4096)
    s.add_argument("--bytes-per-elem", type=int, default=2)
    s.add_argument("--tokens-per-step", type=int, default=256)
    s.add_argument("--local-fraction", type=float, default=None,
                   help="measured local fraction instead of one derived from trace + placement")
    s.add_argument("--num-layers", type=int, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.set_defaults(func=cmd_simulate)


def cmd_place(args) -> int:
    from .affinity import affinity_from_trace, load_problem_file
    from .evaluate import evaluate
    from .policies import BASELINES, get_policy
    from .solver import solve
    from .spec import PlaceSpec
    from .trace import split_tokens

    problem, trace = load_problem_file(args.trace)
    spec = PlaceSpec(args.workers, args.nodes, args.replicas, args.balance, args.inter_node_cost)
    spec.check(problem)
    fit_trace, eval_data, fit = trace, problem, problem
    if trace is not None and args.holdout > 0:
        fit_trace, held = split_tokens(trace, 1.0 - args.holdout)
        fit, eval_data = affinity_from_trace(fit_trace), held
    res = solve(fit, args.workers, nodes=args.nodes, replicas=args.replicas, balance=args.balance,
                time_limit=args.time_limit, seed=args.seed, inter_node_cost=args.inter_node_cost)
    res.placement.to_json(args.out)
    where = "the fitted statistics"
    if trace is not None and args.holdout > 0:
        where = f"held-out {args.holdout:.0%} of tokens"
    print(f"placement of {problem.num_layers} layers x {problem.num_experts} experts on {args.workers} workers"
          f" ({args.nodes} node(s)); metrics on {where}")
    print("| policy | cross-worker rate | inter-node rate | load max/mean |")
    print("|---|---|---|---|")
    rows = [("affinity (ours)", res.placement)]
    for name in BASELINES:
        try:
            if name == "exflow" and (fit_trace is None or problem.num_layers * problem.num_experts
                                     * args.workers > 256):
                raise PlacementError("token-level ILP only runs on small traces")
            rows.append((name, get_policy(name)(fit, spec, trace=fit_trace,
                                                time_limit=min(args.time_limit, 30.0), seed=args.seed)))
        except PlacementError as exc:
            rows.append((name, str(exc)))
    for name, pl in rows:
        if isinstance(pl, str):
            print(f"| {name} | n/a ({pl}) | | |")
            continue
        m = evaluate(pl, eval_data, nodes=args.nodes, inter_node_cost=args.inter_node_cost)
        print(f"| {name} | {m.cross_rate:.4f} | {m.inter_node_rate:.4f} | {m.load_max_mean:.3f} |")
    print(f"objective {res.objective:.6g} (weighted cross-worker transitions/token), bound {res.bound:.6g}, "
          f"gap {res.gap:.2%}, status {res.status}, {res.seconds:.1f}s; wrote {args.out}")
    if args.plot:
        from .plot import plot_placement
        plot_placement(fit, res.placement, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_simulate(args) -> int:
    from .placement import Placement
    from .simulate import simulate
    from .trace import load_trace

    trace = load_trace(args.trace) if args.trace else None
    placement = Placement.from_json(args.placement) if args.placement else None
    r = simulate(trace, placement, args.workers, args.nodes, args.intra_gbps, args.inter_gbps,
                 args.hidden_size, args.bytes_per_elem, args.tokens_per_step, local_fraction=args.local_fraction,
                 num_layers=args.num_layers, top_k=args.top_k)
    print(f"workers {r.workers}, nodes {r.nodes}: local {r.local_fraction:.4f}, inter-node {r.inter_node_fraction:.4f}")
    print(f"per decode step: intra-node {r.bytes_intra / 1e6:.2f} MB ({r.seconds_intra * 1e3:.3f} ms), "
          f"inter-node {r.bytes_inter / 1e6:.2f} MB ({r.seconds_inter * 1e3:.3f} ms), total {r.seconds * 1e3:.3f} ms")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moeyard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
