"""The ``moeyard`` command line. User errors print one line ``error: …`` and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

# Subcommands owned by other packages register themselves through ``register(subparsers)``.
_PLUGINS = ("moeyard.placement.cli", "moeyard.runtime.serve_cli", "moeyard.runtime.profile", "moeyard.moe.inflate",
            "moeyard.moe.quantize")


def _common_model_args(p):
    p.add_argument("--model", default="default",
                   help="checkpoint directory, or an embedded model: 'default' (Mixtral-shaped) or 'deepseek-mini'")
    p.add_argument("--mode", default="local", help="local | offload | ray")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--quantization", default=None, help="int8 | int4: weight-only quantized weights (CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: the cores available to this process)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a mode option, e.g. -o expert_cache_fraction=0.25 (repeatable; JSON values)")


def mode_options(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"--option {kv!r} must look like KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_generate(args):
    from . import LLM, SamplingParams
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, stop=args.stop or None)
    _ray_notice(args.mode)
    llm = LLM(args.model, mode=args.mode, dtype=args.dtype, quantization=args.quantization, threads=args.threads,
              **mode_options(args.option))
    try:
        t0 = time.perf_counter()
        out = llm.generate([args.prompt], sp)[0]
        dt = time.perf_counter() - t0
        if out.finish_reason == "error":
            raise ValueError(out.error)
        print(args.prompt + out.text)
        print(f"[{len(out.token_ids)} tokens in {dt:.2f}s, {len(out.token_ids) / max(dt, 1e-9):.1f} tok/s, "
              f"finish_reason={out.finish_reason}]", file=sys.stderr)
    finally:
        llm.close()


def _ray_notice(mode: str):
    if mode == "ray":
        print("moeyard: starting Ray and the expert-parallel workers (each loads its experts; this takes a while)...",
              file=sys.stderr, flush=True)


def cmd_demo(args):
    _ray_notice(args.mode)
    from .demo import run_demo
    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeyard", description="Distributed inference runtime for MoE models")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue one prompt")
    _common_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("demo", help="run the embedded default model on one prompt per domain")
    _common_model_args(d)
    d.add_argument("--max-tokens", type=int, default=48)
    d.set_defaults(func=cmd_demo)
    for mod in _PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            if e.name != mod:
                raise
            continue
        m.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:   # user errors: MoeyardError and friends subclass ValueError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
