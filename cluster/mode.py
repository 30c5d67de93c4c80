"""Ray mode: ``LLM(model, mode="ray", num_workers=N, placement=..., ep_scheme=..., ray_address=None)``.

``speculative_shuffle=True`` (>= 2 workers), form 1 with ``ep_scheme="standard"`` (data-parallel attention):
places each sequence on the worker its tokens' experts are predicted to live on and moves running sequences (with
their KV cache) when the cost model says it pays; ``shuffle_options`` tunes it (``max_moves``, ``horizon``,
``slack``, ``history``, ``move``, ``place_new``, ``calibration_tokens``; see ``moeyard.runtime.spec_shuffle``).
Form 2 with ``ep_scheme="tp"`` (tensor-parallel attention): each token's attention output is sent only to the
worker its experts are predicted on, instead of an all-reduce (``shuffle_options``: ``slack``; see
``moeyard.runtime.ep_tp``). Outputs are unchanged either way.

The driver reads only the config and tokenizer; each worker actor loads the dense weights and its experts.
"""

from __future__ import annotations

import logging

from ..moe.errors import MoeyardError
from ..moe.tokenizer import Tokenizer
from ..runtime.ep_worker import SCHEMES, check_scheme
from . import layout

log = logging.getLogger(__name__)

CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning was the word, and numbers "
                    "like 3.14159 and 2.71828 appear in science. def main(): return sum(range(10)) # code "
                    "Once upon a time there lived a king who had three daughters. Q: What is the capital of "
                    "France? A: Paris. The weather today is sunny with a chance of rain in the afternoon.")


def build_ray(ctx, num_workers: int = 2, placement: str = "round_robin", ep_scheme: str = "standard",
              ray_address: str | None = None, num_cpus_per_worker: float = 0.25,
              resources_per_worker: dict | None = None, step_timeout: float = 60.0,
              collective_timeout: float = 20.0, placement_time_limit: float = 20.0,
              speculative_shuffle: bool = False, shuffle_options: dict | None = None):
    cfg = ctx.cfg
    if ep_scheme not in SCHEMES:
        raise MoeyardError(f"ep_scheme must be one of {', '.join(SCHEMES)}, got {ep_scheme!r}")
    if speculative_shuffle:
        from ..runtime.spec_shuffle import check_spec
        try:
            check_spec(ep_scheme, num_workers, cfg)
        except ValueError as exc:
            raise MoeyardError(str(exc)) from None
    try:
        check_scheme(ep_scheme, cfg)
    except ValueError as exc:
        raise MoeyardError(str(exc)) from None
    if ep_scheme == "tp" and cfg.num_heads < num_workers:
        raise MoeyardError(f"ep_scheme='tp' splits attention heads across workers: num_heads ({cfg.num_heads}) < "
                           f"num_workers ({num_workers})")
    if not isinstance(placement, str):
        raise MoeyardError(f"placement must be a string (a built-in name or a placement.json path), "
                           f"got {type(placement).__name__}")
    # resolve the placement before anything starts (except a calibration run for affinity without a trace)
    info = {"placement": placement}
    trace = None
    if placement in ("round_robin", "contiguous"):
        holders = layout.static_holders(placement, cfg, num_workers)
    elif placement in ("affinity", "coactivation"):
        layout.check_workers(cfg, num_workers)
        trace = layout.trace_of_model(ctx.path)
        holders = None
    else:
        holders = layout.load_placement_file(placement, cfg, num_workers)
    tokenizer = Tokenizer.from_dir(ctx.path)

    from ..runtime.threads import worker_threads
    from .executor import RayEPExecutor
    from .group import WorkerGroup, ensure_ray
    started = ensure_ray(ray_address, num_workers)

    worker_shuffle = bool(speculative_shuffle) and ep_scheme == "tp"     # form 2 runs inside the workers
    if worker_shuffle:
        bad = set(shuffle_options or {}) - {"slack"}
        if bad:
            raise MoeyardError(f"shuffle_options: ep_scheme='tp' takes only 'slack', got {sorted(bad)}")

    def start(h, scheme):
        extra = dict(shuffle=True, shuffle_options=shuffle_options) if worker_shuffle and scheme == "tp" else {}
        kws = [dict(path=ctx.path, rank=g, world=num_workers, holders=h, scheme=scheme,
                    dtype=ctx.dtype, device=str(ctx.device), max_num_seqs=ctx.max_num_seqs,
                    max_model_len=ctx.max_model_len, quantization=getattr(ctx, "quantization", None),
                    threads=worker_threads(getattr(ctx, "threads", 1), num_workers), **extra)
               for g in range(num_workers)]
        return WorkerGroup(kws, num_cpus_per_worker, resources_per_worker, collective_timeout=collective_timeout)

    try:
        if placement in ("affinity", "coactivation"):
            if trace is None:
                trace = _calibrate(ctx, tokenizer, num_workers, start)
                info["trace"] = f"calibration run ({trace.num_tokens} tokens)"
            else:
                info["trace"] = f"{ctx.path}/trace.npz ({trace.num_tokens} tokens)"
            if placement == "affinity":
                holders, res = layout.affinity_holders(trace, cfg, num_workers, placement_time_limit)
                info["objective"] = getattr(res, "objective", None)
            else:
                holders, res = layout.coactivation_holders(trace, cfg, num_workers, placement_time_limit)
                info["coactivation_together"] = res.together
                info["coactivation_together_round_robin"] = res.together_round_robin
        group = start(holders, ep_scheme)
    except BaseException:
        if started:
            import ray
            ray.shutdown()
        raise
    info["holders"] = holders
    ex = RayEPExecutor(group, ep_scheme, step_timeout, started, info)
    if speculative_shuffle and not worker_shuffle:
        try:
            _start_spec(ex, ctx, holders, num_workers, tokenizer, shuffle_options)
        except BaseException:
            ex.close()
            raise
    return ex, tokenizer


