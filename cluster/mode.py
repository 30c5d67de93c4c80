"""Ray mode: ``LLM(model, mode="ray", num_workers=N, placement=..., ep_scheme=..., ray_address=None)``.

``speculative_shuffle=True`` (>= 2 workers), form 1 with ``ep_scheme="standard"`` (data-parallel attention):
places each sequence on the worker its tokens' experts are predicted to live on and moves running sequences (with
their KV cache) when the cost model says it pays; ``shuffle_options`` tunes it (``max_moves``, ``horizon``,
``slack``, ``history``, ``move``, ``place_new``, ``calibration_tokens``; see ``planner.py``). Form 2 with
``ep_scheme="tp"`` (tensor-parallel attention): each token's attention output is sent only to the worker its
experts are predicted on, instead of an all-reduce (``shuffle_options``: ``slack``; see ``moeyard.comm.tp``).
Outputs are unchanged either way.

``rebalance="periodic"`` (``ep_scheme`` standard or coherent, without speculative shuffling): every
``rebalance_window`` routed tokens the placement is re-solved warm on the live routing in a background thread and,
when the saving pays for the moves (at least ``rebalance_min_gain`` of the bytes per token, copies within
``rebalance_byte_budget`` bytes), experts move between workers between engine steps; ``rebalance_options``: the
rest (``horizon``, ``layers_per_step``, ``time_limit``, ``decay``, ``balance``, ``nodes``, ``inter_node_cost``;
see ``rebalance.py``). Outputs are unchanged.

The driver reads only the config and tokenizer; each worker actor loads the dense weights and its experts. The
placement is resolved (and checked against the model and the workers) before any actor starts, except for a
calibration run when ``affinity`` / ``coactivation`` has no ``trace.npz`` to solve on.
"""

from __future__ import annotations

from ..moe.errors import MoeyardError
from ..moe.tokenizer import Tokenizer
from . import layout
from .calibrate import calibration_sequences, record_routing
from .planner import check_config
from .rebalance import check_rebalance, start_rebalance


def build_ray(ctx, num_workers: int = 2, placement: str = "round_robin", ep_scheme: str = "standard",
              ray_address: str | None = None, num_cpus_per_worker: float = 0.25,
              resources_per_worker: dict | None = None, step_timeout: float = 60.0,
              collective_timeout: float = 20.0, placement_time_limit: float = 20.0,
              speculative_shuffle: bool = False, shuffle_options: dict | None = None, rebalance: str = "off",
              rebalance_window: int = 1024, rebalance_min_gain: float = 0.0,
              rebalance_byte_budget: float = 64 * 2**20, rebalance_options: dict | None = None):
    cfg = ctx.cfg
    scheme = check_config(ep_scheme, cfg, num_workers, speculative_shuffle, shuffle_options)
    rb_opts = check_rebalance(rebalance, ep_scheme, speculative_shuffle, num_workers, rebalance_window,
                              rebalance_min_gain, rebalance_byte_budget, rebalance_options)
    worker_shuffle = bool(speculative_shuffle) and scheme.spec_form == 2     # form 2 runs inside the workers
    if not isinstance(placement, str):
        raise MoeyardError(f"placement must be a string (a built-in name or a placement.json path), "
                           f"got {type(placement).__name__}")
    info = {"placement": placement}
    trace, pl = None, None
    if placement in ("round_robin", "contiguous"):
        pl = layout.static_placement(placement, cfg, num_workers)
    elif placement in ("affinity", "coactivation"):
        layout.check_workers(cfg, num_workers)
    else:
        pl = layout.load_placement_file(placement, cfg, num_workers)
    if pl is None or (speculative_shuffle and not worker_shuffle) or rb_opts is not None:
        trace = layout.trace_of_model(ctx.path)        # the one trace loader (placement.load_trace), validated
    model_trace = trace
    tokenizer = Tokenizer.from_dir(ctx.path)

    from ..runtime.threads import worker_threads
    from .executor import EPExecutor, RayTransport
    from .group import WorkerGroup, ensure_ray
    started = ensure_ray(ray_address, num_workers)

    def shutdown():
        if started:
            import ray
            ray.shutdown()

    def start(p, scheme_name):
        extra = dict(shuffle=True, shuffle_options=shuffle_options) if worker_shuffle and scheme_name == ep_scheme \
            else {}
        kws = [dict(path=ctx.path, rank=g, world=num_workers, placement=p, scheme=scheme_name, dtype=ctx.dtype,
                    device=str(ctx.device), max_num_seqs=ctx.max_num_seqs, max_model_len=ctx.max_model_len,
                    quantization=getattr(ctx, "quantization", None),
                    threads=worker_threads(getattr(ctx, "threads", 1), num_workers), **extra)
               for g in range(num_workers)]
        group = WorkerGroup(kws, num_cpus_per_worker, resources_per_worker, collective_timeout=collective_timeout)
        return EPExecutor(RayTransport(group, step_timeout), scheme_name, num_workers)

    try:
        if pl is None:
            if trace is None:
                trace = _calibrate(ctx, tokenizer, num_workers, start)
                info["trace"] = f"calibration run ({trace.num_tokens} tokens)"
            else:
                info["trace"] = f"{ctx.path}/trace.npz ({trace.num_tokens} tokens)"
            if placement == "affinity":
                pl, res = layout.affinity_placement(trace, cfg, num_workers, placement_time_limit)
                info["objective"] = getattr(res, "objective", None)
            else:
                pl, res = layout.coactivation_placement(trace, cfg, num_workers, placement_time_limit)
                info["coactivation_together"] = res.together
                info["coactivation_together_round_robin"] = res.together_round_robin
        ex = start(pl, ep_scheme)
    except BaseException:
        shutdown()
        raise
    info["placement_record"] = pl
    info["holders"] = [[list(pl.workers_of(i, e)) for e in range(pl.num_experts)] for i in range(pl.num_layers)]
    ex.placement_info, ex._on_close = info, shutdown
    if speculative_shuffle and not worker_shuffle:
        try:
            _start_spec(ex, ctx, pl, model_trace, tokenizer, shuffle_options)
        except BaseException:
            ex.close()
            raise
    if rb_opts is not None:
        try:
            start_rebalance(ex, ctx, pl, model_trace, rb_opts)
        except BaseException:
            ex.close()
            raise
    return ex, tokenizer


def _start_spec(ex, ctx, placement, trace, tokenizer, shuffle_options):
    from ..moe.loader import resolve_dtype
    table = None if trace is None else {"experts": trace.experts_TLk, "token_ids": trace.token_ids_T}
    ex.enable_spec(ctx.cfg, placement, resolve_dtype(ctx.dtype, ctx.cfg, ctx.device), table, tokenizer,
                   ctx.max_num_seqs, ctx.max_model_len, shuffle_options)


def _calibrate(ctx, tokenizer, num_workers, start, tokens: int = 512):
    """Routing of a short calibration prefill on a round-robin group (standard scheme)."""
    cfg = ctx.cfg
    ex = start(layout.static_placement("round_robin", cfg, num_workers), "standard")
    try:
        seqs = calibration_sequences(tokenizer, cfg.vocab_size, tokens, ctx.max_model_len)
        _, experts = record_routing(ex.step_plans, num_workers, seqs, max(1, min(4, ctx.max_num_seqs)),
                                    len(cfg.moe_layers), cfg.top_k)
    finally:
        ex.transport.close()
    return layout.make_trace(experts.numpy(), cfg.num_experts)
