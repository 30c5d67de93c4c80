"""Routers beyond softmax top-k, and the MoE blocks that use them (DeepSeek-V3 and GLM-4.5, gpt-oss, MiniMax-M2).

Every router returns ``(logits_NE, ids_NK, w_NK)`` like ``model.Router`` so route hooks, profilers, predictors and
the expert-parallel worker (``block.gate(h)``) work unchanged. Routed experts are reached only through the
dispatcher and ``ExpertProvider.get(layer, expert)``; shared experts are dense parameters of the block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig
from .experts import run_experts
from .layers import MLP


class GroupLimitedSigmoidRouter(nn.Module):
    """DeepSeek-V3: sigmoid scores; choice by score + ``e_score_correction_bias`` restricted to the ``topk_group``
    best of ``n_group`` groups (a group scores the sum of its top-2); weights are the plain scores of the chosen,
    optionally normalised, times ``routed_scaling_factor``. Computed in float32 as transformers does."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.top_k, self.norm, self.E = cfg.top_k, cfg.norm_topk_prob, E
        self.n_group, self.topk_group, self.scale = cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor

    def forward(self, x_ND):
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores = logits_NE.sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        N = x_ND.shape[0]
        if self.n_group > 1:
            group = choice.view(N, self.n_group, self.E // self.n_group).topk(2, dim=-1)[0].sum(-1)
            gidx = torch.topk(group, k=self.topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(group).scatter_(1, gidx, 1)
            emask = gmask.unsqueeze(-1).expand(-1, self.n_group, self.E // self.n_group).reshape(N, self.E)
            choice = choice.masked_fill(~emask.bool(), float("-inf"))
        ids_NK = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w_NK = scores.gather(1, ids_NK)
        if self.norm:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        w_NK = w_NK * self.scale
        return logits_NE, ids_NK, w_NK.to(x_ND.dtype)


class TopKSoftmaxRouter(nn.Module):
    """gpt-oss: linear with bias, top-k on the logits, softmax over the chosen logits."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.top_k = cfg.top_k

    def forward(self, x_ND):
        logits_NE = F.linear(x_ND, self.weight, self.bias)
        top_NK, ids_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        w_NK = torch.softmax(top_NK, dim=1, dtype=top_NK.dtype)
        return logits_NE, ids_NK, w_NK


class SigmoidBiasRouter(nn.Module):
    """MiniMax-M2: sigmoid scores; choice by score + ``e_score_correction_bias``; weights are the chosen scores
    renormalised (float32, as transformers). The checkpoint keeps the bias on the block
    (``block_sparse_moe.e_score_correction_bias``, mapped in ``weights.dense_checkpoint_name``)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        self.top_k = cfg.top_k

    def forward(self, x_ND):
        logits_NE = F.linear(x_ND.to(self.weight.dtype), self.weight)
        scores = logits_NE.float().sigmoid()
        ids_NK = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        w_NK = scores.gather(1, ids_NK)
        w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
        return logits_NE, ids_NK, w_NK.to(x_ND.dtype)


class RoutedBlock(nn.Module):
    """The MoE block of every architecture: ``route`` (router, training capture, route hooks), routed experts
    through the dispatcher and the provider, plus ``shared`` (the shared experts' output, or None). Expert-parallel
    schemes call ``select`` / ``route`` / ``shared`` and run the routed experts their own way."""
    router_attr = "gate"

    def select(self, x_ND):
        """(ids [N, K], weights [N, K]) chosen by the router; no hooks."""
        router = getattr(self, self.router_attr)
        if x_ND.shape[0] == 0:
            K = router.top_k
            return (torch.empty((0, K), dtype=torch.long, device=x_ND.device), x_ND.new_empty((0, K)))
        return router(x_ND)[1:]

    def route(self, x_ND, batch):
        router = getattr(self, self.router_attr)
        if x_ND.shape[0] == 0:
            return self.select(x_ND)
        logits_NE, ids_NK, w_NK = router(x_ND)
        if self.training:   # kept for the training losses and the router-bias update
            self.last_router_logits, self.last_router_ids = logits_NE, ids_NK
        for hook in batch.route_hooks:
            hook(self.layer, x_ND, ids_NK, w_NK)
        return ids_NK, w_NK

    def shared(self, x_ND):
        return None

    def forward(self, x_ND, batch, experts, dispatcher):
        ids_NK, w_NK = self.route(x_ND, batch)
        r = dispatcher.dispatch(self.layer, x_ND, ids_NK, w_NK)
        y_MD = run_experts(self.layer, r.x_MD, r.expert_ids, r.counts, experts)
        out = dispatcher.combine(y_MD, r.meta)
        s = self.shared(x_ND)
        return out if s is None else out + s


class DeepseekMoEBlock(RoutedBlock):
    """Routed experts (provider) + ``n_shared_experts`` shared experts as one ungated dense MLP, always added."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = GroupLimitedSigmoidRouter(cfg)
        F_ = cfg.expert_intermediate_size * cfg.num_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, F_) if F_ else None
        self.last_router_logits = None

    def shared(self, x_ND):
        return None if self.shared_experts is None else self.shared_experts(x_ND)


class GptOssMoEBlock(RoutedBlock):
    """gpt-oss: router with bias; experts (clamped SwiGLU with biases) come from the provider."""
    router_attr = "router"

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.router = TopKSoftmaxRouter(cfg)
        self.last_router_logits = None

    @property
    def gate(self):   # predictors call ``block.gate(h)``
        return self.router


class MiniMaxMoEBlock(RoutedBlock):
    """MiniMax-M2: sigmoid router with a per-block ``e_score_correction_bias``, no shared expert."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = SigmoidBiasRouter(cfg)
        self.last_router_logits = None
