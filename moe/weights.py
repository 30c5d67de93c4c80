"""Where each weight of an architecture lives in a Hugging Face checkpoint.

Dense weights (attention, norms, embeddings, shared experts, routers) are addressed by our module's parameter
name; routed experts by ``(layer, expert)``. Experts come in two on-disk layouts and both are accepted:
- per expert: ``<moe>.experts.{e}.w1/w3/w2.weight`` (Mixtral) or ``gate_proj/up_proj/down_proj`` (Qwen, OLMoE);
- fused 3-D: ``<moe>.experts.gate_up_proj [E, 2F, D]`` (gate rows then up rows) and ``<moe>.experts.down_proj [E, D, F]``.
gpt-oss has one layout, fused, transposed and with biases: ``<moe>.experts.gate_up_proj [E, D, 2F]`` (gate and up
interleaved along the last dimension: gate = ``[..., 0::2]``, up = ``[..., 1::2]``), ``gate_up_proj_bias [E, 2F]``
(interleaved the same way), ``down_proj [E, F, D]``, ``down_proj_bias [E, D]``; its router is ``<moe>.router``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .errors import CheckpointError
from .quant_formats import check_mxfp4, present


@dataclass(frozen=True)
class TensorRef:
    """One expert matrix on disk: ``name`` (whole tensor) or ``name[index, row_lo:row_hi]`` (fused layout)."""
    name: str
    index: int | None = None
    rows: tuple[int, int] | None = None
    # gpt-oss: a strided slice of the last dimension ``[..., start:stop:step]`` and then a transpose. A ref with
    # ``cols`` is not one contiguous byte range: byte-level readers must read the expert's whole slab instead.
    cols: tuple[int, int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class ExpertRefs:
    gate: TensorRef   # [F, D]
    up: TensorRef     # [F, D]
    down: TensorRef   # [D, F]
    gate_bias: TensorRef | None = None   # [F]   (gpt-oss)
    up_bias: TensorRef | None = None     # [F]
    down_bias: TensorRef | None = None   # [D]

    @property
    def contiguous(self) -> bool:
        """Every matrix is one contiguous byte range on disk (false for gpt-oss's interleaved, transposed layout)."""
        return all(r is None or (r.cols is None and not r.transpose)
                   for r in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias))


def moe_prefix(cfg: MoEConfig, reader: CheckpointReader, layer: int) -> str:
    """The MoE block's name prefix for ``layer``; Mixtral's legacy files call it ``block_sparse_moe``."""
    for cand in (f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"):
        if f"{cand}.gate.weight" in reader:
            return cand
    if cfg.router_kind == "topk_softmax" and f"model.layers.{layer}.mlp.router.weight" in reader:   # gpt-oss
        return f"model.layers.{layer}.mlp"
    raise CheckpointError(f"tensor 'model.layers.{layer}.mlp.gate.weight' (the router of layer {layer}) "
                          f"not found in checkpoint {reader.path}")


def expert_refs(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> ExpertRefs:
    p = moe_prefix(cfg, reader, layer)
    F = cfg.expert_intermediate_size
    if cfg.expert_act == "swiglu_oss":
        gu, dn = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"
        return ExpertRefs(TensorRef(gu, expert, cols=(0, 2 * F, 2), transpose=True),
                          TensorRef(gu, expert, cols=(1, 2 * F, 2), transpose=True),
                          TensorRef(dn, expert, transpose=True),
                          TensorRef(f"{gu}_bias", expert, cols=(0, 2 * F, 2)),
                          TensorRef(f"{gu}_bias", expert, cols=(1, 2 * F, 2)),
                          TensorRef(f"{dn}_bias", expert))
    if f"{p}.experts.gate_up_proj" in reader:
        return ExpertRefs(TensorRef(f"{p}.experts.gate_up_proj", expert, (0, F)),
                          TensorRef(f"{p}.experts.gate_up_proj", expert, (F, 2 * F)),
                          TensorRef(f"{p}.experts.down_proj", expert))
    e = f"{p}.experts.{expert}"
    if f"{e}.w1.weight" in reader:
        return ExpertRefs(TensorRef(f"{e}.w1.weight"), TensorRef(f"{e}.w3.weight"), TensorRef(f"{e}.w2.weight"))
    return ExpertRefs(TensorRef(f"{e}.gate_proj.weight"), TensorRef(f"{e}.up_proj.weight"),
                      TensorRef(f"{e}.down_proj.weight"))


def check_fused_shapes(cfg: MoEConfig, reader: CheckpointReader, layer: int) -> None:
    p = moe_prefix(cfg, reader, layer)
    E, F, D = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
    shapes = ((f"{p}.experts.gate_up_proj", (E, 2 * F, D)), (f"{p}.experts.down_proj", (E, D, F)))
    if cfg.expert_act == "swiglu_oss":
        shapes = ((f"{p}.experts.gate_up_proj", (E, D, 2 * F)), (f"{p}.experts.down_proj", (E, F, D)),
                  (f"{p}.experts.gate_up_proj_bias", (E, 2 * F)), (f"{p}.experts.down_proj_bias", (E, D)))
        for name, _ in shapes:
            if not present(reader, name):
                raise CheckpointError(f"tensor {name!r} (gpt-oss experts of layer {layer}) not found in checkpoint "
                                      f"{reader.path}")
    for name, shape in shapes:
        if name not in reader and f"{name}_blocks" in reader:
            check_mxfp4(reader, cfg.quant, name, shape)
        elif name in reader and reader.shape(name) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(reader.shape(name))} but the config implies "
                                  f"{list(shape)} ({reader.file_of(name)})")


def dense_checkpoint_name(cfg: MoEConfig, reader: CheckpointReader, param: str) -> str:
    """Map our parameter name to the checkpoint's (they match except the legacy ``block_sparse_moe`` MoE prefix of
    Mixtral and MiniMax-M2, and MiniMax-M2's router bias, kept on the block)."""
    if ".mlp.gate." in param or ".mlp.shared_expert" in param:
        layer = int(param.split(".")[2])
        if cfg.router_kind == "sigmoid_bias" and param.endswith(".gate.e_score_correction_bias"):
            param = param.replace(".gate.e_score_correction_bias", ".e_score_correction_bias")
        return param.replace(f"model.layers.{layer}.mlp", moe_prefix(cfg, reader, layer))
    return param
