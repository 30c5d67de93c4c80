"""The MoE decoder: one class serves every architecture (differences live in the config and the factories below).

Shapes: N tokens of a flattened batch (all sequences' new tokens back to back), D hidden, E experts, K top-k,
V vocabulary. Expert weights are not parameters of this module: they come from an expert provider, and tokens
reach them through a dispatcher, so local, offload and expert-parallel modes run this same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compute import fused
from .config import MoEConfig
from .dispatch import LocalDispatcher
from .experts import ExpertProvider
from .layers import MLP, Attention, RMSNorm, Rotary  # noqa: F401  (Rotary: re-exported)
from .routers import RoutedBlock
from .rope import make_rotary

# hook(layer, x_ND, topk_ids_NK, topk_w_NK): told the routing of every MoE layer (profiler, predictors, prefetch)
RouteHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class ForwardBatch:
    """Layout of one forward pass.

    ``chunks[i] = (start, n, ctx)``: sequence i contributes tokens ``start:start+n`` of the flattened batch and has
    ``ctx`` tokens cached before them. ``kv`` is the KV cache (None: no cache, sequences of ``block_len`` tokens).
    ``sparse``: a chunk's positions are any increasing positions of its sequence, not ``ctx..ctx+n-1`` (a worker of
    the context-coherent scheme holds scattered tokens of a prompt); each query then sees keys up to its position.
    """
    positions_N: torch.Tensor
    chunks: list[tuple[int, int, int]]
    slots: list[int]
    kv: object = None
    block_len: int = 0
    route_hooks: list[RouteHook] = field(default_factory=list)
    logits_idx: torch.Tensor | None = None   # which rows get logits (None: all)
    sparse: bool = False

    def __post_init__(self):
        self.is_decode = self.kv is not None and all(n == 1 for _, n, _ in self.chunks)
        dev = self.positions_N.device
        self.slots_N = (torch.tensor([s for s, (_, n, _) in zip(self.slots, self.chunks) for _ in range(n)],
                                     dtype=torch.long, device=dev) if self.kv is not None else None)
        if self.is_decode:
            self.slots_B = self.slots_N
            lens = self.positions_N + 1                                  # keys visible to each query
            self.max_len = int(lens.max()) if len(lens) else 0
            self.decode_mask = (torch.arange(self.max_len, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        elif self.sparse:
            self._pos = [self.positions_N[a:a + n].cpu() for a, n, _ in self.chunks]

    @classmethod
    def of_tokens(cls, slots_N: torch.Tensor, positions_N: torch.Tensor, kv, route_hooks=None) -> "ForwardBatch":
        """A cached batch over any tokens grouped by sequence (``slots_N`` CPU, runs of one slot, increasing
        positions within a run)."""
        chunks, slots, start = [], [], 0
        if len(slots_N):
            _, counts = torch.unique_consecutive(slots_N, return_counts=True)
            for n in counts.tolist():
                chunks.append((start, n, 0))
                slots.append(int(slots_N[start]))
                start += n
        return cls(positions_N, chunks, slots, kv, route_hooks=list(route_hooks or []), sparse=True)

    def read_len(self, i: int) -> int:
        """Cached positions chunk i reads."""
        start, n, ctx = self.chunks[i]
        return int(self._pos[i][-1]) + 1 if self.sparse else ctx + n

    def prefill_mask(self, i: int):
        start, n, ctx = self.chunks[i]
        dev = self.positions_N.device
        if self.sparse:
            p = self._pos[i]
            T = int(p[-1]) + 1
            if n == T:
                return None  # the whole prompt so far: plain causal
            return (torch.arange(T)[None, :] <= p[:, None])[None, None].to(dev)
        if ctx == 0:
            return None  # plain causal
        q = torch.arange(n, device=dev)[:, None] + ctx
        return (torch.arange(ctx + n, device=dev)[None, :] <= q)[None, None]

    @classmethod
    def blocks(cls, B: int, T: int, device) -> "ForwardBatch":
        """No-cache layout for B sequences of T tokens (training, scoring)."""
        pos = torch.arange(T, device=device).repeat(B)
        return cls(pos, [(b * T, T, 0) for b in range(B)], list(range(B)), None, T)


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.top_k, self.norm = cfg.top_k, cfg.norm_topk_prob

    def forward(self, x_ND):
        m = fused(x_ND)
        if m is not None and self.weight.dtype is torch.float32:
            return tuple(m.route_topk(x_ND, self.weight, self.top_k, self.norm))
        logits_NE = F.linear(x_ND, self.weight)
        probs_NE = torch.softmax(logits_NE.float(), dim=-1)
        w_NK, ids_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        if self.norm:
            w_NK = w_NK / w_NK.sum(-1, keepdim=True)
        return logits_NE, ids_NK, w_NK.to(x_ND.dtype)


class MoEBlock(RoutedBlock):
    """Softmax top-k router; optional shared expert with its sigmoid gate (Qwen2-MoE)."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        self.last_router_logits = None   # kept only when the model is training (auxiliary loss)

    def shared(self, x_ND):
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)


