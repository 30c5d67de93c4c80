"""Which predicted experts are worth reading: a confidence gate and a byte budget for prefetches.

A prefetch pays for itself when it is right (its read is hidden behind compute) and costs when it is wrong (disk
time taken from the reads that are needed, and a slot). With experts of megabytes a wrong read costs as much as a
right one saves, so prediction that reads its whole guess loses to plain on-demand loading (measured on the
352 MB-expert replay). The gate therefore learns, online, how often each *rank* of each kind of prediction is right
— rank r of a layer's ranked guess, from the step-start table (``ahead`` 0) or from the refinement one MoE layer
before (``ahead`` 1), per batch-size class — and lets the executor read only the ranks whose measured precision is
at least ``min_p``; the rest of the guess still protects resident experts from eviction (prediction-aware
eviction costs no reads). Precision starts at the prior 1/2 and moves with the evidence (a Beta(1, 1) estimate
with exponential forgetting, so it follows a drifting workload).

The byte budget caps the reads a layer may start to what the disk can deliver in the time of about
``budget_layers`` layers of compute (measured online: read bandwidth from the tier, layer time from the route
hooks), so prefetches never queue up behind each other past the point where they could arrive in time.
"""

from __future__ import annotations

import time


def batch_class(n: int) -> int:
    """0: one token, 1: 2-4, 2: 5-16, 3: more (a rank's precision depends strongly on how many tokens vote)."""
    return 0 if n <= 1 else 1 if n <= 4 else 2 if n <= 16 else 3


class PrefetchGate:
    def __init__(self, min_p: float = 0.5, decay: float = 0.995, budget_layers: float = 8.0):
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        self.min_p, self.decay, self.budget_layers = float(min_p), float(decay), float(budget_layers)
        self._stats: dict[tuple[int, int, int], list[float]] = {}    # (ahead, batch class, rank) -> [right, seen]
        self._layer_s = None            # EMA of one MoE layer's compute time (s)
        self._last = None
        self.counters = {"gated_out": 0}

    # ---- learning ------------------------------------------------------------------------------------------------
    def record(self, ahead: int, n_tokens: int, ranked: list[int], actual: set[int]):
        """A prediction ``ranked`` (best first) made ``ahead`` MoE layers early for ``n_tokens`` tokens met the
        layer's ``actual`` experts."""
        c, d = batch_class(n_tokens), self.decay
        for r, e in enumerate(ranked):
            s = self._stats.setdefault((min(ahead, 1), c, r), [0.0, 0.0])
            s[0] = s[0] * d + (e in actual)
            s[1] = s[1] * d + 1.0

    def precision(self, ahead: int, n_tokens: int, rank: int) -> float:
        s = self._stats.get((min(ahead, 1), batch_class(n_tokens), rank))
        return 0.5 if s is None else (s[0] + 1.0) / (s[1] + 2.0)

    def allowed(self, ahead: int, n_tokens: int, ranked: list[int]) -> list[int]:
        """The prefix of ``ranked`` worth reading (precision falls with rank; the first rank below ``min_p`` ends
        it)."""
        for r in range(len(ranked)):
            if self.precision(ahead, n_tokens, r) < self.min_p:
                self.counters["gated_out"] += len(ranked) - r
                return ranked[:r]
        return ranked

    # ---- byte budget ---------------------------------------------------------------------------------------------
    def layer_tick(self, stall_s: float):
        """Called at every MoE layer's routing with the cumulative stall time: learns a layer's compute time."""
        now = time.perf_counter()
        if self._last is not None:
            dt = max(0.0, now - self._last[0] - (stall_s - self._last[1]))
            self._layer_s = dt if self._layer_s is None else 0.9 * self._layer_s + 0.1 * dt
        self._last = (now, stall_s)

    def step_break(self):
        """Between steps the clock stops (sampling, scheduling): the next layer interval is not one of compute."""
        self._last = None

    def max_loads(self, read_bps: float, slot_bytes: int) -> int | None:
        """Prefetches that may be in flight (None: no limit, or none known yet)."""
        if not self.budget_layers or self._layer_s is None or read_bps <= 0 or slot_bytes <= 0:
            return None
        return max(1, int(read_bps * self._layer_s * self.budget_layers / slot_bytes))

    def stats(self) -> dict:
        d = dict(self.counters)
        d["gate_min_p"] = self.min_p
        d["gate_layer_ms"] = None if self._layer_s is None else round(self._layer_s * 1e3, 3)
        for (a, c, r), (right, seen) in sorted(self._stats.items()):
            if r < 4 and c == 0:
                d[f"gate_precision_ahead{a}_rank{r}"] = round((right + 1) / (seen + 2), 3)
        return d
