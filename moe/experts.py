"""Expert weights and the expert provider seam.

The MoE layer asks a provider for the weights of one ``(layer, expert)`` and multiplies. Local mode keeps every
expert resident; offload mode answers from a slot cache; Ray mode holds only the worker's shard.

Shapes: M = routed token rows (tokens × chosen experts, grouped by expert), D hidden, F expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F_

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .weights import TensorRef, check_fused_shapes, expert_refs


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor   # [F, D]
    up: torch.Tensor     # [F, D]
    down: torch.Tensor   # [D, F]
    gate_bias: torch.Tensor | None = None   # [F] (gpt-oss)
    up_bias: torch.Tensor | None = None     # [F]
    down_bias: torch.Tensor | None = None   # [D]
    act: str = "swiglu"                      # "swiglu" | "swiglu_oss" (gpt-oss: clamped, (up + 1) * glu)
    alpha: float = 1.702                     # swiglu_oss parameters
    limit: float = 7.0

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
                     if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to(self, device=None, dtype=None) -> "ExpertWeights":
        f = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return ExpertWeights(f(self.gate), f(self.up), f(self.down), f(self.gate_bias), f(self.up_bias),
                             f(self.down_bias), self.act, self.alpha, self.limit)


class ExpertProvider(Protocol):
    def get(self, layer: int, expert: int) -> ExpertWeights: ...


def read_ref(reader: CheckpointReader, ref: TensorRef, shape: tuple[int, int]) -> torch.Tensor:
    """Read one expert matrix. For fused tensors only that expert's slice is read from disk."""
    if ref.index is None:
        return reader.get(ref.name, shape)
    full = reader.shape(ref.name)
    t = reader._handle(reader.file_of(ref.name)).get_slice(ref.name)[ref.index]
    if ref.rows is not None:
        t = t[ref.rows[0]:ref.rows[1]]
    if ref.cols is not None:
        t = t[..., ref.cols[0]:ref.cols[1]:ref.cols[2]]
    if ref.transpose:
        t = t.transpose(-1, -2)
    if ref.cols is not None or ref.transpose:
        t = t.contiguous()
    if tuple(t.shape) != tuple(shape):
        from .errors import CheckpointError
        raise CheckpointError(f"tensor {ref.name!r} has shape {list(full)}, expert slice {list(t.shape)} but the "
                              f"config implies {list(shape)}")
    return t


def read_expert(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> ExpertWeights:
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    refs = expert_refs(cfg, reader, layer, expert)
    if refs.gate_bias is not None:     # gpt-oss
        return ExpertWeights(read_ref(reader, refs.gate, (F, D)), read_ref(reader, refs.up, (F, D)),
                             read_ref(reader, refs.down, (D, F)), read_ref(reader, refs.gate_bias, (F,)),
                             read_ref(reader, refs.up_bias, (F,)), read_ref(reader, refs.down_bias, (D,)),
                             act=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    return ExpertWeights(read_ref(reader, refs.gate, (F, D)), read_ref(reader, refs.up, (F, D)),
                         read_ref(reader, refs.down, (D, F)))


class ResidentExperts:
    """Every routed expert of the checkpoint held in memory (local mode), or only ``experts[l]`` of each layer."""

    def __init__(self, cfg: MoEConfig, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                 only: dict[int, list[int]] | None = None, progress=None):
        self.cfg = cfg
        self._w: dict[tuple[int, int], ExpertWeights] = {}
        for layer in cfg.moe_layers:
            check_fused_shapes(cfg, reader, layer)
            ids = range(cfg.num_experts) if only is None else only.get(layer, [])
            for e in ids:
                self._w[(layer, e)] = read_expert(cfg, reader, layer, e).to(device=device, dtype=dtype)
            if progress is not None:
                progress(layer)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        return self._w[(layer, expert)]

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._w

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._w.values())


class ParamExperts(torch.nn.Module):
    """Trainable experts, used by the training script with autograd.

    One parameter per (layer, expert) matrix, flat index ``layer * E + expert``: slicing a stacked [L, E, F, D]
    parameter instead makes every backward zero-fill a gradient of the whole stack per expert (slow on CPU).
    """

    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        L, E, D, F = cfg.num_layers, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.num_experts = E
        mk = lambda *shape: torch.nn.ParameterList(torch.nn.Parameter(torch.randn(*shape) * init_std)
                                                   for _ in range(L * E))
        self.gate, self.up, self.down = mk(F, D), mk(F, D), mk(D, F)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        i = layer * self.num_experts + expert
        return ExpertWeights(self.gate[i], self.up[i], self.down[i])


def expert_mlp(x_MD: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """SwiGLU expert: down(silu(gate x) * up x); gpt-oss's clamped variant when ``w.act == "swiglu_oss"``."""
    if w.act == "swiglu_oss":
        gate = F_.linear(x_MD, w.gate, w.gate_bias).clamp(max=w.limit)
        up = F_.linear(x_MD, w.up, w.up_bias).clamp(-w.limit, w.limit)
        glu = gate * torch.sigmoid(gate * w.alpha)
        return F_.linear((up + 1) * glu, w.down, w.down_bias)
    if w.gate_bias is not None or w.down_bias is not None:
        return F_.linear(F_.silu(F_.linear(x_MD, w.gate, w.gate_bias)) * F_.linear(x_MD, w.up, w.up_bias),
                         w.down, w.down_bias)
    return F_.linear(F_.silu(F_.linear(x_MD, w.gate)) * F_.linear(x_MD, w.up), w.down)


def run_experts(layer: int, x_MD: torch.Tensor, expert_ids: list[int], counts: list[int],
                provider: ExpertProvider) -> torch.Tensor:
    """Rows of ``x_MD`` are grouped by expert: ``counts[i]`` rows for ``expert_ids[i]``. One matmul set per expert."""
    outs = []
    start = 0
    for e, c in zip(expert_ids, counts):
        if c:
            outs.append(expert_mlp(x_MD[start:start + c], provider.get(layer, e)))
            start += c
    if not outs:
        return x_MD.new_zeros((0, x_MD.shape[-1]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
