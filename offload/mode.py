"""``mode="offload"``: dense weights resident, experts on disk with a budgeted slot cache in the fast tier.

    LLM(model, mode="offload", expert_cache_fraction=0.25, prefetch=True, predictor="router")

Options (the keyword parameters of ``build_offload``):
- ``expert_cache_fraction`` (of all routed experts) or ``expert_cache_bytes`` (wins when given): the slot budget;
- ``prefetch``: predict and prefetch (False: on-demand loading only);
- ``predictor``: "router" | "transition" | "token" | "combined" (``moe.predictors``); "transition"/"token" start
  from the checkpoint's ``trace.npz`` when present (``trace`` option overrides the path) and learn online;
- ``eviction``: "predicted" | "lru" | "lfu";
- ``lookahead``: MoE layers whose prediction is refined at each layer (router/transition reach); every layer of the
  step is predicted at its start when the predictor knows the token ids ("token", "combined");
- ``prefetch_distance``: prefetch what is needed within this many MoE layers (default 1: the next layer, whose
  prediction has just been refined; 0: every layer still to run this step, from the step-start prediction);
- ``width``: experts predicted per layer for one token (default: top_k + 1 within the budget's share per layer);
- ``sticky``: score bonus of experts already in the cache when choosing a layer's predicted set (fewer reads);
- ``io_mode``: "auto" (default: on CPU a reader *process* fills slots in shared memory, no GIL hand-offs with the
  compute thread; reader threads where that is not possible: GPU, fused/odd layouts, other platforms),
  "process" or "thread"; ``io_threads``: reader threads in "thread" mode; ``read_timeout``: seconds a step may
  wait with no word from the reader process before it is taken as hung (killed, its loads fail, a new one starts);
- ``gate``: read only the predicted experts worth a read (``offload/gate.py``): ``min_p`` (default 0.5) is the
  measured precision a rank of a prediction needs, ``budget_layers`` (default 8: a cap on runaway queues; 0: no budget) caps the reads in
  flight to what the disk delivers in that many layers of compute; ``gate=False`` reads every guess;
- ``host_cache_fraction`` (of all routed experts) / ``host_cache_bytes``: the host tier between disk and GPU slots
  (``offload/host.py``: pinned buffers, a hit is one copy instead of a disk read). Default on a GPU: every expert if
  that fits in half the available RAM, else that half; on a CPU none (the slots are host memory already; a value
  above 0 puts the tier under the slots anyway, as the GPU path does);
- ``max_decode_batch``: sequences per decode step (default: as many as the budget's working set allows,
  ``slots // top_k``, at most ``max_num_seqs``); ``token_scheduling``: group sequences with overlapping experts.
"""

from __future__ import annotations

import os

import torch

from ..moe.checkpoint import CheckpointReader
from ..moe.errors import ModelError
from ..moe.compute import QUANTIZATIONS
from ..moe.loader import build_dense, compute_plan, resolve_dtype
from ..moe.predictors import PREDICTORS, build_predictor, load_trace
from ..moe.tokenizer import Tokenizer
from ..moe.weights import check_fused_shapes
from ..runtime.modes import ModeContext, new_kv_cache
from .cache import EVICTION, ExpertCache
from .executor import OffloadExecutor
from .gate import PrefetchGate
from .host import HostTier
from .tiers import DiskTier


class OffloadConfigError(ModelError, ValueError):
    """Bad offload options (budget too small, unknown predictor/policy)."""


