"""Serving metrics through ``prometheus_client``.

``ServingMetrics`` is updated from the engine thread and the server's event loop (prometheus_client's metrics
are thread-safe) and rendered by ``GET /metrics``: request counters (received, rejected, finished by reason),
prompt and generated token counters, time-to-first-token, time-per-output-token and end-to-end histograms, and
from the engine thread's latest stats snapshot: queue length, running and active requests, tokens/s, the engine's
state and restarts, and every numeric engine/executor stat as ``moeyard_engine_<name>`` — a counter (``_total``)
when it only grows (``COUNTER_STATS``: tokens, steps, seconds, hits and misses, ...), else a gauge.
"""

from __future__ import annotations

import re
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("starting", "ready", "degraded", "down")

# Engine/executor stats that only grow: exported as counters.
COUNTER_STATS = re.compile(r"^(tokens_generated|prompt_tokens|steps|ep_steps|ray_calls|model_seconds|bytes_loaded|"
                           r"reader_restarts|requests_(finished|aborted|failed))$|"
                           r"(_hits|_misses|_seconds|_loads|_reads|_evictions|_stalls|_steps|_bytes_read)$")


def metric_name(name: str) -> str:
    n = re.sub(r"[^a-zA-Z0-9_]", "_", str(name))
    if n and n[0].isdigit():
        n = "_" + n
    return "moeyard_engine_" + n


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested stats dicts become ``outer_inner`` keys (e.g. ``{"cache": {"hit_rate": .5}}`` -> ``cache_hit_rate``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "_"))
        else:
            out[key] = v
    return out


class _Snapshot:
    """A one-shot collector of the engine's latest stats."""

    def __init__(self, metrics: "ServingMetrics", stats: dict, age: float, health: dict | None):
        self.m, self.stats, self.age, self.health = metrics, stats, age, health

    def collect(self):
        s = self.stats
        g = GaugeMetricFamily("moeyard_tokens_per_second",
                              f"Generated tokens per second over the last {self.m.window:g} s.")
        g.add_metric([], self.m.tokens_per_second())
        yield g
        for name, key, help_ in (("moeyard_queue_length", "waiting", "Requests waiting for a KV slot."),
                                 ("moeyard_running", "running", "Sequences running (holding a KV slot)."),
                                 ("moeyard_active_requests", "active_requests", "Requests admitted, not finished.")):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], float(s.get(key, 0) or 0))
            yield g
        g = GaugeMetricFamily("moeyard_stats_age_seconds", "Age of the engine stats snapshot in these metrics.")
        g.add_metric([], self.age if self.age != float("inf") else -1.0)
        yield g
        if self.health is not None:
            g = GaugeMetricFamily("moeyard_engine_state", "1 for the engine's current state.", labels=["state"])
            for st in STATES:
                g.add_metric([st], 1.0 if self.health.get("status") == st else 0.0)
            yield g
            c = CounterMetricFamily("moeyard_engine_restarts", "Engine rebuilds after a failure.")
            c.add_metric([], float(self.health.get("restarts", 0)))
            yield c
        seen = set()
        for k, v in sorted(flatten(s).items()):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "active_requests":
                continue
            name = metric_name(k)
            if name in seen or name in ("moeyard_engine_state", "moeyard_engine_restarts"):
                continue
            seen.add(name)
            if COUNTER_STATS.search(k):
                fam = CounterMetricFamily(name, f"Engine/executor counter {k}.")
            else:
                fam = GaugeMetricFamily(name, f"Engine/executor stat {k}.")
            fam.add_metric([], float(v))
            yield fam


class ServingMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests: dict[str, int] = {}          # finish_reason -> count (also exported)
        self._received = Counter("moeyard_requests_received", "Requests accepted by the engine.", registry=r)
        self._rejected = Counter("moeyard_requests_rejected", "Requests refused (HTTP 4xx).", registry=r)
        self._finished = Counter("moeyard_requests_finished", "Requests finished, by finish reason.",
                                 ["finish_reason"], registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self._finished.labels(reason)
        self._prompt = Counter("moeyard_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self._gen = Counter("moeyard_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram("moeyard_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("moeyard_time_per_output_token_seconds",
                              "Mean time between output tokens of a request, after the first.", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("moeyard_e2e_request_latency_seconds", "Time from arrival to the end.",
                             buckets=E2E_BUCKETS, registry=r)
        self._recent: list[tuple[float, int]] = []   # (time, tokens) for the tokens/s gauge over a window
        self.window = 10.0

    # -- updates -------------------------------------------------------------------------------------------------
    @property
    def requests_received(self) -> int:
        return int(self._received._value.get())

    @property
    def requests_rejected(self) -> int:
        return int(self._rejected._value.get())

    def request_received(self):
        self._received.inc()

    def request_rejected(self):
        self._rejected.inc()

    def tokens(self, n: int, now: float | None = None):
        if n <= 0:
            return
        now = now or time.monotonic()
        self._gen.inc(n)
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def request_finished(self, reason: str, prompt_tokens: int, e2e: float, tpot: float | None):
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
        self._finished.labels(reason).inc()
        self._prompt.inc(prompt_tokens)
        self.e2e.observe(e2e)
        if tpot is not None:
            self.tpot.observe(tpot)

    def _trim(self, now):
        cut = now - self.window
        i = 0
        while i < len(self._recent) and self._recent[i][0] < cut:
            i += 1
        if i:
            del self._recent[:i]

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            n = sum(k for _, k in self._recent)
        span = min(self.window, max(time.time() - self.started, 1e-9))
        return n / span

    # -- rendering -----------------------------------------------------------------------------------------------
    def render(self, stats: dict | None = None, age: float = 0.0, health: dict | None = None) -> bytes:
        """The Prometheus text exposition of the counters and histograms plus ``stats`` (an engine snapshot)."""
        snap = CollectorRegistry(auto_describe=False)
        snap.register(_Snapshot(self, dict(stats or {}), age, health))
        return generate_latest(self.registry) + generate_latest(snap)
