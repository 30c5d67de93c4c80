"""Which decoder layers of a model are MoE layers, and how wide: what engine files are checked against.

Glossary
  num_layers  decoder layers of the model (``num_hidden_layers``); engines index their per-layer tables
              by this decoder-layer id, dense layers included
  moe_layers  decoder-layer ids of the MoE layers, in order; placement row i is decoder layer moe_layers[i]
  E, k        routed experts per MoE layer, experts chosen per token (top-k)

Engine files (SGLang's expert location and recorder dumps, vLLM's routed experts) carry one row per decoder
layer, so converting between them and our traces and placements (one row per MoE layer) needs this layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PlacementError


@dataclass(frozen=True)
class ModelLayout:
    """Decoder layers, the MoE ones among them, experts per MoE layer and top-k of one model."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    name: str = "model"

    def __post_init__(self):
        object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        ok = (self.moe_layers and list(self.moe_layers) == sorted(set(self.moe_layers))
              and 0 <= self.moe_layers[0] and self.moe_layers[-1] < self.num_layers)
        if not ok:
            raise PlacementError(f"{self.name}: MoE layer ids {list(self.moe_layers)} must be increasing ids "
                                 f"in [0, {self.num_layers})")
        if not 1 <= self.top_k <= self.num_experts:
            raise PlacementError(f"{self.name}: top-k {self.top_k} must lie in [1, {self.num_experts}]")

    @classmethod
    def all_moe(cls, num_layers: int, num_experts: int, top_k: int, name: str = "model") -> "ModelLayout":
        """A model whose every decoder layer is an MoE layer."""
        return cls(num_layers, tuple(range(num_layers)), num_experts, top_k, name)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def describe(self) -> str:
        return (f"{self.name} has {self.num_layers} layers ({self.num_moe_layers} MoE) x {self.num_experts} experts,"
                f" top-{self.top_k}")

    def check_moe_shape(self, num_moe_layers: int, num_experts: int, what: str) -> None:
        """Raise naming both shapes if ``what`` (a trace or placement) has other MoE layers or experts."""
        if (num_moe_layers, num_experts) != (self.num_moe_layers, self.num_experts):
            raise PlacementError(f"{what} has {num_moe_layers} MoE layers x {num_experts} experts, but "
                                 f"{self.describe()}")
