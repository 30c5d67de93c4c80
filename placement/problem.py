"""The affinity problem: what the solver needs to know about routing, independent of its source.

Glossary
  L  MoE layers;  P = L - 1 consecutive layer pairs (l, l+1)
  E  experts per layer
  affinity   aff_PEE[l, i, j] = expected number of transitions per token from expert i at layer l
             to expert j at layer l+1 (over all top-k x top-k pairs for traces; rank-aligned pairs for
             the OLMoE-paper statistics)
  load       load_LE[l, i] = expected tokens routed to expert i of layer l, per token
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlacementError


@dataclass(frozen=True, eq=False)
class AffinityProblem:
    """Routing statistics to place experts against.

    aff_PEE:  [L-1, E, E] non-negative expected transitions per token.
    load_LE:  [L, E] non-negative expected tokens per expert per token.
    name:     where the statistics came from (for reports).
    """

    aff_PEE: np.ndarray
    load_LE: np.ndarray
    name: str = "problem"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        a, w = self.aff_PEE, self.load_LE
        if a.ndim != 3 or a.shape[1] != a.shape[2]:
            raise PlacementError(f"affinity must have shape [L-1, E, E], got {a.shape}")
        if w.ndim != 2 or w.shape[0] != a.shape[0] + 1 or w.shape[1] != a.shape[1]:
            raise PlacementError(
                f"load must have shape [L, E] = [{a.shape[0] + 1}, {a.shape[1]}], got {w.shape}")
        if w.shape[0] < 2:
            raise PlacementError("need at least 2 layers to have a layer pair to place against")
        if (a < 0).any() or (w < 0).any() or not (np.isfinite(a).all() and np.isfinite(w).all()):
            raise PlacementError("affinity and load must be finite and non-negative")

    @property
    def num_layers(self) -> int:
        return int(self.load_LE.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load_LE.shape[1])

    @property
    def total_transitions(self) -> float:
        """Expected consecutive-layer transitions per token (the denominator of the cross-worker rate)."""
        return float(self.aff_PEE.sum())
