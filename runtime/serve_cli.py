"""``moeyard serve``: the OpenAI-compatible server from the command line.

    moeyard serve --model default --mode local --port 8000
    moeyard serve --config run.yaml --port 9000      # flags given explicitly override the YAML

run.yaml holds any flag by its long name (dashes or underscores), e.g.::

    model: /path/to/checkpoint
    mode: offload
    options: {expert_cache_fraction: 0.25}          # or: option: ["expert_cache_fraction=0.25"]
    host: 0.0.0.0
    port: 8000
    max_num_seqs: 32
"""

from __future__ import annotations

import argparse
import os

DEFAULTS = {"model": "default", "mode": "local", "dtype": None, "option": [], "host": "127.0.0.1", "port": 8000,
            "max_num_seqs": 64, "max_model_len": None, "max_num_batched_tokens": 2048, "served_model_name": None,
            "log_level": "info", "graceful_timeout": 30.0}


def register(subparsers):
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None here so that values from --config apply unless a flag is given explicitly.
    p.add_argument("--config", default=None, help="YAML file with any of these flags (explicit flags win)")
    p.add_argument("--model", default=None, help="checkpoint directory, or 'default' for the embedded model")
    p.add_argument("--mode", default=None, help="local | offload | ray")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--option", "-o", action="append", default=None, metavar="KEY=VALUE",
                   help="a mode option, e.g. -o expert_cache_fraction=0.25 (repeatable; JSON values)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="concurrent sequences (KV slots), default 64")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--served-model-name", default=None, help="model id reported by the API (default: the path)")
    p.add_argument("--log-level", default=None)
    p.add_argument("--graceful-timeout", type=float, default=None,
                   help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    p.set_defaults(func=cmd_serve)
    return p


def resolve_args(args) -> dict:
    """Merge defaults < YAML config < explicit flags; mode options merge key by key the same way."""
    from .cli import mode_options
    conf = {}
    if args.config:
        import yaml
        with open(args.config) as f:
            conf = yaml.safe_load(f) or {}
        if not isinstance(conf, dict):
            raise ValueError(f"{args.config}: expected a mapping of flag names to values")
        conf = {str(k).replace("-", "_"): v for k, v in conf.items()}
        known = set(DEFAULTS) | {"options"}
        bad = sorted(set(conf) - known)
        if bad:
            raise ValueError(f"{args.config}: unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    out = dict(DEFAULTS)
    for k in DEFAULTS:
        if k == "option":
            continue
        if k in conf:
            out[k] = conf[k]
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    opts = {}
    co = conf.get("options") or {}
    if not isinstance(co, dict):
        raise ValueError(f"{args.config}: options must be a mapping")
    opts.update(co)
    co2 = conf.get("option") or []
    opts.update(mode_options([co2] if isinstance(co2, str) else list(co2)))
    opts.update(mode_options(args.option or []))
    out["options"] = opts
    out.pop("option")
    return out


def cmd_serve(args):
    cfg = resolve_args(args)
    from .async_llm import AsyncLLM
    from .llm import LLM
    from .server import build_app, serve
    llm = LLM(cfg["model"], mode=cfg["mode"], dtype=cfg["dtype"], max_num_seqs=cfg["max_num_seqs"],
              max_model_len=cfg["max_model_len"], max_num_batched_tokens=cfg["max_num_batched_tokens"],
              **cfg["options"])
    name = cfg["served_model_name"] or (cfg["model"] if cfg["model"] == "default"
                                        else os.path.basename(os.path.normpath(cfg["model"])))
    async_llm = AsyncLLM(llm)
    app = build_app(async_llm, name)
    print(f"moeyard: serving {name!r} ({cfg['mode']} mode) on http://{cfg['host']}:{cfg['port']}/v1", flush=True)
    try:
        serve(app, cfg["host"], int(cfg["port"]), log_level=cfg["log_level"],
              graceful_timeout=float(cfg["graceful_timeout"]))
    finally:
        async_llm.shutdown()
    return 0