def _start_spec(ex, ctx, holders, num_workers, tokenizer, shuffle_options):
    """Speculative shuffling: the driver-side placer, its token-identity table seeded from the model's
    ``trace.npz`` (or rebuilt by a calibration prefill on the workers, with a warning)."""
    import os

    from ..moe.predictors import load_trace
    from ..runtime.spec_shuffle import SpecShuffler
    try:
        spec = SpecShuffler(ctx.cfg, holders, num_workers, ex_dtype(ctx), **(shuffle_options or {}))
    except TypeError as exc:
        raise MoeyardError(f"shuffle_options: {exc}") from None
    f = os.path.join(ctx.path, "trace.npz")
    trace = None
    if os.path.isfile(f):
        try:
            trace = load_trace(f)
        except (OSError, ValueError) as exc:
            log.warning("speculative shuffling: cannot read %s: %s", f, exc)
    spec.load_table(trace, ex._spec_step, tokenizer, ctx.max_num_seqs, ctx.max_model_len)
    ex.spec = spec
    ex.placement_info["token_table"] = spec.table_source


def ex_dtype(ctx):
    from ..moe.loader import resolve_dtype
    return resolve_dtype(ctx.dtype, ctx.cfg, ctx.device)


def _calibrate(ctx, tokenizer, num_workers, start):
    """A short prefill on a round-robin group, recording every MoE layer's routing."""
    import numpy as np
    cfg = ctx.cfg
    n = min(64, ctx.max_model_len)
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT)
        seqs = [ids[i:i + n] for i in range(0, len(ids), n) if len(ids[i:i + n]) > 1][:8]
    else:
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for _ in range(8)]
    seqs = seqs[:ctx.max_num_seqs] if len(seqs) > ctx.max_num_seqs else seqs
    group = start(layout.static_holders("round_robin", cfg, num_workers), "standard")
    from ..runtime.threads import worker_threads
    from .executor import RayEPExecutor
    ex = RayEPExecutor(group, "standard", 120.0)
    try:
        experts = ex.calibrate(seqs, max(1, min(4, ctx.max_num_seqs)))
    finally:
        group.close()
    return layout.make_trace(experts, cfg.num_experts)
