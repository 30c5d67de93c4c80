"""Expert weights and the expert provider seam.

The MoE layer asks a provider for the weights of one ``(layer, expert)`` and multiplies. Local mode keeps every
expert resident; offload mode answers from a slot cache; Ray mode holds only the worker's shard.

Shapes: M = routed token rows (tokens × chosen experts, grouped by expert), D hidden, F expert intermediate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F_

from .checkpoint import CheckpointReader
from .compute import (INT4_GROUP, KERNEL_MAX_ROWS, Arena, Packed, act_q8, fused, huge_pages, interleave8, matmul,
                      pack)
from .config import MoEConfig
from .errors import ModelError
from .quant_formats import QuantFormat, logical_shape, read_packed, read_slice, read_tensor
from .validate import check_finite
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


def read_ref(reader: CheckpointReader, ref: TensorRef, shape: tuple[int, int],
             quant: QuantFormat = QuantFormat()) -> torch.Tensor:
    """Read one expert matrix (dequantized when the checkpoint stores it as fp8 or MXFP4). For fused tensors only
    that expert's slice is read from disk."""
    if ref.index is None:
        return read_tensor(reader, quant, ref.name, shape)
    full = logical_shape(reader, ref.name)
    t = read_slice(reader, quant, ref.name, ref.index, full)
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
    rd = lambda ref, shape: read_ref(reader, ref, shape, cfg.quant)     # noqa: E731
    if refs.gate_bias is not None:     # gpt-oss
        return ExpertWeights(rd(refs.gate, (F, D)), rd(refs.up, (F, D)), rd(refs.down, (D, F)),
                             rd(refs.gate_bias, (F,)), rd(refs.up_bias, (F,)), rd(refs.down_bias, (D,)),
                             act=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    return ExpertWeights(rd(refs.gate, (F, D)), rd(refs.up, (F, D)), rd(refs.down, (D, F)))


def read_packed_expert(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> "PackedExpert":
    """An expert of a ``moeyard quantize`` checkpoint as stored (gate and up joined into one matrix; no
    re-quantization); scales holding NaN are refused, named."""
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    r = expert_refs(cfg, reader, layer, expert)
    gate, up, down = (read_packed(reader, cfg.quant, ref.name, shape)
                      for ref, shape in ((r.gate, (F, D)), (r.up, (F, D)), (r.down, (D, F))))
    for part, p in (("gate", gate), ("up", up), ("down", down)):
        check_finite(f"layer {layer} expert {expert} {part} scale", p.scale.float())
    gu = Packed(gate.kind, torch.cat([gate.data, up.data]), torch.cat([gate.scale, up.scale]), (2 * F, D))
    return PackedExpert(gu, down)


@dataclass(frozen=True)
class PackedExpert:
    """One expert in a compute plan's storage (``moe/compute.py``): gate and up fused into one [2F, D] matrix, or
    apart (``up`` given: offload slots that view a checkpoint's bytes where gate and up are not adjacent)."""
    gate_up: object       # compute.Packed [2F, D] (the gate alone [F, D] when ``up`` is given)
    down: object
    act: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    up: object = None     # compute.Packed [F, D] or None

    @classmethod
    def of(cls, w: ExpertWeights, kind: str, name: str) -> "PackedExpert":
        gu_bias = None if w.gate_bias is None else torch.cat([w.gate_bias, w.up_bias])
        return cls(pack(torch.cat([w.gate, w.up]), kind, f"{name}.gate_up", gu_bias),
                   pack(w.down, kind, f"{name}.down", w.down_bias), w.act, w.alpha, w.limit)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes + (0 if self.up is None else self.up.nbytes)

    def arena_size(self) -> int:
        return sum(Arena.packed_size(p) for p in (self.gate_up, self.down, self.up) if p is not None)

    def interleaved(self) -> "PackedExpert":
        """This expert with int4 matrices in the x8 layout (``compute.interleave8``; resident experts)."""
        return dataclasses.replace(self, gate_up=interleave8(self.gate_up), down=interleave8(self.down),
                                   up=None if self.up is None else interleave8(self.up))

    def placed(self, arena) -> "PackedExpert":
        """This expert with its matrices copied into ``arena`` (``compute.Arena``)."""
        return dataclasses.replace(self, gate_up=arena.packed(self.gate_up), down=arena.packed(self.down),
                                   up=None if self.up is None else arena.packed(self.up))

    def weights(self) -> ExpertWeights:
        """Dequantized float32 weights (readers that want matrices, not products)."""
        if self.up is not None:
            return ExpertWeights(self.gate_up.dequantize(), self.up.dequantize(), self.down.dequantize(),
                                 self.gate_up.bias, self.up.bias, self.down.bias, self.act, self.alpha, self.limit)
        gu, F = self.gate_up.dequantize(), self.gate_up.shape[0] // 2
        b = self.gate_up.bias
        return ExpertWeights(gu[:F], gu[F:], self.down.dequantize(), None if b is None else b[:F],
                             None if b is None else b[F:], self.down.bias, self.act, self.alpha, self.limit)

    def __call__(self, x_MD: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up, self.down
        m = fused(x_MD) if self.up is None and self.act == "swiglu" and x_MD.shape[0] <= KERNEL_MAX_ROWS else None
        code = _KIND_CODE.get((gu.kind, gu.layout))
        if m is not None and gu.bias is None and dn.bias is None and (gu.kind, gu.layout) == (dn.kind, dn.layout) \
                and code is not None and (code < 3 or act_q8()):
            return m.expert_swiglu(x_MD, gu.data, _scale(gu), dn.data, _scale(dn), code, INT4_GROUP, act_q8())
        if self.up is not None:
            gate, up = matmul(x_MD, self.gate_up), matmul(x_MD, self.up)
        else:
            h = matmul(x_MD, self.gate_up)
            F = h.shape[-1] // 2
            gate, up = h[:, :F], h[:, F:]
        if self.act == "swiglu_oss":
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        else:
            h = F_.silu(gate) * up
        return matmul(h, self.down).to(x_MD.dtype)


_KIND_CODE = {("bf16", "rows"): 0, ("int8", "rows"): 1, ("int4", "rows"): 2, ("int4", "x8"): 3}   # ops.cpp
_NO_SCALE = torch.empty(0)


def _scale(p) -> torch.Tensor:
    return _NO_SCALE if p.scale is None else p.scale


def check_expert_finite(layer: int, expert: int, w: ExpertWeights) -> None:
    """A routed expert must not hold NaN (named by layer, expert and matrix)."""
    for part, t in zip(("gate", "up", "down", "gate_bias", "up_bias", "down_bias"), w.tensors):
        check_finite(f"layer {layer} expert {expert} {part}", t)


class ResidentExperts:
    """Every routed expert of the checkpoint held in memory (local mode), or only ``experts[l]`` of each layer.

    ``pack``: a storage kind of ``moe/compute.py`` (bf16 | int8 | int4); experts are then kept packed and multiplied
    by the weight-only kernels (``compute``), and ``get`` returns their dequantized float32 weights."""

    def __init__(self, cfg: MoEConfig, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                 only: dict[int, list[int]] | None = None, progress=None, pack: str | None = None):
        self.cfg = cfg
        self.pack = pack
        self._w: dict[tuple[int, int], ExpertWeights] = {}
        self._p: dict[tuple[int, int], PackedExpert] = {}
        huge = pack is not None and device.type == "cpu" and huge_pages()
        for layer in cfg.moe_layers:
            check_fused_shapes(cfg, reader, layer)
            ids = list(range(cfg.num_experts) if only is None else only.get(layer, []))
            arena = None
            for e in ids:
                if cfg.quant.method == "moeyard":    # stored as the plan packs them: taken as they are
                    if pack != cfg.quant.kind:
                        raise ModelError(f"the checkpoint's routed experts are {cfg.quant.kind}, but the compute plan "
                                         f"stores experts as {pack}")
                    pe = read_packed_expert(cfg, reader, layer, e)
                else:
                    w = read_expert(cfg, reader, layer, e)
                    check_expert_finite(layer, e, w)      # as read: before packing or casting hides nothing
                    if pack is None:
                        self._w[(layer, e)] = w.to(device=device, dtype=dtype)
                        continue
                    pe = PackedExpert.of(w, pack, f"model.layers.{layer}.mlp.experts.{e}")
                    del w
                    reader.close()     # unmap what was read (it reopens lazily): file pages would count in RSS
                pe = pe.interleaved()
                if huge:     # the layer's experts in one huge-page mapping, copied in as each is packed
                    if arena is None:
                        arena = Arena(pe.arena_size() * len(ids))
                    pe = pe.placed(arena)
                self._p[(layer, e)] = pe
            if progress is not None:
                progress(layer)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        if self.pack is not None:
            return self._p[(layer, expert)].weights()
        return self._w[(layer, expert)]

    def compute(self, layer: int, x_MD: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for e, c in zip(expert_ids, counts):
            if c:
                outs.append(self._p[(layer, e)](x_MD[start:start + c]))
                start += c
        if not outs:
            return x_MD.new_zeros((0, x_MD.shape[-1]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._w or key in self._p

    # -- online rebalancing (cluster/rebalance.py): experts move between Ray workers as stored -------------------
    def stored(self, layer: int, expert: int):
        """The expert as held: ``PackedExpert`` under a compute plan, else ``ExpertWeights``."""
        return self._p[(layer, expert)] if self.pack is not None else self._w[(layer, expert)]

    def install(self, layer: int, expert: int, obj) -> None:
        (self._p if self.pack is not None else self._w)[(layer, expert)] = obj

    def drop(self, layer: int, expert: int) -> None:
        (self._p if self.pack is not None else self._w).pop((layer, expert))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._w.values()) + sum(p.nbytes for p in self._p.values())


@dataclass(frozen=True)
class StackedWeights:
    """One layer's experts stacked: ``gate``/``up`` [E, F, D], ``down`` [E, D, F] (plain SwiGLU, no biases)."""
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class ParamExperts(torch.nn.Module):
    """Trainable experts, used by the training scripts with autograd.

    One stacked [E, F, D] parameter per MoE layer and matrix, multiplied with one grouped matmul per layer
    (``grouped_mlp``): a per-expert Python loop over 64+ experts x layers is ~5x slower on a CPU, forward and
    backward.
    """

    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        mk = lambda *shape: torch.nn.ParameterList(torch.nn.Parameter(torch.randn(*shape) * init_std)
                                                   for _ in self.index)
        self.gate, self.up, self.down = mk(E, F, D), mk(E, F, D), mk(E, D, F)

    def stacked(self, layer: int) -> StackedWeights:
        i = self.index[layer]
        return StackedWeights(self.gate[i], self.up[i], self.down[i])

    def get(self, layer: int, expert: int) -> ExpertWeights:
        i = self.index[layer]
        return ExpertWeights(self.gate[i][expert], self.up[i][expert], self.down[i][expert])


def grouped_mlp(x_MD: torch.Tensor, expert_ids: list[int], counts: list[int], w: StackedWeights) -> torch.Tensor:
    """SwiGLU of rows grouped by expert (``counts[i]`` rows for ``expert_ids[i]``, ascending ids) as three
    grouped matmuls over all E experts (``torch.nn.functional.grouped_mm``; experts without rows are empty
    groups)."""
    E = w.gate.shape[0]
    counts_E = torch.zeros(E, dtype=torch.int32)
    counts_E[torch.tensor(expert_ids, dtype=torch.long)] = torch.tensor(counts, dtype=torch.int32)
    offs = counts_E.cumsum(0, dtype=torch.int32).to(x_MD.device)
    mm = lambda a, b: F_.grouped_mm(a, b.transpose(1, 2), offs=offs)
    return mm(F_.silu(mm(x_MD, w.gate)) * mm(x_MD, w.up), w.down)


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
    """Rows of ``x_MD`` are grouped by expert: ``counts[i]`` rows for ``expert_ids[i]``. A provider with stacked
    weights (``stacked(layer)``) gets one grouped matmul set per layer, one holding packed experts (``compute``:
    bf16 / int8 / int4 storage, weight-only kernels) multiplies them itself, any other one matmul set per expert."""
    packed = getattr(provider, "pack", None)
    if packed is not None:
        return provider.compute(layer, x_MD, expert_ids, counts)
    stacked = getattr(provider, "stacked", None)
    if stacked is not None and expert_ids:
        return grouped_mlp(x_MD, expert_ids, counts, stacked(layer))
    outs = []
    start = 0
    for e, c in zip(expert_ids, counts):
        if c:
            outs.append(expert_mlp(x_MD[start:start + c], provider.get(layer, e)))
            start += c
    if not outs:
        return x_MD.new_zeros((0, x_MD.shape[-1]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
