"""``moeyard place`` and ``moeyard simulate`` subcommands.

The main ``moeyard`` CLI calls ``register(subparsers)`` and dispatches ``args.func(args)``; it prints
``error: <msg>`` and exits 2 for ValueError subclasses (PlacementError). ``main(argv)`` does the same
standalone: ``python -m moeyard.placement.cli place --trace t.npz --workers 8 --out placement.json``.

``place`` solves from ``--trace``, or converts an existing ``--placement`` (our placement.json, or an SGLang
expert-location file with ``--workers`` and ``--model``); ``--export sglang`` also writes SGLang's
``--init-expert-location`` file, which needs ``--model`` for the decoder-layer layout.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import PlacementError


def register(subparsers) -> None:
    """Add the ``place`` and ``simulate`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("place", help="place experts on workers from a routing trace")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace.npz (experts[T,L,k]) or count statistics .npz (expert_counts)")
    src.add_argument("--placement", help="convert instead of solving: placement.json or an SGLang expert location")
    p.add_argument("--workers", type=int, default=None, help="workers (required with --trace and SGLang files)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--replicas", type=int, default=0, help="extra expert slots per worker per layer")
    p.add_argument("--balance", type=float, default=None, help="max worker load <= (1+EPS) x mean on the fitted tokens; the report scores "
                   "the --holdout share, where the load may exceed the bound (--holdout 0 to score the fit)")
    p.add_argument("--time-limit", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inter-node-cost", type=float, default=4.0)
    p.add_argument("--holdout", type=float, default=0.5,
                   help="fraction of trace tokens held out for the report (0: fit and report on all)")
    p.add_argument("--out", default=None, help="where to write placement.json (required with --trace)")
    p.add_argument("--plot", default=None, help="PNG of affinity matrices and the placement")
    p.add_argument("--export", choices=["sglang"], default=None, help="also write an engine's placement file")
    p.add_argument("--export-out", default="expert_location.json", help="where --export writes")
    p.add_argument("--model", default=None, help="checkpoint directory or 'default': its layers (MoE and dense) "
                   "are checked against the trace and shape the exported file")
    p.set_defaults(func=cmd_place)
    s = subparsers.add_parser("simulate", help="estimate all-to-all bytes/time per decode step")
    s.add_argument("--trace", default=None)
    s.add_argument("--placement", default=None)
    s.add_argument("--workers", type=int, required=True)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--intra-gbps", type=float, required=True, help="GB/s per worker within a node")
    s.add_argument("--inter-gbps", type=float, required=True, help="GB/s per worker across nodes")
    s.add_argument("--hidden-size", type=int, default=4096,
                   help="hidden size of the traced model (default 4096, Mixtral-8x7B's: set your model's "
                        "config.json hidden_size)")
    s.add_argument("--bytes-per-elem", type=int, default=2, help="bytes per activation element (default 2: bf16)")
    s.add_argument("--tokens-per-step", type=int, default=256, help="tokens per decode step (default 256)")
    s.add_argument("--local-fraction", type=float, default=None,
                   help="measured local fraction instead of one derived from trace + placement")
    s.add_argument("--num-layers", type=int, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.set_defaults(func=cmd_simulate)


def model_layout(model: str):
    """ModelLayout of a checkpoint directory (or "default"), from its config.json alone."""
    from ..moe.config import MoEConfig
    from ..moe.loader import resolve_model_path
    from .layout import ModelLayout
    path = resolve_model_path(model)
    cfg = MoEConfig.from_dir(path)
    return ModelLayout(cfg.num_layers, tuple(cfg.moe_layers), cfg.num_experts, cfg.top_k, name=f"model {model}")


def cmd_place(args) -> int:
    layout = model_layout(args.model) if args.model else None
    if args.export and layout is None:
        raise PlacementError("--export sglang needs --model: SGLang's file has one row per decoder layer, "
                             "dense layers included")
    if args.placement:
        placement = _read_placement(args, layout)
        if args.out:
            placement.to_json(args.out)
            print(f"wrote {args.out}: {placement.num_layers} layers x {placement.num_experts} experts on "
                  f"{placement.num_workers} workers")
    else:
        placement = _solve_and_report(args, layout)
    if args.export:
        from .sglang_format import write_sglang_location
        redundant = write_sglang_location(placement, layout, args.export_out)
        print(f"wrote {args.export_out}: start SGLang with --init-expert-location {args.export_out} "
              f"--ep-num-redundant-experts {redundant} on {placement.num_workers} GPUs (ep size)")
    return 0


def _read_placement(args, layout):
    import json
    from .placement import Placement
    from .sglang_format import KEY, read_sglang_location
    path = args.placement
    is_sglang = path.endswith(".pt")
    if not is_sglang and os.path.isfile(path):
        try:
            with open(path) as f:
                is_sglang = KEY in json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            pass   # Placement.from_json reports it
    if not is_sglang:
        placement = Placement.from_json(path)
        if layout is not None:
            layout.check_moe_shape(placement.num_layers, placement.num_experts, f"placement {path}")
        return placement
    if args.workers is None or layout is None:
        raise PlacementError(f"{path} is an SGLang expert location: pass --workers (its ep size) and --model")
    return read_sglang_location(path, args.workers, layout)


def _solve_and_report(args, layout):
    from .affinity import affinity_from_trace, load_problem_file
    from .evaluate import evaluate
    from .policies import BASELINES, get_policy
    from .solver import solve
    from .spec import PlaceSpec
    from .trace import split_tokens

    if args.workers is None or args.out is None:
        raise PlacementError("--trace needs --workers and --out")
    problem, trace = load_problem_file(args.trace)
    if layout is not None:
        layout.check_moe_shape(problem.num_layers, problem.num_experts, f"trace {args.trace}")
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
    if problem.meta.get("load_only"):
        print(f"note: {args.trace} holds expert loads only (no layer-to-layer transitions): the placement can "
              f"balance load (--balance, --replicas) but not keep tokens local")
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
    return res.placement


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
