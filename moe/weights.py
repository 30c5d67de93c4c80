"""Where each weight of an architecture lives in a Hugging Face checkpoint.

Dense weights (attention, norms, embeddings, shared experts, routers) are addressed by our module's parameter
name; routed experts by ``(layer, expert)``. Experts come in two on-disk layouts and both are accepted:
- per expert: ``<moe>.experts.{e}.w1/w3/w2.weight`` (Mixtral) or ``gate_proj/up_proj/down_proj`` (Qwen, OLMoE);
- fused 3-D: ``<moe>.experts.gate_up_proj [E, 2F, D]`` (gate rows then up rows) and ``<moe>.experts.down_proj [E, D, F]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .errors import CheckpointError


@dataclass(frozen=True)
class TensorRef:
    """One expert matrix on disk: ``name`` (whole tensor) or ``name[index, row_lo:row_hi]`` (fused layout)."""
    name: str
    index: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ExpertRefs:
    gate: TensorRef   # [F, D]
    up: TensorRef     # [F, D]
    down: TensorRef   # [D, F]


def moe_prefix(cfg: MoEConfig, reader: CheckpointReader, layer: int) -> str:
    """The MoE block's name prefix for ``layer``; Mixtral's legacy files call it ``block_sparse_moe``."""
    for cand in (f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"):
        if f"{cand}.gate.weight" in reader:
            return cand
    raise CheckpointError(f"tensor 'model.layers.{layer}.mlp.gate.weight' (the router of layer {layer}) "
                          f"not found in checkpoint {reader.path}")


def expert_refs(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> ExpertRefs:
    p = moe_prefix(cfg, reader, layer)
    F = cfg.expert_intermediate_size
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
    for name, shape in ((f"{p}.experts.gate_up_proj", (E, 2 * F, D)), (f"{p}.experts.down_proj", (E, D, F))):
        if name in reader and reader.shape(name) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(reader.shape(name))} but the config implies "
                                  f"{list(shape)} ({reader.file_of(name)})")


def dense_checkpoint_name(cfg: MoEConfig, reader: CheckpointReader, param: str) -> str:
    """Map our parameter name to the checkpoint's (they match except Mixtral's legacy MoE prefix)."""
    if ".mlp.gate." in param or ".mlp.shared_expert" in param:
        layer = int(param.split(".")[2])
        return param.replace(f"model.layers.{layer}.mlp", moe_prefix(cfg, reader, layer))
    return param
