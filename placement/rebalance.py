"""Warm re-solve for online rebalancing: a new placement for fresh routing counts, started from the current
one and priced against the expert bytes it would move. Pure: counts and a Placement in, a Proposal out.

Glossary
  counts          trans_PEE[l, i, j] transitions expert i (layer l) -> expert j (layer l+1) and load_LE[l, e]
                  tokens routed to expert e, summed over the window's num_tokens tokens (all k x k pairs)
  window_tokens   tokens expected until the next re-solve: a proposal's saving is counted over them
  crossing_bytes  bytes one unit of the solver's objective moves: one transition crossing workers inside a
                  node (an inter-node crossing counts inter_node_cost units, as in the solver)
  expert_bytes    bytes of one expert's weights; a copy across nodes counts inter_node_cost times in the cost
  move            Move(layer, expert, src, dst): copy the expert's weights from src (its cheapest current
                  holder) to dst; an eviction (layer, expert, worker) drops a copy once its layer's copies landed
  byte_budget     most raw expert bytes one proposal may copy
  decision        "adopt": fits the budget and the predicted saving over the window exceeds the move cost;
                  "not_worth": it does not; "over_budget": not even the best single layer's moves fit
                  (skipped: the caller counts it and keeps the old placement); "no_change": nothing to move
Moves are grouped by layer and every layer's new experts form a valid placement on their own, so an
executor may apply whole layers one after another (a few per engine step), every intermediate state valid.
The objective and the move cost share one unit (bytes, inter-node bytes weighted), so the search minimises
window_tokens x bytes per token + move cost directly: moving expert e of layer l to worker g costs
expert_bytes x crossing_cost(holder, g) / (window_tokens x crossing_bytes) objective units (search.py).

Steps of ``propose``: 1. problem from counts, checks; 2. replica counts (EPLB rule on the fresh loads),
the current primaries, balance caps; 3. bound (warm-started), move penalty; 4. warm search, replicas;
5. trim to the budget by whole layers; 6. price and decide.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .affinity import affinity_from_counts
from .bounds import pair_lower_bound
from .errors import PlacementError
from .evaluate import pair_cost_PEE
from .placement import Placement
from .replication import add_replicas
from .search import LayerSolver, local_search, total_cost
from .solver import check_balance, placement_cost
from .spec import PlaceSpec, replica_counts


@dataclass(frozen=True)
class RebalanceConfig:
    """Prices and limits of one re-solve (see the glossary); time_limit covers bound and search."""

    window_tokens: float
    byte_budget: float
    expert_bytes: float
    crossing_bytes: float
    time_limit: float = 10.0
    bound_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self):
        for name in ("window_tokens", "expert_bytes", "crossing_bytes", "time_limit"):
            if not getattr(self, name) > 0:
                raise PlacementError(f"rebalance {name} must be > 0, got {getattr(self, name)}")
        if self.byte_budget < 0 or not 0 <= self.bound_fraction < 1:
            raise PlacementError(f"rebalance byte_budget must be >= 0 and bound_fraction in [0, 1), got "
                                 f"{self.byte_budget}, {self.bound_fraction}")


@dataclass(frozen=True)
class Move:
    layer: int
    expert: int
    src: int
    dst: int


@dataclass(frozen=True)
class Proposal:
    """A re-solve's answer; ``placement`` is the proposed one whatever the decision (adopt only if adopted).

    Bytes are per token under the fresh counts (inter-node crossings weighted); predicted_saving is over the
    window; move_bytes raw, move_cost topology-weighted; gap = (proposed - bound) / proposed, bound proven
    for every placement; bound_state warm-starts the next re-solve's bound.
    """

    placement: Placement
    decision: str
    moves: tuple
    evictions: tuple
    layers: tuple
    current_bytes_per_token: float
    proposed_bytes_per_token: float
    predicted_saving: float
    move_bytes: float
    move_cost: float
    bound_bytes_per_token: float
    gap: float
    trimmed_layers: int
    seconds: float
    bound_state: tuple | None = None

    @property
    def adopted(self) -> bool:
        return self.decision == "adopt"

    @property
    def saving_per_token(self) -> float:
        return self.current_bytes_per_token - self.proposed_bytes_per_token


def propose(current: Placement, trans_PEE: np.ndarray, load_LE: np.ndarray, num_tokens: float, spec: PlaceSpec,
            cfg: RebalanceConfig, bound_state: tuple | None = None) -> Proposal:
    """Re-solve warm from ``current`` for counts trans_PEE [L-1, E, E], load_LE [L, E] of num_tokens tokens."""
    t0 = time.perf_counter()
    # 1. problem and checks
    problem = affinity_from_counts(trans_PEE, load_LE, num_tokens, name="window")
    L, E, G = problem.num_layers, problem.num_experts, spec.num_workers
    if (current.num_layers, current.num_experts, current.num_workers) != (L, E, G):
        raise PlacementError(f"routing counts cover {L} layers x {E} experts on {G} workers, the current "
                             f"placement {current.num_layers} x {current.num_experts} on {current.num_workers}")
    spec.check(problem)
    slots, S0 = spec.slots(E), -(-E // G)
    cur_LEG = current.membership_LEG()
    if cur_LEG.sum(1).max() > slots:
        raise PlacementError(f"the current placement holds {int(cur_LEG.sum(1).max())} experts of a layer on one "
                             f"worker, more than the {slots} slots of replicas={spec.replicas}")
    # 2. replicas, primaries, caps
    copies_LE = replica_counts(problem.load_LE, G, slots) if spec.replicas else np.ones((L, E), dtype=np.int64)
    cap_L = check_balance(problem, spec, copies_LE)
    prim_load_LE = problem.load_LE / copies_LE
    prim_cap = None if cap_L is None else (1 + spec.balance) * prim_load_LE.sum(1) / G
    if spec.replicas:   # primaries: one held copy per expert, S0 per worker (an assignment per layer)
        prim_LE = np.stack([linear_sum_assignment(np.repeat(~cur_LEG[l], S0, axis=1))[1] // S0 for l in range(L)])
    else:
        prim_LE = cur_LEG.argmax(-1)
    # 3. bound and penalty
    topo = spec.topology
    cost_GG = topo.cost_GG()
    pb = pair_lower_bound(problem, spec, copies_LE, time_limit=max(0.05, cfg.bound_fraction * cfg.time_limit),
                          state=bound_state)
    copy_LEG = _copy_cost_LEG(cur_LEG, topo)
    penalty_LEG = cfg.expert_bytes / (cfg.window_tokens * cfg.crossing_bytes) * copy_LEG
    # 4. warm search, then replicas
    layer_solver = LayerSolver(G, S0, prim_load_LE, prim_cap, mip_time=max(0.2, 0.05 * cfg.time_limit))
    left = 0.9 * cfg.time_limit - (time.perf_counter() - t0)     # a tenth is kept to trim and price
    worker_LE, _, _ = local_search(problem.aff_PEE, cost_GG, topo.node_of_G, S0, layer_solver,
                                   max(0.1, left), seed=cfg.seed, init=prim_LE, penalty_LEG=penalty_LEG)
    if spec.replicas:
        new_LEG = add_replicas(worker_LE, copies_LE, problem.aff_PEE, problem.load_LE, G, slots, cap_L,
                               penalty_LEG=penalty_LEG)
    else:
        new_LEG = np.zeros((L, E, G), dtype=bool)
        new_LEG[np.arange(L)[:, None], np.arange(E)[None, :], worker_LE] = True
    # 5. trim to the budget, whole layers at a time
    new_LEG, trimmed = _trim(cur_LEG, new_LEG, problem, spec, cfg, copy_LEG)
    # 6. price and decide
    moves, evictions = _moves(cur_LEG, new_LEG, cost_GG)
    move_bytes = cfg.expert_bytes * len(moves)
    move_cost = cfg.expert_bytes * float(sum(cost_GG[m.src, m.dst] for m in moves))
    cur_b, new_b = (cfg.crossing_bytes * _cost(m, problem, spec, cost_GG) for m in (cur_LEG, new_LEG))
    saving = (cur_b - new_b) * cfg.window_tokens
    changed = tuple(int(l) for l in np.flatnonzero((cur_LEG != new_LEG).any((1, 2))))
    if not changed:
        decision = "over_budget" if trimmed else "no_change"
    elif saving <= move_cost:
        decision = "not_worth"
    else:
        decision = "adopt"
    bound_b = min(cfg.crossing_bytes * pb.value, new_b)
    info = {"policy": "rebalance", "decision": decision, "nodes": spec.nodes, "replicas": spec.replicas,
            "balance": spec.balance, "inter_node_cost": spec.inter_node_cost, **pb.info}
    proposed = Placement.from_membership(new_LEG, objective=new_b / cfg.crossing_bytes,
                                         bound=bound_b / cfg.crossing_bytes, solver=info)
    return Proposal(proposed, decision, tuple(moves), tuple(evictions), changed, cur_b, new_b, saving, move_bytes,
                    move_cost, bound_b, 0.0 if new_b <= 0 else (new_b - bound_b) / new_b, trimmed,
                    time.perf_counter() - t0, pb.state)


def _cost(member_LEG, problem, spec, cost_GG):
    """The solver's objective; by worker-to-worker flows when every expert has one copy (much cheaper)."""
    if (member_LEG.sum(-1) == 1).all():
        return total_cost(member_LEG.argmax(-1), problem.aff_PEE, cost_GG)
    return placement_cost(member_LEG, problem, spec)


