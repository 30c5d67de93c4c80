"""Online rebalancing decisions: live routing counts in, adopted placements out. Pure (no executor, no Ray).

What a serving loop calls: ``observe(experts_TLk)`` with the routing of the tokens it just served (workers record
the same as counts), and ``step()`` between engine steps or windows; ``step`` returns the Proposal to apply, or
None. Decisions:

- Counts are an exponentially forgetting sum (``decay`` per window) of per-layer loads and consecutive-layer
  transitions, started from a prior (the counts of the start-up trace, weighted as ``prior_windows`` windows) so a
  short window's noise does not look like drift (the prior weighs as ``prior_windows`` windows of the size of the
  first one observed).
- A re-solve (``placement.rebalance.propose``, warm from the current placement) is fitted on one half of the
  window's sequences plus the history and *validated* on the other half: the saving counted against the move cost
  is the smaller of the fitted and the held-out one. A warm search always finds a placement that fits its own
  counts better; only the held-out half says whether the gain is real (on a stationary workload it is ~0 and
  nothing moves; measured, adopting on the fitted saving alone made a 1024-token window's moves cost more than
  they saved).
- Adopted only when that saving over ``cfg.window_tokens`` tokens exceeds the move cost and, per token, is at least
  ``min_gain`` of the current placement's bytes per token; a proposal over the byte budget or infeasible under the
  balance cap is skipped and counted, and the current placement keeps serving. A caller whose move failed calls
  ``revert`` (the old placement is current again).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .affinity import affinity_from_counts
from .errors import PlacementError
from .evaluate import pair_cost_PEE
from .placement import Placement
from .policies import get_policy
from .rebalance import Move, Proposal, RebalanceConfig, propose
from .spec import PlaceSpec


def counts_of(experts_TLk: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(transitions [L-1, E, E] over all k x k pairs, loads [L, E]) of routed tokens ``experts_TLk``."""
    x = np.asarray(experts_TLk, dtype=np.int64)
    _, L, k = x.shape
    E = num_experts
    trans = np.zeros((L - 1, E, E))
    for l in range(L - 1):
        src = np.repeat(x[:, l, :], k, axis=1).ravel()
        dst = np.tile(x[:, l + 1, :], (1, k)).ravel()
        trans[l] = np.bincount(src * E + dst, minlength=E * E).reshape(E, E)
    load = np.stack([np.bincount(x[:, l].ravel(), minlength=E) for l in range(L)]).astype(np.float64)
    return trans, load


def bytes_per_token(placement: Placement, trans_PEE: np.ndarray, num_tokens: float, spec: PlaceSpec,
                    crossing_bytes: float) -> float:
    """Crossing bytes per token of ``placement`` under transition counts of ``num_tokens`` tokens."""
    cost = pair_cost_PEE(placement.membership_LEG(), spec.topology)
    return crossing_bytes * float((trans_PEE * cost).sum()) / max(num_tokens, 1e-9)


