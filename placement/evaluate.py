"""Scoring a placement against routing statistics (usually held-out tokens).

Glossary
  transition   a token's move from expert i at layer l to expert j at layer l+1 (all k x k pairs)
  cross-worker a transition whose two experts share no worker. With replicas a token may use any
               replica, so it stays local when some worker holds both (l, i) and (l+1, j)
  weighted cost  0 local, 1 to another worker of the node, ``inter_node_cost`` across nodes; with
               replicas the cheapest replica pair is used
  load         expected tokens per worker per layer; a replicated expert's load is split evenly
  imbalance    max / mean worker load of a layer
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .affinity import affinity_from_trace
from .placement import Placement
from .problem import AffinityProblem
from .topology import Topology
from .trace import Trace


@dataclass(frozen=True)
class Metrics:
    """Placement quality on some routing statistics.

    cross_rate:      fraction of transitions whose experts share no worker.
    inter_node_rate: fraction whose experts share no node.
    weighted_rate:   topology-weighted cost per transition (== cross_rate on one node).
    cost_per_token:  weighted cost summed over a token's transitions (the solver's objective).
    load_max_mean:   worst layer's max/mean worker load; load_max_mean_avg averages layers.
    """

    cross_rate: float
    inter_node_rate: float
    weighted_rate: float
    cost_per_token: float
    load_max_mean: float
    load_max_mean_avg: float


def pair_cost_PEE(member_LEG: np.ndarray, topo: Topology) -> np.ndarray:
    """[L-1, E, E] cost of each transition under the placement (cheapest replica pair)."""
    m = member_LEG.astype(np.float64)
    share_w = np.einsum("leg,lfg->lef", m[:-1], m[1:]) > 0
    cost = (~share_w).astype(np.float64)
    if topo.num_nodes > 1 and topo.inter_node_cost != 1.0:
        mn = m.reshape(m.shape[0], m.shape[1], topo.num_nodes, topo.workers_per_node).max(-1)
        share_n = np.einsum("len,lfn->lef", mn[:-1], mn[1:]) > 0
        cost += (~share_n) * (topo.inter_node_cost - 1.0)
    return cost


def worker_load_LG(member_LEG: np.ndarray, load_LE: np.ndarray) -> np.ndarray:
    """[L, G] expected tokens per worker per layer (replica load split evenly)."""
    copies_LE = np.maximum(member_LEG.sum(-1), 1)
    return np.einsum("leg,le->lg", member_LEG.astype(np.float64), load_LE / copies_LE)


def evaluate(placement: Placement, data: Trace | AffinityProblem, *, nodes: int = 1,
             inter_node_cost: float = 4.0) -> Metrics:
    """Score ``placement`` on a trace or affinity problem (same layers/experts)."""
    prob = affinity_from_trace(data) if isinstance(data, Trace) else data
    placement.validate_for(prob.num_layers, prob.num_experts, placement.num_workers)
    topo = Topology(placement.num_workers, nodes, inter_node_cost)
    m_LEG = placement.membership_LEG()
    a = prob.aff_PEE
    total = max(a.sum(), 1e-300)
    unit = pair_cost_PEE(m_LEG, Topology(placement.num_workers))
    cross = float((a * unit).sum() / total)
    if topo.num_nodes > 1:
        mn = m_LEG.reshape(*m_LEG.shape[:2], topo.num_nodes, topo.workers_per_node).any(-1)
        inter = float((a * (np.einsum("len,lfn->lef", mn[:-1].astype(float), mn[1:].astype(float)) == 0)).sum() / total)
    else:
        inter = 0.0
    wcost = float((a * pair_cost_PEE(m_LEG, topo)).sum())
    wrate = wcost / total
    load = worker_load_LG(m_LEG, prob.load_LE)
    ratio_L = load.max(1) / np.maximum(load.mean(1), 1e-300)
    return Metrics(cross, inter, float(wrate), wcost, float(ratio_L.max()), float(ratio_L.mean()))
