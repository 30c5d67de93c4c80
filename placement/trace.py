"""Routing traces: loading, validation and token splits.

Glossary
  T  tokens recorded in the trace
  L  MoE layers
  k  experts chosen per token per layer (top-k)
  E  experts per layer

Arrays carry their shape as a suffix: ``experts_TLk`` is ``[T, L, k]``.

File format (``trace.npz``): ``experts[T, L, k]`` int16 (required), ``num_experts`` scalar (required),
``weights[T, L, k]`` float16 (optional gate weights), ``token_ids[T]`` (optional), ``top_k`` (optional).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import PlacementError


@dataclass(frozen=True, eq=False)
class Trace:
    """Validated routing trace.

    experts_TLk: [T, L, k] integer expert ids in [0, num_experts).
    weights_TLk: [T, L, k] gate weights, or None.
    """

    experts_TLk: np.ndarray
    num_experts: int
    weights_TLk: np.ndarray | None = None
    token_ids_T: np.ndarray | None = None

    def __post_init__(self):
        validate_trace(self.experts_TLk, self.num_experts, self.weights_TLk)

    @property
    def num_tokens(self) -> int:
        return int(self.experts_TLk.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts_TLk.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts_TLk.shape[2])

    def take(self, index_T: np.ndarray) -> "Trace":
        """Sub-trace of the tokens selected by ``index_T`` (bool mask or integer indices)."""
        w = None if self.weights_TLk is None else self.weights_TLk[index_T]
        ids = None if self.token_ids_T is None else self.token_ids_T[index_T]
        return Trace(self.experts_TLk[index_T], self.num_experts, w, ids)


def validate_trace(experts_TLk, num_experts, weights_TLk=None, *, where: str = "trace") -> None:
    """Raise PlacementError naming the offending field if the arrays do not form a valid trace."""
    if not isinstance(experts_TLk, np.ndarray) or experts_TLk.ndim != 3:
        shape = getattr(experts_TLk, "shape", None)
        raise PlacementError(
            f"{where}: 'experts' must have shape [T, L, k] (3 dims), got shape {shape}")
    if not np.issubdtype(experts_TLk.dtype, np.integer):
        raise PlacementError(
            f"{where}: 'experts' must be an integer array (int16), got dtype {experts_TLk.dtype}")
    T, L, k = experts_TLk.shape
    if T == 0 or L == 0 or k == 0:
        raise PlacementError(f"{where}: 'experts' is empty (shape {experts_TLk.shape}); need T, L, k >= 1")
    if int(num_experts) < 1:
        raise PlacementError(f"{where}: 'num_experts' must be >= 1, got {num_experts}")
    lo, hi = int(experts_TLk.min()), int(experts_TLk.max())
    if lo < 0 or hi >= int(num_experts):
        bad = np.argwhere((experts_TLk < 0) | (experts_TLk >= num_experts))[0]
        raise PlacementError(
            f"{where}: expert ids must lie in [0, {int(num_experts)}) (num_experts={int(num_experts)}), "
            f"found {int(experts_TLk[tuple(bad)])} at token {bad[0]}, layer {bad[1]}, slot {bad[2]}")
    if weights_TLk is not None:
        if weights_TLk.shape != experts_TLk.shape:
            raise PlacementError(
                f"{where}: 'weights' shape {weights_TLk.shape} must equal 'experts' shape {experts_TLk.shape}")
        if not np.issubdtype(weights_TLk.dtype, np.floating):
            raise PlacementError(f"{where}: 'weights' must be floating point, got dtype {weights_TLk.dtype}")


def load_trace(path: str | os.PathLike) -> Trace:
    """Load and validate ``trace.npz``; raises PlacementError saying which field is wrong and why."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PlacementError(f"trace file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt zip, not an npz, ...
        raise PlacementError(f"cannot read trace {path}: {exc}") from exc
    with data:
        if "experts" not in data.files and "expert_counts" in data.files:
            raise PlacementError(f"{path}: holds expert loads only ('expert_counts', e.g. imported from a "
                                 f"count-only engine dump), not a token trace")
        for key in ("experts", "num_experts"):
            if key not in data.files:
                raise PlacementError(
                    f"{path}: missing required array '{key}' (found {sorted(data.files)})")
        experts = data["experts"]
        num_experts = data["num_experts"]
        if num_experts.size != 1:
            raise PlacementError(f"{path}: 'num_experts' must be a scalar, got shape {num_experts.shape}")
        weights = data["weights"] if "weights" in data.files else None
        token_ids = data["token_ids"] if "token_ids" in data.files else None
        validate_trace(experts, int(num_experts), weights, where=path)
        if "top_k" in data.files and int(data["top_k"]) != experts.shape[2]:
            raise PlacementError(
                f"{path}: 'top_k'={int(data['top_k'])} disagrees with experts.shape[2]={experts.shape[2]}")
    return Trace(experts.astype(np.int64), int(num_experts),
                 None if weights is None else weights.astype(np.float64), token_ids)


def save_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Write ``trace`` in the ``trace.npz`` format."""
    arrays = {"experts": trace.experts_TLk.astype(np.int16), "num_experts": np.int64(trace.num_experts),
              "top_k": np.int64(trace.top_k)}
    if trace.weights_TLk is not None:
        arrays["weights"] = trace.weights_TLk.astype(np.float16)
    if trace.token_ids_T is not None:
        arrays["token_ids"] = trace.token_ids_T
    np.savez(path, **arrays)


def split_tokens(trace: Trace, fraction: float = 0.5) -> tuple[Trace, Trace]:
    """Split by token order: first ``fraction`` of the tokens to fit, the rest to evaluate."""
    if not 0.0 < fraction < 1.0:
        raise PlacementError(f"split fraction must be in (0, 1), got {fraction}")
    cut = int(round(trace.num_tokens * fraction))
    if cut == 0 or cut == trace.num_tokens:
        raise PlacementError(f"trace has {trace.num_tokens} tokens: too few to split at {fraction}")
    idx = np.arange(trace.num_tokens)
    return trace.take(idx[:cut]), trace.take(idx[cut:])
