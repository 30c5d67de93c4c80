"""What is being asked of a solver: cluster shape and constraints, validated against a problem.

Glossary
  G workers, N nodes, E experts per layer, L layers
  slots      experts held per worker per layer: ceil(E / G) + R
  R          extra (replica) slots per worker per layer, EPLB-style
  copies_LE  how many workers hold each (layer, expert): 1, or more for replicated hot experts
  balance    eps: every worker's expected tokens per layer must be <= (1 + eps) x the layer mean
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlacementError
from .problem import AffinityProblem
from .topology import Topology


@dataclass(frozen=True)
class PlaceSpec:
    """Cluster shape and constraints for one placement request."""

    num_workers: int
    nodes: int = 1
    replicas: int = 0
    balance: float | None = None
    inter_node_cost: float = 4.0

    def __post_init__(self):
        Topology(self.num_workers, self.nodes, self.inter_node_cost)  # validates workers/nodes
        if self.replicas < 0:
            raise PlacementError(f"replicas must be >= 0, got {self.replicas}")
        if self.balance is not None and self.balance < 0:
            raise PlacementError(f"balance eps must be >= 0, got {self.balance}")

    @property
    def topology(self) -> Topology:
        return Topology(self.num_workers, self.nodes, self.inter_node_cost)

    def slots(self, num_experts: int) -> int:
        """Experts per worker per layer."""
        return -(-num_experts // self.num_workers) + self.replicas

    def check(self, problem: AffinityProblem) -> None:
        """Raise PlacementError if the request cannot be satisfied for ``problem``."""
        E, G = problem.num_experts, self.num_workers
        if G > E:
            raise PlacementError(f"{G} workers but only {E} experts per layer: some workers would be idle; "
                                 f"use at most {E} workers")
        if E % G and self.replicas == 0:
            raise PlacementError(f"workers ({G}) must divide experts ({E}) without replication; "
                                 f"use a divisor of {E} or pass --replicas >= 1")


def replica_counts(load_LE: np.ndarray, num_workers: int, slots: int) -> np.ndarray:
    """Copies [L, E] per expert, DeepSeek-EPLB rule: each extra slot goes to the expert with the
    highest load per copy. Total copies per layer = num_workers * slots; at most one copy per worker.

    load_LE: [L, E] expected tokens per expert.
    """
    L, E = load_LE.shape
    extra = num_workers * slots - E
    copies_LE = np.ones((L, E), dtype=np.int64)
    for l in range(L):
        for _ in range(extra):
            per_copy = np.where(copies_LE[l] < num_workers, load_LE[l] / copies_LE[l], -1.0)
            copies_LE[l, int(np.argmax(per_copy))] += 1
    return copies_LE


def balance_cap_L(load_LE: np.ndarray, num_workers: int, eps: float) -> np.ndarray:
    """[L] maximum expected tokens per worker allowed by balance eps."""
    return (1.0 + eps) * load_LE.sum(1) / num_workers
