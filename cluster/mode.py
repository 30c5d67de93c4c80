"""Ray mode: ``LLM(model, mode="ray", num_workers=N, placement=..., ep_scheme=..., ray_address=None)``, with
speculative shuffling (``speculative_shuffle``, ``shuffle_options``: ``planner.py`` for form 1, ``comm/tp.py`` for
form 2) and online rebalancing (``rebalance="periodic"``, ``rebalance_*``: ``rebalance.py``); docs/CLUSTER.md.

The driver reads only the config and tokenizer; each worker actor loads the dense weights and its experts. The
placement is resolved and checked before any actor starts, except for a calibration run when ``affinity`` /
``coactivation`` has no ``trace.npz`` to solve on. Outputs are those of local mode whatever the options.
"""

from __future__ import annotations

from ..moe.tokenizer import Tokenizer
from . import layout
from .calibrate import calibrate
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
    pl = layout.resolve(placement, cfg, num_workers)                # None: solved on a trace below
    form1 = speculative_shuffle and scheme.spec_form == 1
    trace = layout.trace_of_model(ctx.path) if pl is None or form1 or rb_opts is not None else None
    tokenizer = Tokenizer.from_dir(ctx.path)

    from ..runtime.threads import worker_threads
    from .executor import RayTransport, start_executor
    from .group import WorkerGroup, ensure_ray
    started = ensure_ray(ray_address, num_workers)

    def shutdown():
        if started:
            import ray
            ray.shutdown()

    def transport(kws):
        return RayTransport(WorkerGroup(kws, num_cpus_per_worker, resources_per_worker,
                                        collective_timeout=collective_timeout), step_timeout)

    def start(p, scheme_name, shuffle=False, table=None):
        return start_executor(transport, cfg, num_workers, p, scheme_name, shuffle, shuffle_options, table, tokenizer,
                              path=ctx.path, dtype=ctx.dtype, device=str(ctx.device), max_num_seqs=ctx.max_num_seqs,
                              max_model_len=ctx.max_model_len, quantization=getattr(ctx, "quantization", None),
                              threads=worker_threads(getattr(ctx, "threads", 1), num_workers))

    info, ex = {"placement": placement}, None
    try:
        if pl is None:
            solve_on, src = trace, f"{ctx.path}/trace.npz"
            if solve_on is None:
                solve_on, src = _calibrate(ctx, tokenizer, num_workers, start), "calibration run"
            info["trace"] = f"{src} ({solve_on.num_tokens} tokens)"
            pl, solved = layout.solved_placement(placement, solve_on, cfg, num_workers, placement_time_limit)
            info.update(solved)
        table = None if trace is None else {"experts": trace.experts_TLk, "token_ids": trace.token_ids_T}
        ex = start(pl, ep_scheme, speculative_shuffle, table)
        info["placement_record"] = pl
        info["holders"] = [[list(pl.workers_of(i, e)) for e in range(pl.num_experts)] for i in range(pl.num_layers)]
        ex.placement_info.update(info)
        ex._on_close = shutdown
        if rb_opts is not None:
            start_rebalance(ex, ctx, pl, trace, rb_opts)
    except BaseException:
        if ex is None:
            shutdown()
        else:
            ex.close()
        raise
    return ex, tokenizer


def _calibrate(ctx, tokenizer, num_workers, start, tokens: int = 512):
    """Routing of a short calibration prefill on a round-robin group (standard scheme)."""
    cfg = ctx.cfg
    ex = start(layout.static_placement("round_robin", cfg, num_workers), "standard")
    try:
        _, experts = calibrate(ex.step_plans, num_workers, cfg, tokenizer, tokens, ctx.max_model_len,
                               min(4, ctx.max_num_seqs))
    finally:
        ex.transport.close()
    return layout.make_trace(experts.numpy(), cfg.num_experts)
