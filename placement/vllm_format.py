"""vLLM's per-request routed experts, as a trace.

vLLM started with ``enable_return_routed_experts=True`` (``--enable-return-routed-experts``) returns, on every
``CompletionOutput``, ``routed_experts``: an int32 array [tokens, num_hidden_layers, top_k] of logical expert
ids (captured by the router before any EPLB mapping), one row per token the request ran through the model
(prompt + generated - 1: the last sampled token never ran). Dense layers' columns are left at 0, so the
model's layout says which columns are MoE layers. vLLM writes no file of its own; save the arrays with

    np.savez("routes.npz", *[o.outputs[0].routed_experts for o in outputs])

(one array per request, any key names), or one request with ``np.save``; ``import_vllm_routed`` reads both.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import PlacementError
from .layout import ModelLayout
from .trace import Trace


def import_vllm_routed(paths, layout: ModelLayout) -> Trace:
    """Trace [T, L, k] of all requests in ``paths`` (``.npz`` of per-request arrays, or ``.npy``), in order."""
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise PlacementError("no vLLM routed-experts files given")
    parts = []
    for path in paths:
        for name, arr in _arrays(path):
            parts.append(_check(arr, f"{path}: '{name}'", layout))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise PlacementError(f"{', '.join(paths)}: no routed tokens")
    return Trace(np.concatenate(parts), layout.num_experts)


def _arrays(path):
    if not os.path.exists(path):
        raise PlacementError(f"vLLM routed-experts file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise PlacementError(f"{path}: not a .npy/.npz file ({exc})") from None
    if isinstance(data, np.ndarray):
        return [("array", data)]
    with data:
        return [(k, data[k]) for k in data.files]


def _check(arr, where, layout):
    """experts [T, L, k] of the MoE columns of one request's [T, num_hidden_layers, k] array."""
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise PlacementError(f"{where}: routed experts must be an integer array [tokens, layers, top_k], "
                             f"got {arr.dtype} of shape {arr.shape}")
    if arr.shape[1] != layout.num_layers or arr.shape[2] != layout.top_k:
        raise PlacementError(f"{where}: {arr.shape[1]} layers x top-{arr.shape[2]}, but {layout.describe()}")
    moe_TLk = arr[:, list(layout.moe_layers)].astype(np.int64)
    if moe_TLk.size and (moe_TLk.min() < 0 or moe_TLk.max() >= layout.num_experts):
        bad = int(moe_TLk.max()) if moe_TLk.max() >= layout.num_experts else int(moe_TLk.min())
        raise PlacementError(f"{where}: expert id {bad} outside [0, {layout.num_experts}); {layout.describe()}")
    return moe_TLk
