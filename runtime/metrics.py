"""Serving metrics in the Prometheus text exposition format (no client library needed).

``ServingMetrics`` is updated from the engine thread and from the server's event loop (a lock guards it) and
rendered by ``GET /metrics``: request counters, queue length, time-to-first-token and time-per-output-token
histograms, tokens/s, and every numeric engine/executor ``stats()`` value as a gauge ``moeyard_<name>``.
"""

from __future__ import annotations

import math
import re
import threading
import time

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float):
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.count += 1


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def metric_name(name: str) -> str:
    n = re.sub(r"[^a-zA-Z0-9_]", "_", str(name))
    if n and n[0].isdigit():
        n = "_" + n
    return "moeyard_" + n


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


class ServingMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = {}                 # finish_reason -> count
        self.requests_received = 0
        self.requests_rejected = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._recent: list[tuple[float, int]] = []   # (time, tokens) for the tokens/s gauge over a window
        self.window = 10.0

    # -- updates -------------------------------------------------------------------------------------------------
    def request_received(self):
        with self._lock:
            self.requests_received += 1

    def request_rejected(self):
        with self._lock:
            self.requests_rejected += 1

    def tokens(self, n: int, now: float | None = None):
        if n <= 0:
            return
        now = now or time.monotonic()
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            self._trim(now)

    def first_token(self, seconds: float):
        with self._lock:
            self.ttft.observe(seconds)

    def request_finished(self, reason: str, prompt_tokens: int, e2e: float, tpot: float | None):
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
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
    def render(self, gauges: dict | None = None) -> str:
        out: list[str] = []

        def head(name, kind, help_):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("moeyard_requests_received_total", "counter", "Requests accepted by the server.")
            out.append(f"moeyard_requests_received_total {self.requests_received}")
            head("moeyard_requests_rejected_total", "counter", "Requests rejected as invalid (HTTP 400).")
            out.append(f"moeyard_requests_rejected_total {self.requests_rejected}")
            head("moeyard_requests_finished_total", "counter", "Requests finished, by finish reason.")
            for r in sorted(set(self.requests) | {"stop", "length", "abort", "error"}):
                out.append(f'moeyard_requests_finished_total{{finish_reason="{r}"}} {self.requests.get(r, 0)}')
            head("moeyard_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
            out.append(f"moeyard_prompt_tokens_total {self.prompt_tokens}")
            head("moeyard_generation_tokens_total", "counter", "Generated tokens.")
            out.append(f"moeyard_generation_tokens_total {self.generation_tokens}")
            for name, h, help_ in (
                    ("moeyard_time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
                    ("moeyard_time_per_output_token_seconds", self.tpot,
                     "Mean time between output tokens of a request, after the first."),
                    ("moeyard_e2e_request_latency_seconds", self.e2e, "Time from arrival to the end.")):
                head(name, "histogram", help_)
                acc = 0
                for b, c in zip(self.buckets_of(h), h.counts):
                    acc += c
                    out.append(f'{name}_bucket{{le="{b}"}} {acc}')
                out.append(f"{name}_sum {_fmt(float(h.sum))}")
                out.append(f"{name}_count {h.count}")
        head("moeyard_tokens_per_second", "gauge", f"Generated tokens per second over the last {self.window:g} s.")
        out.append(f"moeyard_tokens_per_second {_fmt(float(self.tokens_per_second()))}")
        seen = {"moeyard_tokens_per_second"}
        for k, v in sorted(flatten(gauges or {}).items()):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            name = metric_name(k)
            if name in seen or name.endswith("_total") or name.startswith("moeyard_requests_"):
                name = name + "_engine"
            if name in seen:
                continue
            seen.add(name)
            head(name, "gauge", f"Engine/executor stat {k}.")
            out.append(f"{name} {_fmt(v)}")
        return "\n".join(out) + "\n"

    @staticmethod
    def buckets_of(h: Histogram):
        return [_fmt(float(b)) for b in h.buckets] + ["+Inf"]
