"""Worker topology: which workers share a node, and what a crossing costs.

Glossary
  G  workers;  N  nodes;  worker w lives on node w // (G / N)
  cost_GG[a, b]  cost of a token moving from worker a to worker b:
                 0 on the same worker, 1 between workers of one node, ``inter_node_cost`` across nodes
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlacementError


@dataclass(frozen=True)
class Topology:
    """G workers split evenly over N nodes; crossings between nodes cost ``inter_node_cost``."""

    num_workers: int
    num_nodes: int = 1
    inter_node_cost: float = 4.0

    def __post_init__(self):
        if self.num_workers < 1:
            raise PlacementError(f"workers must be >= 1, got {self.num_workers}")
        if self.num_nodes < 1 or self.num_workers % self.num_nodes:
            raise PlacementError(
                f"nodes ({self.num_nodes}) must divide workers ({self.num_workers}) evenly")
        if self.inter_node_cost < 1:
            raise PlacementError(f"inter_node_cost must be >= 1 (intra-node costs 1), got {self.inter_node_cost}")

    @property
    def workers_per_node(self) -> int:
        return self.num_workers // self.num_nodes

    @property
    def node_of_G(self) -> np.ndarray:
        """[G] node id of every worker."""
        return np.arange(self.num_workers) // self.workers_per_node

    @property
    def weighted(self) -> bool:
        return self.num_nodes > 1 and self.inter_node_cost != 1.0

    def cost_GG(self) -> np.ndarray:
        """[G, G] crossing cost between workers."""
        n = self.node_of_G
        same_node = n[:, None] == n[None, :]
        c = np.where(same_node, 1.0, float(self.inter_node_cost))
        np.fill_diagonal(c, 0.0)
        return c
