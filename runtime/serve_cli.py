"""``moeyard serve``: the OpenAI-compatible server from the command line.

    moeyard serve --model default --mode local --port 8000
    moeyard serve --config run.yaml --port 9000      # flags given explicitly override the YAML

run.yaml holds any flag by its long name (dashes or underscores), e.g.::

    model: /path/to/checkpoint
    mode: offload
    options: {expert_cache_fraction: 0.25}          # or: option: ["expert_cache_fraction=0.25"]
    host: 127.0.0.1        # loopback only (the default); 0.0.0.0 exposes it to the network: set an API key
    port: 8000
    max_num_seqs: 32
    request_timeout: 300

The API key comes from --api-key or the MOEYARD_API_KEY environment variable (prefer the variable: command lines
are visible to other users). The port is opened before the model loads, so a port in use fails at once.
Limits and endpoints: docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import os

DEFAULTS = {"model": "default", "mode": "local", "dtype": None, "option": [], "host": "127.0.0.1", "port": 8000,
            "max_num_seqs": 64, "max_model_len": None, "max_num_batched_tokens": 2048, "served_model_name": None,
            "log_level": "info", "graceful_timeout": 30.0, "api_key": None, "enable_docs": False,
            "max_body_bytes": 2 << 20, "max_prompt_tokens": None, "max_choices": 64, "max_queued": 256,
            "request_timeout": 600.0, "max_restarts": 5}


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
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MOEYARD_API_KEY; none: open)")
    p.add_argument("--enable-docs", action="store_true", default=None, help="serve /docs and /openapi.json")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 2 MiB; 413)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context - 1)")
    p.add_argument("--max-choices", type=int, default=None, help="most completions per request, prompts x n "
                   "(default 64)")
    p.add_argument("--max-queued", type=int, default=None, help="requests that may wait beyond --max-num-seqs "
                   "(default 256; more get 429 with Retry-After)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run before it ends with an error (default 600; 0: no deadline)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="engine rebuilds after failures before the server reports itself down (default 5)")
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


def _positive(cfg: dict, key: str, kind=int, allow_none: bool = False, allow_zero: bool = False):
    v = cfg[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)) \
            or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"--{key.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"{'integer' if kind is int else 'number'}, got {v!r}")
    return kind(v)


def cmd_serve(args):
    cfg = resolve_args(args)
    from .async_llm import AsyncLLM
    from .server import ServerLimits, bind_socket, build_app, serve
    limits = ServerLimits(max_body_bytes=_positive(cfg, "max_body_bytes"),
                          max_prompt_tokens=_positive(cfg, "max_prompt_tokens", allow_none=True),
                          max_choices=_positive(cfg, "max_choices"))
    max_queued = _positive(cfg, "max_queued", allow_zero=True)
    timeout = _positive(cfg, "request_timeout", float, allow_none=True, allow_zero=True) or None
    max_restarts = _positive(cfg, "max_restarts", allow_zero=True)
    port = cfg["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be an integer between 0 and 65535, got {port!r}")
    sock = bind_socket(str(cfg["host"]), port)       # before the model loads: a port in use fails at once
    try:
        from .llm import LLM
        mode = cfg["mode"]
        if mode == "ray":
            print("moeyard: starting Ray and the expert-parallel workers (this takes a while)...", flush=True)
        print(f"moeyard: loading {cfg['model']!r} ({mode} mode)...", flush=True)
        llm = LLM(cfg["model"], mode=mode, dtype=cfg["dtype"], max_num_seqs=cfg["max_num_seqs"],
                  max_model_len=cfg["max_model_len"], max_num_batched_tokens=cfg["max_num_batched_tokens"],
                  **cfg["options"])
    except BaseException:
        sock.close()
        raise
    name = cfg["served_model_name"] or (cfg["model"] if cfg["model"] == "default"
                                        else os.path.basename(os.path.normpath(cfg["model"])))
    async_llm = AsyncLLM(llm, max_queued=max_queued, request_timeout=timeout, max_restarts=max_restarts)
    api_key = cfg["api_key"] or os.environ.get("MOEYARD_API_KEY") or None
    app = build_app(async_llm, name, api_key=api_key, enable_docs=bool(cfg["enable_docs"]), limits=limits)
    host = cfg["host"]
    print(f"moeyard: serving {name!r} ({cfg['mode']} mode) on http://{host}:{sock.getsockname()[1]}/v1"
          + ("" if api_key else " (no API key)"), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"moeyard: warning: listening on {host} without an API key (--api-key or MOEYARD_API_KEY)",
              flush=True)
    try:
        serve(app, host, port, log_level=cfg["log_level"], graceful_timeout=float(cfg["graceful_timeout"]),
              sock=sock)
    finally:
        async_llm.shutdown()
        sock.close()
    return 0
