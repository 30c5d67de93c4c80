"""The standard expert-parallel dispatcher: a token's rows visit the workers holding its experts and come back.

``holders`` is the frozen ``Placement``: ``workers_of(i, e)`` for the i-th MoE layer. Shapes: N tokens here, K
top-k, M = N*K routed (token, choice) rows, D hidden, E experts, G workers.
"""

from __future__ import annotations

import torch

from ..moe.dispatch import DispatchMeta, LocalDispatcher, Routed


def dest_table(placement, rank: int) -> list[torch.Tensor]:
    """Per MoE layer, [E] rank serving each expert for tokens on ``rank``: itself if it holds a copy, else the
    first holder."""
    return [torch.tensor([rank if rank in placement.workers_of(i, e) else placement.workers_of(i, e)[0]
                          for e in range(placement.num_experts)], dtype=torch.long)
            for i in range(placement.num_layers)]


def hold_table(placement) -> list[torch.Tensor]:
    """Per MoE layer, [E, G] bool: worker g holds expert e."""
    return [torch.from_numpy(m) for m in placement.membership_LEG()]


class A2ADispatcher(LocalDispatcher):
    """Rows go to the worker holding their expert and come back for ``combine``. ``layer_index`` maps a model
    layer to its placement row (MoE layers only, in order)."""

    def __init__(self, ex, placement, layer_index: dict[int, int]):
        self.ex = ex
        self.dest = dest_table(placement, ex.rank)
        self.layer_index = layer_index

    def dispatch(self, layer: int, x_ND, topk_ids_NK, topk_w_NK) -> Routed:
        local = super().dispatch(layer, x_ND, topk_ids_NK, topk_w_NK)
        dev = x_ND.device
        e_M = torch.repeat_interleave(torch.tensor(local.expert_ids, dtype=torch.long),
                                      torch.tensor(local.counts, dtype=torch.long))
        dest_M = self.dest[self.layer_index[layer]][e_M]
        self.ex.count_pairs(int((dest_M == self.ex.rank).sum()), int(dest_M.numel()))
        (x_R, e_R), plan = self.ex.exchange(dest_M, [local.x_MD, e_M.to(dev)], ["moe", "moe"])
        perm = torch.argsort(e_R, stable=True)
        ids, counts = torch.unique_consecutive(e_R[perm], return_counts=True)
        meta = DispatchMeta(local.meta.order_M, local.meta.token_M, local.meta.weight_M, local.meta.num_tokens,
                            extra=(plan, perm, local.meta))
        return Routed(x_R[perm], ids.tolist(), counts.tolist(), meta)

    def combine(self, y_MD, meta: DispatchMeta):
        plan, perm, local_meta = meta.extra
        y_R = torch.empty_like(y_MD)
        y_R[perm] = y_MD
        (y_M,) = self.ex.reverse(plan, [y_R], ["moe"])
        return super().combine(y_M, local_meta)