def make_attention(cfg: MoEConfig, layer: int) -> nn.Module:
    """The attention module of ``cfg``'s architecture (MLA for DeepSeek-V3, sink attention for gpt-oss)."""
    if cfg.attention_kind == "mla":
        from .mla import MLAttention
        return MLAttention(cfg, layer)
    if cfg.attention_kind == "sinks":
        from .gpt_oss import SinkAttention
        return SinkAttention(cfg, layer)
    if cfg.attention_kind == "partial":
        from .partial_attention import PartialRopeAttention
        return PartialRopeAttention(cfg, layer)
    return Attention(cfg, layer)


def make_moe_block(cfg: MoEConfig, layer: int) -> nn.Module:
    if cfg.router_kind == "sigmoid_group":
        from .routers import DeepseekMoEBlock
        return DeepseekMoEBlock(cfg, layer)
    if cfg.router_kind == "topk_softmax":
        from .routers import GptOssMoEBlock
        return GptOssMoEBlock(cfg, layer)
    if cfg.router_kind == "sigmoid_bias":
        from .routers import MiniMaxMoEBlock
        return MiniMaxMoEBlock(cfg, layer)
    return MoEBlock(cfg, layer)


def make_decoder_layer(cfg: MoEConfig, layer: int) -> nn.Module:
    """Qwen3-Next's hybrid layers (linear or gated attention, (1 + w) norms) or the common one."""
    if cfg.attention_kind == "gated":
        from .qwen3_next import Qwen3NextDecoderLayer
        return Qwen3NextDecoderLayer(cfg, layer)
    return DecoderLayer(cfg, layer)


def make_norm(cfg: MoEConfig, dim: int) -> nn.Module:
    if cfg.rmsnorm_offset:
        from .qwen3_next import OffsetRMSNorm
        return OffsetRMSNorm(dim, cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = make_attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = make_moe_block(cfg, layer) if self.is_moe else MLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def attention_block(self, x_ND, batch, rotary):
        """The residual stream after attention (expert-parallel schemes run the rest themselves)."""
        return x_ND + self.self_attn(self.input_layernorm(x_ND), batch, rotary)

    def forward(self, x_ND, batch, rotary, experts, dispatcher):
        x_ND = self.attention_block(x_ND, batch, rotary)
        h = self.post_attention_layernorm(x_ND)
        return x_ND + (self.mlp(h, batch, experts, dispatcher) if self.is_moe else self.mlp(h))


class Model(nn.Module):
    """Named like Hugging Face's ``model.*`` so dense parameter names match checkpoints."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_decoder_layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


class MoEForCausalLM(nn.Module):
    def __init__(self, cfg: MoEConfig, experts: ExpertProvider | None = None, dispatcher=None,
                 max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = make_rotary(cfg, max_positions or min(cfg.max_position_embeddings, 4096))
        self.experts = experts
        self.dispatcher = dispatcher or LocalDispatcher()

    def hidden(self, ids_N: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.model.embed_tokens(ids_N)
        for layer in self.model.layers:
            x = layer(x, batch, self.rotary, self.experts, self.dispatcher)
        return self.model.norm(x)

    def forward(self, ids_N: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [R, V] (float32) of the rows in ``batch.logits_idx`` (all rows when None)."""
        h = self.hidden(ids_N, batch)
        if batch.logits_idx is not None:
            h = h[batch.logits_idx]
        return self.lm_head(h).float()

    def router_logits(self) -> list[torch.Tensor]:
        return [l.mlp.last_router_logits for l in self.model.layers if l.is_moe]

    def router_ids(self) -> list[torch.Tensor]:
        """The chosen experts [N, K] of every MoE layer in the last training forward (DeepSeek-V3 blocks)."""
        return [l.mlp.last_router_ids for l in self.model.layers if l.is_moe]
