"""Registry of execution modes. Each mode builds an executor for the engine from a ``ModeContext``.

A mode lives in the package that owns it (offload in ``moeyard.offload``, Ray in ``moeyard.cluster``) and is
imported only when asked for, so local mode never imports Ray.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch

from ..moe.config import MoEConfig
from ..moe.errors import MoeyardError
from .kv_cache import KVCache

MODES = {
    "local": "moeyard.runtime.modes:build_local",
    "offload": "moeyard.offload.mode:build_offload",
    "ray": "moeyard.cluster.mode:build_ray",
}


@dataclass(frozen=True)
class ModeContext:
    path: str
    cfg: MoEConfig
    dtype: object
    device: torch.device
    max_num_seqs: int
    max_model_len: int
    quantization: str | None = None    # None | "int8" | "int4" (moe/compute.py)
    threads: int = 1                   # compute threads of this process (runtime/threads.py)


def get_builder(mode: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    mod, fn = MODES[mode].split(":")
    return getattr(importlib.import_module(mod), fn)


def check_options(builder, mode: str, options: dict):
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p != "ctx"]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise MoeyardError(f"option(s) {', '.join(bad)} not valid for mode {mode!r}; valid: "
                           f"{', '.join(allowed) or 'none'}")


def build_local(ctx: ModeContext):
    from ..moe.loader import load_model
    from .executor import LocalExecutor
    lm = load_model(ctx.path, dtype=ctx.dtype, device=ctx.device, max_positions=ctx.max_model_len,
                    quantization=ctx.quantization)
    kv = new_kv_cache(lm.cfg, ctx.max_num_seqs, ctx.max_model_len, lm.dtype, lm.device)
    return LocalExecutor(lm.model, kv, lm.device), lm.tokenizer


def new_kv_cache(cfg: MoEConfig, slots: int, max_len: int, dtype, device) -> KVCache:
    """The KV cache for ``cfg``: per-token shape from ``cfg.kv_shape`` (MLA caches the compressed latent); a hybrid
    model's also holds its linear-attention layers' recurrent states."""
    if any(cfg.is_linear_layer(l) for l in range(cfg.num_layers)):
        from .hybrid_cache import HybridCache
        return HybridCache(cfg, slots, max_len, dtype, device)
    hk, dk, hv, dv = cfg.kv_shape
    if (hk, dk, hv, dv) == (cfg.num_kv_heads, cfg.head_dim, cfg.num_kv_heads, cfg.head_dim):
        return KVCache(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, max_len, dtype, device)
    return KVCache(cfg.num_layers, slots, hk, dk, max_len, dtype, device, v_heads=hv, v_dim=dv)