@dataclass
class OnlineRebalancer:
    current: Placement
    spec: PlaceSpec
    cfg: RebalanceConfig
    num_experts: int
    decay: float = 0.5
    prior: tuple | None = None          # (trans_PEE, load_LE, num_tokens) of the start-up trace
    prior_windows: float = 1.0
    min_gain: float = 0.0               # least saving per token adopted, as a fraction of the current bytes/token
    counters: dict = field(default_factory=lambda: {"proposals": 0, "adopted": 0, "not_worth": 0,
                                                    "over_budget": 0, "no_change": 0, "infeasible": 0,
                                                    "held_out_rejected": 0, "below_min_gain": 0, "reverted": 0,
                                                    "moves": 0, "bytes_moved": 0.0})
    last: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise PlacementError(f"rebalance decay must be in [0, 1), got {self.decay}")
        if not 0.0 <= self.min_gain < 1.0:
            raise PlacementError(f"rebalance min_gain must be in [0, 1), got {self.min_gain}")
        self._hist = None               # (trans, load, tokens) forgetting sum, windows before the current one
        self._win: list[np.ndarray] = []
        self._bound = None

    def observe(self, experts_TLk: np.ndarray):
        """Routing of tokens just served (one sequence or a batch of them: [T, L, k])."""
        self._win.append(np.asarray(experts_TLk))

    def _add(self, h, c):
        if h is None:
            return c
        d = self.decay
        return tuple(a * d + b for a, b in zip(h, c))

    def step(self) -> Proposal | None:
        """End of a window: decide on a re-solve; returns the adopted proposal (apply it) or None."""
        if not self._win:
            return None
        seqs, self._win = self._win, []
        E = self.num_experts
        def counts(part):
            return (*counts_of(np.concatenate(part), E), sum(len(s) for s in part))

        fit = counts(seqs[0::2])
        if len(seqs) > 1:
            val = counts(seqs[1::2])
            full = tuple(a + b for a, b in zip(fit, val))
        else:                           # one sequence: it is both the fit and the check
            val = full = fit
        if self._hist is None and self.prior is not None and self.prior_windows > 0:
            t, l, n = self.prior            # weighs as prior_windows windows of the size first seen
            scale = self.prior_windows * full[2] / max(n, 1)
            self._hist = (t * scale, l * scale, n * scale)
        fit_h = fit if self._hist is None else self._add(self._hist, fit)
        self._hist = full if self._hist is None else self._add(self._hist, full)
        self.counters["proposals"] += 1
        try:
            prop = propose(self.current, fit_h[0], fit_h[1], fit_h[2], self.spec, self.cfg, bound_state=self._bound)
        except PlacementError as e:     # e.g. one expert alone above the balance cap
            self.counters["infeasible"] += 1
            self.last = {"decision": "infeasible", "error": str(e)}
            return None
        self._bound = prop.bound_state
        cb = self.cfg.crossing_bytes
        held = (bytes_per_token(self.current, val[0], val[2], self.spec, cb)
                - bytes_per_token(prop.placement, val[0], val[2], self.spec, cb))
        saving = min(prop.saving_per_token, held) * self.cfg.window_tokens
        self.last = {"decision": prop.decision, "fitted_saving_per_token": prop.saving_per_token,
                     "held_out_saving_per_token": held, "move_bytes": prop.move_bytes, "moves": len(prop.moves)}
        if not prop.adopted:
            self.counters[prop.decision] += 1
            return None
        if saving <= prop.move_cost:
            self.counters["held_out_rejected"] += 1
            self.last["decision"] = "held_out_rejected"
            return None
        if min(prop.saving_per_token, held) < self.min_gain * prop.current_bytes_per_token:
            self.counters["below_min_gain"] += 1
            self.last["decision"] = "below_min_gain"
            return None
        self.counters["adopted"] += 1
        self.counters["moves"] += len(prop.moves)
        self.counters["bytes_moved"] += prop.move_bytes
        self.current = prop.placement
        return prop

    def revert(self, placement: Placement):
        """The adopted proposal was not applied (its move failed): ``placement`` serves again."""
        self.counters["reverted"] += 1
        self.current = placement


@dataclass(frozen=True)
class Adoption:
    """What ``LoadOnly.step`` adopts (the fields ``LiveRebalancer`` reads of a ``placement.rebalance.Proposal``)."""
    placement: object
    moves: tuple
    layers: tuple
    saving_per_token: float


class LoadOnly:
    """The EPLB-style baseline (``rebalance_options['policy'] = 'load_only'``): every window, DeepSeek EPLB's
    balanced packing of the window's loads (``policies.eplb``), adopted whatever it moves, unless
    its copies exceed the byte budget (skipped, counted). It ignores which experts a token visits in sequence."""

    def __init__(self, current, spec, cfg: RebalanceConfig, num_experts: int):
        self.current, self.spec, self.cfg, self.E = current, spec, cfg, num_experts
        self.counters = {k: 0 for k in ("proposals", "adopted", "not_worth", "no_change", "held_out_rejected",
                                        "below_min_gain", "infeasible", "over_budget", "reverted")}
        self._win: list[np.ndarray] = []

    def observe(self, experts_TLk):
        self._win.append(np.asarray(experts_TLk))

    def step(self):
        x, self._win = np.concatenate(self._win), []
        trans, load = counts_of(x, self.E)
        self.counters["proposals"] += 1
        new = get_policy("eplb")(affinity_from_counts(trans, load, len(x)), self.spec)
        cur, nw = self.current.membership_LEG(), new.membership_LEG()
        moves = tuple(Move(int(l), int(e), int(np.flatnonzero(cur[l, e])[0]), int(g))
                      for l, e, g in np.argwhere(nw & ~cur))
        if not moves:
            self.counters["no_change"] += 1
            return None
        if len(moves) * self.cfg.expert_bytes > self.cfg.byte_budget:
            self.counters["over_budget"] += 1
            return None
        cb = self.cfg.crossing_bytes
        saving = (bytes_per_token(self.current, trans, len(x), self.spec, cb)
                  - bytes_per_token(new, trans, len(x), self.spec, cb))
        self.counters["adopted"] += 1
        self.current = new
        return Adoption(new, moves, tuple(sorted({m.layer for m in moves})), saving)

    def revert(self, placement):
        self.counters["reverted"] += 1
        self.current = placement


__all__ = ["LoadOnly", "OnlineRebalancer", "RebalanceConfig", "bytes_per_token", "counts_of"]
