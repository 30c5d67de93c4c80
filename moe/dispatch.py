"""The token dispatcher seam: ``dispatch`` groups routed tokens by expert, ``combine`` brings results back.

The local dispatcher (this file) is a permutation within one process; the all-to-all dispatcher in
``moeyard.comm`` subclasses it and moves rows between workers. ``dispatch`` returns a frozen metadata record that
``combine`` consumes, so nothing is left on the object between calls.

Shapes: N tokens, K experts per token, D hidden, M = N*K routed rows on this worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compute import fused


@dataclass(frozen=True)
class DispatchMeta:
    order_M: torch.Tensor     # routed row → position in the flattened [N*K] (token, choice) list
    token_M: torch.Tensor     # routed row → token index
    weight_M: torch.Tensor    # routed row → gate weight
    num_tokens: int
    extra: object = None      # subclass state (split sizes of a collective, …)


@dataclass(frozen=True)
class Routed:
    x_MD: torch.Tensor        # rows grouped by expert
    expert_ids: list[int]     # experts in the order their row groups appear
    counts: list[int]         # rows per expert
    meta: DispatchMeta


class LocalDispatcher:
    """All experts on this process: sort the (token, choice) pairs by expert."""

    def dispatch(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                 topk_w_NK: torch.Tensor) -> Routed:
        N, K = topk_ids_NK.shape
        if N == 1 and x_ND.device.type == "cpu":    # one token (batch-1 decode): its K distinct experts, sorted
            ids, order_M = topk_ids_NK[0].sort()
            meta = DispatchMeta(order_M, order_M.new_zeros(K), topk_w_NK[0][order_M], 1)
            return Routed(x_ND.expand(K, -1).contiguous(), ids.tolist(), [1] * K, meta)
        flat = topk_ids_NK.reshape(-1)
        order_M = torch.argsort(flat, stable=True)
        token_M = order_M // K
        ids, counts = torch.unique_consecutive(flat[order_M], return_counts=True)
        meta = DispatchMeta(order_M, token_M, topk_w_NK.reshape(-1)[order_M], N)
        return Routed(x_ND[token_M], ids.tolist(), counts.tolist(), meta)

    def combine(self, y_MD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        m = fused(y_MD) if meta.num_tokens == 1 else None
        if m is not None and meta.weight_M.dtype is torch.float32:
            return m.combine_one(y_MD, meta.weight_M)          # the same sum, in the same order, in one call
        y_MD = y_MD * meta.weight_M.unsqueeze(-1).to(y_MD.dtype)
        out = y_MD.new_zeros((meta.num_tokens, y_MD.shape[-1]))
        return out.index_add(0, meta.token_M, y_MD)
