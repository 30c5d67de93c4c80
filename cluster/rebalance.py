"""Online rebalancing in Ray mode: ``LLM(m, mode="ray", rebalance="periodic", rebalance_window=...)``.

Driver (``LiveRebalancer``, called by ``EPExecutor.execute`` around every step): each step's routing comes back
with the logits (the workers' top-k ids of the step's tokens, grouped per sequence slot); every
``rebalance_window`` routed tokens the window goes to ``placement.online.OnlineRebalancer`` (forgetting counts of
per-layer loads and consecutive-layer transitions from the model's start-up trace, a warm re-solve from the
serving placement with balance and replica constraints and the two-tier node cost, validated on held-out
sequences, adopted only when the saving pays for the moves) in a background thread, while requests keep running.
An adopted proposal is applied between engine steps: ``layers_per_step`` placement rows of expert copies per
step are *staged* on their new workers (``comm/moves.py``: one all-to-all of raw bytes, each copy's CRC checked
against its source's), then one *commit* between two steps makes every worker install its staged experts, drop
the ones it gave up and re-point its routing tables, all rows at once. Any failure before the commit aborts
every worker's staged copies: the old placement keeps serving, the rebalancer reverts, the failure is counted.
A proposal whose copies do not fit ``rebalance_byte_budget`` is skipped (counted) by the re-solve.

Worker (``ExpertMoves``, one per ``EPWorker``): ``stage`` / ``commit`` / ``abort`` / ``nbytes``.

Counters (``llm.stats()``, prefix ``rebalance_``): windows, resolves, adopted, applied (``moves``), experts moved,
bytes moved (sent between workers), skipped over budget, failed, the other decisions, and per applied move the
predicted saving (bytes/token on the window it was fitted on) and the measured one (bytes/token of the old minus
the new placement on the next window's live routing, which the re-solve never saw).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from ..comm.moves import checksum, from_bytes, send_experts, set_placement, to_bytes
from ..moe.errors import MoeyardError
from ..placement.online import LoadOnly, OnlineRebalancer, bytes_per_token, counts_of
from ..placement.rebalance import RebalanceConfig
from ..placement.spec import PlaceSpec

log = logging.getLogger(__name__)

REBALANCE = ("off", "periodic")
POLICIES = ("affinity", "load_only")


class MoveFailed(RuntimeError):
    """An expert copy did not arrive intact (its CRC differs from its source's)."""


@dataclass(frozen=True)
class RebalanceOptions:
    """Validated options; ``horizon`` (tokens a move's saving is counted over) defaults to 8 windows."""
    window: int = 1024
    min_gain: float = 0.0
    byte_budget: float = 64 * 2**20
    horizon: float | None = None
    layers_per_step: int = 2
    time_limit: float = 3.0
    decay: float = 0.5
    balance: float | None = 1.0
    nodes: int | None = None
    inter_node_cost: float = 4.0
    policy: str = "affinity"

    @classmethod
    def of(cls, window, min_gain, byte_budget, options: dict | None) -> "RebalanceOptions":
        """From ``rebalance_window``, ``rebalance_min_gain``, ``rebalance_byte_budget`` and ``rebalance_options``
        (the rest); a bad value raises MoeyardError naming its parameter."""
        opts = dict(options or {})
        names = {f for f in cls.__dataclass_fields__} - {"window", "min_gain", "byte_budget"}
        bad = sorted(set(opts) - names)
        if bad:
            raise MoeyardError(f"rebalance_options: unknown {bad}; valid: {sorted(names)}")

        def num(name, v, ok, what, integer=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
                    or not ok(v):
                raise MoeyardError(f"{name} must be {what}, got {v!r}")
            return v
        num("rebalance_window", window, lambda v: v >= 1, "a positive integer (routed tokens)", True)
        num("rebalance_min_gain", min_gain, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
        num("rebalance_byte_budget", byte_budget, lambda v: v >= 0, "a byte count >= 0")
        checks = {"horizon": (lambda v: v > 0, "> 0 (tokens)", False),
                  "layers_per_step": (lambda v: v >= 1, "a positive integer", True),
                  "time_limit": (lambda v: v > 0, "> 0 (seconds)", False),
                  "decay": (lambda v: 0 <= v < 1, "in [0, 1)", False),
                  "balance": (lambda v: v >= 0, ">= 0 or None", False),
                  "nodes": (lambda v: v >= 1, "a positive integer or None", True),
                  "inter_node_cost": (lambda v: v >= 1, ">= 1", False)}
        if opts.get("policy", "affinity") not in POLICIES:
            raise MoeyardError(f"rebalance_options['policy'] must be one of {', '.join(POLICIES)}, got "
                               f"{opts['policy']!r}")
        for k, v in opts.items():
            if k == "policy":
                continue
            ok, what, integer = checks[k]
            if v is not None or k not in ("horizon", "balance", "nodes"):
                num(f"rebalance_options['{k}']", v, ok, what, integer)
        return cls(window=window, min_gain=float(min_gain), byte_budget=float(byte_budget), **opts)


# -- worker side -------------------------------------------------------------------------------------------------

class ExpertMoves:
    """Expert copies received by one worker and not yet serving, until ``commit`` or ``abort``."""

    def __init__(self, worker):
        self.w = worker
        self.staged: dict = {}

    def _template(self):
        w = self.w
        for layer, es in w.local_experts.items():
            if es:
                return w.model.experts.stored(layer, es[0])
        raise RuntimeError(f"worker {w.rank} holds no expert")

    def nbytes(self) -> int:
        return int(to_bytes(self._template()).numel())

    def stage(self, copies: list[tuple], nbytes: int) -> dict:
        """Receive the copies ``(row, expert, src, dst)`` addressed here (every worker calls it with the same
        list); returns the bytes sent and the CRC of every copy sent and received."""
        w = self.w
        layers = [(w.moe_layers[r], e, s, d) for r, e, s, d in copies]
        got, sent = send_experts(w.ex.pg, w.rank, w.world, layers, w.model.experts.stored, nbytes,
                                 w.ex.timeout.total_seconds())
        crc_sent = {(w.layer_index[l], e): checksum(buf) for (l, e), buf in sent.items()}
        template = self._template()
        crc_recv = {}
        for (l, e), buf in got.items():
            self.staged[(l, e)] = from_bytes(template, buf, w.device)
            crc_recv[(w.layer_index[l], e)] = checksum(buf)
        n_sent = sum(1 for _, _, s, d in layers if s == w.rank and d != w.rank)
        return {"sent": n_sent * nbytes, "crc_sent": crc_sent, "crc_recv": crc_recv}

    def commit(self, placement, rows: list[int]) -> int:
        """Serve ``placement`` on placement rows ``rows``: install the staged experts, drop the ones this worker
        no longer holds, re-point the routing tables. Returns the experts installed."""
        w = self.w
        new_local = placement.local_experts(w.rank)
        install, drop = [], []
        for r in rows:
            layer = w.moe_layers[r]
            keep = set(new_local[r])
            for e in keep - set(w.local_experts[layer]):
                install.append((layer, e, self.staged[(layer, e)]))       # KeyError: a copy never staged
            drop.extend((layer, e) for e in set(w.local_experts[layer]) - keep)
        for layer, e, obj in install:
            w.model.experts.install(layer, e, obj)
        for layer, e in drop:
            w.model.experts.drop(layer, e)
        set_placement(w.model, placement, w.rank, w.layer_index, rows)
        w.placement = placement
        w.local_experts = {l: new_local[i] for i, l in enumerate(w.moe_layers)}
        self.staged.clear()
        return len(install)

    def abort(self) -> int:
        n = len(self.staged)
        self.staged.clear()
        return n


def worker_moves(worker) -> ExpertMoves:
    m = getattr(worker, "_moves", None)
    if m is None:
        m = worker._moves = ExpertMoves(worker)
    return m


# -- driver side -------------------------------------------------------------------------------------------------

class LiveRebalancer:
    """``after_step(plans, routing)`` records the step's routing; ``before_step()`` starts re-solves, stages and
    commits moves. ``call(op, args)`` calls ``move_experts(op, *args)`` on every worker (the transport)."""

    def __init__(self, call, placement, cfg, world: int, opts: RebalanceOptions, row_bytes: int,
                 prior: tuple | None, nodes: int = 1, on_commit=None):
        self.call, self.opts, self.serving, self.on_commit = call, opts, placement, on_commit
        self.nbytes = int(call("nbytes", [()] * world)[0])
        spec = PlaceSpec(world, nodes=nodes, balance=opts.balance, inter_node_cost=opts.inter_node_cost)
        self.rcfg = RebalanceConfig(window_tokens=opts.horizon or 8 * opts.window, byte_budget=opts.byte_budget,
                                    expert_bytes=self.nbytes, crossing_bytes=row_bytes / cfg.top_k,
                                    time_limit=opts.time_limit)
        if opts.policy == "affinity":
            self.online = OnlineRebalancer(placement, spec, self.rcfg, cfg.num_experts, decay=opts.decay,
                                           prior=prior, min_gain=opts.min_gain)
        else:
            self.online = LoadOnly(placement, spec, self.rcfg, cfg.num_experts)
        self.spec, self.world, self.E = spec, world, cfg.num_experts
        self._seqs: dict[int, list[np.ndarray]] = {}
        self._tokens = 0
        self._thread: threading.Thread | None = None
        self._result: dict = {}
        self._pending = None             # (proposal, old placement, rows left to stage, all rows, results)
        self._measure = None             # (old, new) placements of the last applied move, measured next window
        self.counters = {"windows": 0, "moves": 0, "experts_moved": 0, "bytes_moved": 0, "failed": 0, "errors": 0}
        self.predicted: list[float] = []
        self.measured: list[float] = []
        self.last_error: str | None = None

    # -- engine thread ---------------------------------------------------------------------------------------
    def after_step(self, plans, routing):
        for plan, r in zip(plans, routing):
            rows, pos = np.asarray(r), 0
            for it in plan:
                n = len(it.token_ids)
                self._seqs.setdefault(it.slot, []).append(rows[pos:pos + n])
                pos += n
                self._tokens += n
        if self._tokens >= self.opts.window and self._thread is None and self._pending is None:
            self._start_resolve()

    def _start_resolve(self):
        seqs = [np.concatenate(v) for v in self._seqs.values()]
        self._seqs, self._tokens = {}, 0
        self.counters["windows"] += 1
        if self._measure is not None:    # the last applied move, on routing it was not fitted on
            old, new = self._measure
            trans, _ = counts_of(np.concatenate(seqs), self.E)
            n = sum(len(s) for s in seqs)
            cb = self.rcfg.crossing_bytes
            self.measured.append(bytes_per_token(old, trans, n, self.spec, cb)
                                 - bytes_per_token(new, trans, n, self.spec, cb))
            self._measure = None
        for s in seqs:
            self.online.observe(s)
        self._result = {}

        def run():
            try:
                self._result["proposal"] = self.online.step()
            except Exception as exc:  # noqa: BLE001 — a failed re-solve must not stop serving
                self._result["error"] = exc
        self._thread = threading.Thread(target=run, name="moeyard-rebalance", daemon=True)
        self._thread.start()

    def before_step(self):
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            if "error" in self._result:
                self.counters["errors"] += 1
                self.last_error = repr(self._result["error"])
                log.warning("online rebalancing: the re-solve failed: %s", self.last_error)
            elif self._result.get("proposal") is not None:
                prop = self._result["proposal"]
                rows = [int(r) for r in prop.layers]
                self._pending = (prop, self.serving, list(rows), rows, [])
        if self._pending is not None:
            self._advance()

    def _advance(self):
        prop, old, left, rows, results = self._pending
        try:
            if left:
                chunk, left[:] = left[:self.opts.layers_per_step], left[self.opts.layers_per_step:]
                copies = [(m.layer, m.expert, m.src, m.dst) for m in prop.moves if m.layer in chunk]
                if copies:
                    res = self.call("stage", [(copies, self.nbytes)] * self.world)
                    _check_copies(copies, res)
                    results.extend(res)
                return
        except Exception as exc:  # noqa: BLE001 — any failure before the commit: the old placement serves on
            self._abort(old, exc)
            return
        self.call("commit", [(prop.placement, rows)] * self.world)   # local on every worker, no collective
        self.serving, self._pending, self._measure = prop.placement, None, (old, prop.placement)
        self.counters["moves"] += 1
        self.counters["experts_moved"] += len(prop.moves)
        self.counters["bytes_moved"] += sum(r["sent"] for r in results)
        self.predicted.append(prop.saving_per_token)
        if self.on_commit is not None:
            self.on_commit(prop.placement)

    def _abort(self, old, exc):
        self._pending = None
        self.counters["failed"] += 1
        self.last_error = repr(exc)
        log.warning("online rebalancing: expert move failed, the old placement keeps serving: %r", exc)
        self.online.revert(old)
        self.call("abort", [()] * self.world)

    def stats(self) -> dict:
        d = {f"rebalance_{k}": v for k, v in self.counters.items()}
        oc = self.online.counters
        d.update({f"rebalance_{k}": oc[k] for k in ("proposals", "adopted", "not_worth", "no_change",
                                                     "held_out_rejected", "below_min_gain", "infeasible")})
        d["rebalance_skipped_over_budget"] = oc["over_budget"]
        d["rebalance_predicted_saving"] = list(self.predicted)
        d["rebalance_measured_saving"] = list(self.measured)
        d["rebalance_pending"] = self._pending is not None or self._thread is not None
        return d

    def close(self):
        if self._thread is not None:
            self._thread.join(self.opts.time_limit * 2 + 5)


def _check_copies(copies, results):
    for r, e, src, dst in copies:
        if src == dst:
            continue
        a, b = results[src]["crc_sent"].get((r, e)), results[dst]["crc_recv"].get((r, e))
        if a is None or a != b:
            raise MoveFailed(f"expert {e} of MoE layer {r}: copy from worker {src} to {dst} arrived corrupted "
                             f"(CRC {b} vs {a})")


def enable(ex, placement, cfg, opts: RebalanceOptions, row_bytes: int, prior: tuple | None, nodes: int = 1):
    """Attach a LiveRebalancer to the executor ``ex`` (its transport carries the moves)."""
    def call(op, args):
        return ex.transport.call_all("move_experts", [(op, *a) for a in args], f"expert move ({op})")

    def on_commit(p):
        ex.placement_info["placement_record"] = p
        ex.placement_info["holders"] = [[list(p.workers_of(i, e)) for e in range(p.num_experts)]
                                        for i in range(p.num_layers)]
    ex.rebalancer = LiveRebalancer(call, placement, cfg, ex.world, opts, row_bytes, prior, nodes, on_commit)
    return ex.rebalancer


def check_rebalance(rebalance, ep_scheme: str, speculative_shuffle: bool, num_workers, window, min_gain,
                    byte_budget, options) -> RebalanceOptions | None:
    """Ray mode's rebalance options, checked before any actor starts; None when off."""
    if rebalance not in REBALANCE:
        raise MoeyardError(f"rebalance must be one of {', '.join(REBALANCE)}, got {rebalance!r}")
    if rebalance == "off":
        return None
    if ep_scheme not in ("standard", "coherent"):
        raise MoeyardError(f"rebalance='periodic' needs ep_scheme 'standard' or 'coherent', got {ep_scheme!r}")
    if speculative_shuffle:
        raise MoeyardError("rebalance='periodic' and speculative_shuffle=True cannot be combined (the planner "
                           "predicts from a fixed placement)")
    if isinstance(num_workers, int) and num_workers < 2:
        raise MoeyardError(f"rebalance='periodic' needs num_workers >= 2, got {num_workers}")
    return RebalanceOptions.of(window, min_gain, byte_budget, options)


def nodes_of(node_ids: list[str]) -> int:
    """Nodes of the two-tier cost: distinct Ray nodes when ranks fill them in equal contiguous blocks, else 1."""
    G, names = len(node_ids), list(dict.fromkeys(node_ids))
    N = len(names)
    if G % N == 0 and all(node_ids[g] == names[g // (G // N)] for g in range(G)):
        return N
    log.warning("online rebalancing: workers are not laid over nodes in equal contiguous blocks (%s); the "
                "re-solve prices every crossing alike", node_ids)
    return 1


def start_rebalance(ex, ctx, placement, trace, opts: RebalanceOptions):
    """``enable`` for a Ray-mode executor: the prior from the model's trace, nodes from the worker group."""
    from ..moe.loader import resolve_dtype
    from ..placement.affinity import expert_load, transition_counts
    prior = None if trace is None else (transition_counts(trace), expert_load(trace), trace.num_tokens)
    nodes = opts.nodes or nodes_of(ex.group.node_ids)
    dtype = resolve_dtype(ctx.dtype, ctx.cfg, ctx.device)
    row_bytes = ctx.cfg.hidden_size * dtype.itemsize
    enable(ex, placement, ctx.cfg, opts, row_bytes, prior, nodes)
    ex.placement_info["rebalance"] = "periodic"