def _copy_cost_LEG(cur_LEG, topo):
    """[L, E, G] crossing cost of bringing expert e of layer l to worker g from its nearest current copy."""
    if topo.num_nodes == 1:
        return (~cur_LEG).astype(np.float64)
    L, E, G = cur_LEG.shape
    on_node_LEN = cur_LEG.reshape(L, E, topo.num_nodes, topo.workers_per_node).any(-1)
    return np.where(cur_LEG, 0.0, np.where(on_node_LEN[..., topo.node_of_G], 1.0, topo.inter_node_cost))


def _moves(cur_LEG, new_LEG, cost_GG):
    """Copies (from the cheapest current holder) and evictions turning cur into new."""
    moves, evictions = [], []
    for l, e, g in np.argwhere(new_LEG & ~cur_LEG):
        holders = np.flatnonzero(cur_LEG[l, e])
        moves.append(Move(int(l), int(e), int(holders[np.argmin(cost_GG[holders, g])]), int(g)))
    for l, e, g in np.argwhere(cur_LEG & ~new_LEG):
        evictions.append((int(l), int(e), int(g)))
    return moves, evictions


def _trim(cur_LEG, new_LEG, problem, spec, cfg, copy_LEG):
    """Revert whole layers to the current placement, least net benefit per byte first, until the copies fit
    the budget. Returns (membership, layers reverted)."""
    out = new_LEG.copy()
    L = out.shape[0]
    topo = spec.topology
    copies_L = (out & ~cur_LEG).sum((1, 2))

    def score(l):   # (objective bytes lost over the window - move cost refunded) per copied byte
        lo, hi = max(l - 1, 0), min(l + 1, L - 1)
        seg = out[lo:hi + 1]
        back = seg.copy()
        back[l - lo] = cur_LEG[l]
        a = problem.aff_PEE[lo:hi]
        loss = float((a * pair_cost_PEE(back, topo)).sum() - (a * pair_cost_PEE(seg, topo)).sum())
        refund = cfg.expert_bytes * float(copy_LEG[l][out[l] & ~cur_LEG[l]].sum())
        return (loss * cfg.crossing_bytes * cfg.window_tokens - refund) / (cfg.expert_bytes * copies_L[l])

    scores = {int(l): score(l) for l in np.flatnonzero(copies_L)}
    trimmed = 0
    while cfg.expert_bytes * copies_L.sum() > cfg.byte_budget:
        pick = min(scores, key=scores.get)
        out[pick] = cur_LEG[pick]
        copies_L[pick] = 0
        del scores[pick]
        trimmed += 1
        for nb in (pick - 1, pick + 1):
            if nb in scores:
                scores[nb] = score(nb)
    return out, trimmed