def plan_slots(cfg, slot_bytes: int, expert_cache_fraction: float, expert_cache_bytes: int | None,
               max_num_seqs: int, max_decode_batch: int | None) -> tuple[int, int]:
    """(slots, max_decode_batch); raises OffloadConfigError when the budget is below one layer's working set."""
    total = len(cfg.moe_layers) * cfg.num_experts
    if expert_cache_bytes is not None:
        if expert_cache_bytes < 0:
            raise OffloadConfigError("expert_cache_bytes must be >= 0")
        slots = int(expert_cache_bytes // slot_bytes)
        what = f"expert_cache_bytes={expert_cache_bytes}"
    else:
        if not 0 < expert_cache_fraction <= 1:
            raise OffloadConfigError(f"expert_cache_fraction must be in (0, 1], got {expert_cache_fraction}")
        slots = int(expert_cache_fraction * total)
        what = f"expert_cache_fraction={expert_cache_fraction}"
    slots = min(slots, total)
    K, E = cfg.top_k, cfg.num_experts
    mdb = max_decode_batch if max_decode_batch is not None else max(1, min(max_num_seqs, slots // K))
    need = min(E, K * mdb)
    if slots < need:
        raise OffloadConfigError(
            f"expert cache too small: {what} gives {slots} expert slots ({slots * slot_bytes / 2**20:.1f} MiB) but "
            f"one MoE layer's working set for a decode batch of {mdb} is min(num_experts={E}, top_k={K} x {mdb}) = "
            f"{need} experts; the minimum is {need} slots = {need * slot_bytes} bytes "
            f"(fraction >= {need / total:.4f}); raise the budget or lower max_decode_batch")
    return slots, mdb


def host_tier(cfg, tier: DiskTier, device, fraction: float | None, nbytes: int | None) -> HostTier | None:
    """The host tier for these options (see the module docstring), or None."""
    total = len(cfg.moe_layers) * cfg.num_experts
    per = sum(x.nbytes for x in next(iter(tier.ranges.values())))      # bytes of one expert as stored
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise OffloadConfigError(f"host_cache_bytes must be a whole number of bytes >= 0, got {nbytes!r}")
        n = nbytes // per
    elif fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise OffloadConfigError(f"host_cache_fraction must be in [0, 1], got {fraction!r}")
        n = int(fraction * total)
    elif device.type == "cuda":
        import psutil
        n = min(total, int(psutil.virtual_memory().available * 0.5 // per))
    else:
        return None
    return HostTier(tier, min(n, total), pin=device.type == "cuda") if n > 0 else None


def slot_kind(plan, tier: DiskTier, device, host) -> str | None:
    """How expert slots store weights: the compute plan's packed storage (bf16 bytes as on disk, or a quantized
    checkpoint's int8/int4 bytes), multiplied by its kernels; None: float32 (or the model dtype) matrices, as torch
    multiplies them (GPU, a host tier, no packing plan, experts not stored as the plan keeps them)."""
    if not plan.packs or device.type != "cpu" or host is not None or tier.raw is None:
        if plan.experts in QUANTIZATIONS:
            raise OffloadConfigError(f"{plan.experts} expert slots need a CPU, no host tier and each expert stored "
                                     f"as one contiguous byte range (as `moeyard quantize` writes them)")
        return None
    kinds = {x.dtype for x in tier.extents[next(iter(tier.extents))]}
    if plan.experts == "bf16" and kinds != {torch.bfloat16}:
        return None
    return plan.experts


def _own_dense_weights(model):
    """Copy dense weights out of the checkpoint's memory map: they must stay valid (and be really resident) even if
    the file changes underneath; a truncated mmap would otherwise kill the process with SIGBUS."""
    for p in model.parameters():          # shared (tied) parameters are visited once
        p.data = p.data.clone()


def build_offload(ctx: ModeContext, expert_cache_fraction: float = 0.25, expert_cache_bytes: int | None = None,
                  prefetch: bool = True, predictor: str = "router", eviction: str = "predicted",
                  lookahead: int = 1, io_threads: int = 2, max_decode_batch: int | None = None,
                  token_scheduling: bool = True, trace: str | None = None, drop_page_cache: bool = True,
                  prefetch_distance: int = 1, width: int | None = None, sticky: float = 0.05,
                  io_mode: str = "auto", read_timeout: float = 60.0, gate: bool = True, min_p: float = 0.5,
                  budget_layers: float = 8.0, host_cache_fraction: float | None = None,
                  host_cache_bytes: int | None = None):
    if predictor is not None and predictor not in PREDICTORS:
        raise OffloadConfigError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    if eviction not in EVICTION:
        raise OffloadConfigError(f"unknown eviction policy {eviction!r}; valid: {', '.join(EVICTION)}")
    if io_mode not in ("auto", "process", "thread"):
        raise OffloadConfigError(f"unknown io_mode {io_mode!r}; valid: auto, process, thread")
    if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or not read_timeout > 0:
        raise OffloadConfigError(f"read_timeout must be a positive number of seconds, got {read_timeout!r}")
    if lookahead < 1:
        raise OffloadConfigError(f"lookahead must be >= 1, got {lookahead}")
    for name, v, lo, hi in (("min_p", min_p, 0.0, 1.0), ("budget_layers", budget_layers, 0.0, 1e6)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise OffloadConfigError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    cfg, device = ctx.cfg, ctx.device        # device chosen by the runtime (GPU when present)
    dtype = resolve_dtype(ctx.dtype, cfg, device)
    plan = compute_plan(cfg, dtype, device, ctx.quantization)
    if plan.experts in QUANTIZATIONS and cfg.quant.method != "moeyard":
        raise OffloadConfigError(
            f"offload mode reads {plan.experts} experts from a checkpoint written by `moeyard quantize SRC DST "
            f"--quantization {plan.experts}` (a quarter to half the bytes per read); {ctx.path} stores them "
            f"unquantized: quantize it first, or drop quantization={plan.experts!r}")
    reader = CheckpointReader(ctx.path)
    for l in cfg.moe_layers:
        check_fused_shapes(cfg, reader, l)
    tier = DiskTier(cfg, reader, drop_cache=drop_page_cache)
    host = host_tier(cfg, tier, device, host_cache_fraction, host_cache_bytes)
    pack = slot_kind(plan, tier, device, host)
    slot_bytes = tier.raw.nbytes if pack else cfg.expert_bytes(dtype.itemsize if hasattr(dtype, "itemsize") else 4)
    slots, mdb = plan_slots(cfg, slot_bytes, expert_cache_fraction, expert_cache_bytes, ctx.max_num_seqs,
                            max_decode_batch)
    model = build_dense(cfg, reader, dtype, device, ctx.max_model_len, plan=plan)
    model.plan = plan
    _own_dense_weights(model)
    try:
        cache = ExpertCache(cfg, tier, slots, dtype, device, eviction=eviction, io_threads=io_threads,
                            io_mode=io_mode, read_timeout=read_timeout, host=host, pack=pack)
    except ValueError as e:
        raise OffloadConfigError(str(e)) from None
    pred = None
    if predictor is not None and (prefetch or token_scheduling):
        tpath = trace or os.path.join(ctx.path, "trace.npz")
        tr = load_trace(tpath) if os.path.isfile(tpath) else None
        pred = build_predictor(predictor, cfg, model=model, trace=tr, max_ahead=max(4, lookahead))
    kv = new_kv_cache(cfg, ctx.max_num_seqs, ctx.max_model_len, dtype, device)
    pg = PrefetchGate(min_p, budget_layers=budget_layers) if gate else None
    ex = OffloadExecutor(model, kv, device, cache, pred, prefetch=prefetch, lookahead=lookahead,
                         max_decode_batch=mdb, token_scheduling=token_scheduling, width=width,
                         prefetch_distance=prefetch_distance or None, sticky=sticky, gate=pg)
    return ex, Tokenizer.from_dir(ctx.path)
