"""Speculative token shuffling, form 1: request placement for data-parallel attention (driver side).

New sequences are placed on the worker holding the experts their tokens are predicted to use, running ones move
(with their cache) when the predicted saving pays for the bytes; a wrong prediction costs only locality, never
output (docs/CLUSTER.md, "Inside the code").
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from ..comm.exchange import INT_BYTES
from ..comm.schemes import get_scheme, refuse_hybrid
from ..comm.tp import COUNTERS, spec_stats
from ..moe.errors import MoeyardError, check_options
from ..moe.predictors import TokenTablePredictor, token_table_problem, trace_tokens
from ..runtime.executor import StepItem
from .calibrate import calibrate, plan_routing
from .partition import home_of, merge_logits, partition

log = logging.getLogger(__name__)


OPTIONS = ("max_moves", "horizon", "slack", "history", "ema", "place_new", "move", "calibration_tokens")


def check_config(scheme: str, cfg, world: int, shuffle: bool = False, options: dict | None = None):
    """The scheme object of ``ep_scheme=scheme`` for ``cfg`` on ``world`` workers, with speculative shuffling and
    its options checked (form 2 takes the scheme's options, form 1 this planner's); MoeyardError naming both."""
    s = get_scheme(scheme, cfg, world)
    if shuffle:
        refuse_hybrid(cfg, "speculative_shuffle=True moves sequences (their KV caches) between workers",
                      "speculative_shuffle=False")
    if shuffle and world < 2:
        raise MoeyardError(f"speculative_shuffle=True needs num_workers >= 2 (got {world}): with one worker every "
                           f"expert is already local")
    check_options(options, s.shuffle_options if s.spec_form == 2 else OPTIONS,
                  f"shuffle_options of ep_scheme={scheme!r} (speculative shuffling form {s.spec_form})")
    return s


def pick(score_G: torch.Tensor, count: list[int], cap: int) -> int:
    """The best-scoring worker with room (``count[g] < cap``); the last one ranked when none has room."""
    for g in torch.argsort(score_G, descending=True, stable=True).tolist():
        if count[g] < cap:
            break
    return g


class SpecShuffler:
    """The speculative request planner (form 1): ``plan`` places and moves sequences, ``feed`` learns."""

    def __init__(self, cfg, placement, world: int, dtype=torch.float32, max_moves: int = 2, horizon: float = 16.0,
                 slack: int = 1, history: float = 0.5, ema: float = 0.3, place_new: bool = True,
                 move: bool = True, calibration_tokens: int = 2048, replicated_kv: bool = False):
        self.cfg, self.world = cfg, world
        self.L, self.E, self.K = len(cfg.moe_layers), cfg.num_experts, cfg.top_k
        self.hold = torch.from_numpy(placement.membership_LEG()).float()   # [L, E, G] 1 = worker g holds e
        elem = torch.tensor([], dtype=dtype).element_size()
        # standard scheme, per remote (token, expert) pair: hidden row + expert id out, hidden row back
        self.remote_bytes = 2 * cfg.hidden_size * elem + INT_BYTES
        hk, dk, hv, dv = cfg.kv_shape
        # + a slot/pos meta row; nothing when every worker holds every cache (coherent scheme)
        self.kv_bytes_per_position = 0 if replicated_kv else cfg.num_layers * (hk * dk + hv * dv) * elem + 2 * INT_BYTES
        self.max_moves, self.horizon, self.slack = max_moves, horizon, slack
        self.history, self.ema_rate = history, ema
        self.place_new, self.move = place_new, move
        self.calibration_tokens = calibration_tokens
        self.table = TokenTablePredictor(cfg.vocab_size, cfg.moe_layers, self.E, self.K)
        self.table_source = "empty"
        self.where: dict[int, int] = {}          # slot -> worker holding its KV
        self.ema: dict[int, torch.Tensor] = {}   # slot -> [G] recent local (token, expert) pairs per worker
        self.moves = self.moved_positions = 0
        self.c = {k: torch.zeros(self.L, dtype=torch.float64) for k in COUNTERS}   # per MoE layer, as form 2's

    # -- predictions --------------------------------------------------------------------------------------------
    def expert_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L, E] predicted routing distribution per MoE layer from the token-identity table."""
        self.table.begin(tokens)
        return torch.stack([self.table.scores(l, 0) for l in self.cfg.moe_layers], 1)

    def expected_local(self, P_NLE: torch.Tensor) -> torch.Tensor:
        """[N, G] expected (token, expert) pairs served locally (all MoE layers) if the token runs on worker g."""
        return self.K * torch.einsum("nle,leg->ng", P_NLE, self.hold)

    # -- table ----------------------------------------------------------------------------------------------------
    def load_table(self, trace: dict | None, step_fn, tokenizer=None, max_num_seqs: int = 8,
                   max_model_len: int = 256):
        """Seed the token-identity table from ``trace`` (``experts[T, L, k]`` + token ids); if it is missing or
        does not match the model, rebuild it from a calibration prefill on the workers, with a warning."""
        problem = token_table_problem(trace, self.cfg)
        if problem is None:
            self.table = TokenTablePredictor(self.cfg.vocab_size, self.cfg.moe_layers, self.E, self.K, trace=trace)
            self.table_source = f"trace.npz ({len(trace_tokens(trace))} tokens)"
            return
        msg = (f"speculative shuffling: {problem}; rebuilding the token-identity table from a calibration run "
               f"(predictions are weaker than from the model's routing trace)")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        tok, rt = calibrate(step_fn, self.world, self.cfg, tokenizer, self.calibration_tokens, max_model_len,
                            max_num_seqs)
        self._learn(tok, rt)
        self.table_source = f"calibration run ({len(tok)} tokens)"

    def _learn(self, tok, rt):
        if len(tok):
            self.table.begin(tok)
            for i, l in enumerate(self.cfg.moe_layers):
                self.table.observe(l, None, rt[:, i])

    # -- placement ------------------------------------------------------------------------------------------------
    def free(self, slot: int):
        self.where.pop(slot, None)
        self.ema.pop(slot, None)

    def plan(self, items: list[StepItem]) -> tuple[dict, list]:
        G = self.world
        new = [it for it in items if it.start == 0]
        for it in new:
            self.free(it.slot)
        for it in items:                                  # sequences never placed here: default home
            if it.start > 0 and it.slot not in self.where:
                self.where[it.slot] = home_of(it.slot, G)
        count = [list(self.where.values()).count(g) for g in range(G)]
        cap = math.ceil((len(self.where) + len(new)) / G) + self.slack
        score = [self.expected_local(self.expert_probs(torch.tensor(it.token_ids))).sum(0) if self.place_new
                 else None for it in new]
        for it, s in sorted(zip(new, score), key=lambda p: 0.0 if p[1] is None else -float(p[1].max() - p[1].min())):
            g = home_of(it.slot, G) if s is None else pick(s, count, cap)    # largest margin chooses first
            self.where[it.slot] = g
            count[g] += 1
        moves = []
        dec = [it for it in items if it.start > 0 and len(it.token_ids) == 1]
        if self.move and dec and self.max_moves > 0:
            nxt = self.expected_local(self.expert_probs(torch.tensor([it.token_ids[0] for it in dec])))
            cands = []
            for it, p in zip(dec, nxt):
                h = self.ema.get(it.slot)
                pred = p if h is None else (1 - self.history) * p + self.history * h
                w = self.where[it.slot]
                net = (pred - pred[w]) * self.remote_bytes * self.horizon - it.start * self.kv_bytes_per_position
                g = int(torch.argmax(net))
                if g != w and float(net[g]) > 0:
                    cands.append((float(net[g]), it, net))
            for _, it, net in sorted(cands, key=lambda c: -c[0]):
                if len(moves) >= self.max_moves:
                    break
                w = self.where[it.slot]
                g = pick(net, count, cap)            # w and every worker after it in the ranking gain nothing
                if g == w or float(net[g]) <= 0:
                    continue
                moves.append((it.slot, w, g, it.start))
                count[w] -= 1
                count[g] += 1
                self.where[it.slot] = g
                self.moves += 1
                self.moved_positions += it.start
        return {it.slot: self.where[it.slot] for it in items}, moves

    # -- feedback -------------------------------------------------------------------------------------------------
    def feed(self, plans, routing):
        tok, sw, rt = plan_routing(plans, routing, self.L, self.K)
        N = len(tok)
        if not N:
            return
        P = self.expert_probs(tok)                                          # predictions made before learning
        pred = torch.topk(P, self.K, dim=-1).indices                        # [N, L, K]
        c = self.c
        c["pred_hits"] += (pred[:, :, :, None] == rt[:, :, None, :]).any(-1).sum((0, 2))
        pw = torch.einsum("nle,leg->nlg", P, self.hold).argmax(-1)         # [N, L] predicted worker per layer
        c["worker_hits"] += self.hold[torch.arange(self.L)[None, :], rt[:, :, 0], pw].sum(0)
        held = self.hold[torch.arange(self.L)[None, :, None], rt]           # [N, L, K, G]
        c["local_pairs"] += held[torch.arange(N), :, :, torch.tensor([g for _, g in sw])].sum((0, 2))
        c["tokens"] += N
        c["pairs"] += N * self.K
        self._learn(tok, rt)
        loc = held.sum((1, 2))                                              # [N, G] local pairs if run on g
        per_slot: dict[int, list] = {}
        for i, (s, _) in enumerate(sw):
            per_slot.setdefault(s, []).append(i)
        for s, idx in per_slot.items():
            v = loc[idx].mean(0)
            h = self.ema.get(s)
            self.ema[s] = v if h is None else (1 - self.ema_rate) * h + self.ema_rate * v

    def execute(self, items: list[StepItem], step_fn) -> torch.Tensor:
        home, moves = self.plan(items)
        plans, where, max_len = partition(items, self.world, home)
        n = [sum(len(it.token_ids) for it in p) for p in plans]
        self.c["busiest"] += max(n)                   # every MoE layer of the step runs where its tokens are
        self.c["even"] += sum(n) / self.world
        outs, routing = step_fn(plans, max_len, moves, True)
        self.feed(plans, routing)
        return merge_logits(outs, where)

    def stats(self) -> dict:
        return {"shuffle_moves": self.moves, "shuffle_moved_positions": self.moved_positions,
                **spec_stats({k: v.tolist() for k, v in self.c.items()})}
