"""An embeddable asyncio engine: ``AsyncLLM`` runs an ``LLM``'s engine on a background thread.

    llm = AsyncLLM.from_model("default", mode="local", max_num_seqs=64)
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.text, end="")          # incremental: new token ids, text delta, logprobs; finish_reason at the end
    llm.shutdown()

Threading: every call into the ``Engine`` (add, abort, step, stats) happens on the engine thread. Other threads
and event loops talk to it through a command queue guarded by a condition variable; results travel back to each
request's event loop with ``loop.call_soon_threadsafe``. The thread runs ``engine.step()`` continuously while
there is work (concurrent requests are batched by the engine's continuous batching) and sleeps otherwise.

Streams: a request's text deltas hold back a trailing partial UTF-8 character and any suffix that could start a
stop string, so the concatenated deltas equal the final (non-streamed) text. A consumer that stops iterating
(a client that disconnects) aborts its request, which frees its KV slot. An error in one request reaches that
request only (``finish_reason == "error"``, ``error`` set).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from .metrics import ServingMetrics
from .sampling import RequestError, SampleResult, SamplingParams

log = logging.getLogger("moeyard")


class EngineDeadError(RuntimeError):
    """The engine is not serving (shut down, restarting after a failure, or down); no new requests are accepted."""

    retry_after: float | None = None     # seconds a client should wait (set while the engine restarts)


class QueueFullError(EngineDeadError):
    """More requests are queued than ``max_queued`` allows; the client should retry later (HTTP 429)."""

    retry_after = 1.0


def _settle(fut: concurrent.futures.Future, result=None, exc: BaseException | None = None):
    """Answer ``fut`` unless its caller gave up on it (cancelled: a timed-out ``stats()``, a client that left);
    answering a cancelled future raises ``InvalidStateError``, which used to kill the engine thread."""
    try:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass
class StreamOutput:
    """One increment of a request's output."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                        # new token ids since the previous output
    text: str                                   # new text since the previous output
    logprobs: list[SampleResult] = field(default_factory=list)   # for the new tokens (when asked for)
    finish_reason: str | None = None            # set once, on the last output: stop | length | abort | error
    error: str | None = None
    num_generated: int = 0                      # tokens generated so far (cumulative)
    prompt_logprobs: list | None = None         # on the last output, when asked for (None, then SampleResults)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStream:
    """Async iterator over one request's ``StreamOutput``s; ends after the output carrying ``finish_reason``."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, params: SamplingParams,
                 timeout: float | None = None, on_timeout=None):
        self.request_id = request_id
        self.loop = loop
        self.params = params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.timeout = timeout                     # seconds from submission (the per-request deadline)
        self.deadline = time.monotonic() + timeout if timeout else None
        self._on_timeout = on_timeout
        # engine-thread bookkeeping
        self.n_tokens = 0
        self.n_logprobs = 0
        self.n_text = 0
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the consumer's loop is closed: nobody is listening any more
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamOutput:
        if self.finished:
            raise StopAsyncIteration
        if self.deadline is None:
            item = await self.queue.get()
        else:
            try:
                item = await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                # The deadline passed (a stalled step, a hung reader or worker): end the stream now, even if the
                # engine thread is stuck, and ask the engine to fail the request once it can.
                self.finished = True
                msg = (f"the request did not finish within its deadline of {self.timeout:g} s "
                       "(request_timeout)")
                if self._on_timeout is not None:
                    self._on_timeout(self.request_id, msg)
                return StreamOutput(self.request_id, [], [], "", [], "error", msg)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


def _safe_text_end(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of ``text`` that can be streamed now: no trailing U+FFFD (an incomplete UTF-8
    character) and no suffix that is a proper prefix of a stop string (it may still become one)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold


class AsyncLLM:
    """Wrap an ``LLM`` (or anything with ``.engine`` and ``.close()``) with a background engine thread.

    Options: ``max_queued`` requests may wait beyond the ``max_num_seqs`` that run (more are refused with
    ``QueueFullError``); ``request_timeout`` seconds end a request that has not finished (``None``: no deadline);
    ``max_restarts`` rebuilds (``llm.restart()``, after ``restart_backoff`` s, doubling up to 30 s) when the
    engine fails: its thread raising, or its executor reporting itself ``broken`` (a dead Ray worker). Past the
    limit the engine is ``down``. ``health()`` says which state it is in: starting, ready, degraded (restarting)
    or down.
    """

    def __init__(self, llm, metrics: ServingMetrics | None = None, idle_wait: float = 1.0,
                 max_queued: int = 256, request_timeout: float | None = None, max_restarts: int = 5,
                 restart_backoff: float = 1.0, stats_interval: float = 0.5):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = getattr(llm, "tokenizer", None)
        self.max_model_len = getattr(llm, "max_model_len", getattr(self.engine, "max_model_len", None))
        self.metrics = metrics or ServingMetrics()
        sched = getattr(self.engine, "scheduler", None)
        self.max_num_seqs = getattr(sched, "max_num_seqs", 0) or 0
        if not isinstance(max_queued, int) or max_queued < 0:
            raise ValueError(f"max_queued must be a non-negative integer, got {max_queued!r}")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive seconds or None, got {request_timeout!r}")
        self.max_queued = max_queued
        self.request_timeout = request_timeout
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.stats_interval = stats_interval
        self._cv = threading.Condition()
        self._cmds: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}        # engine thread only
        self._pending = 0                                   # admitted + submitted, not finished (under _cv)
        self._stopping = False
        self._dead: str | None = None
        self._state = "starting"
        self._last_error: str | None = None
        self.restarts = 0
        self._idle_wait = idle_wait
        self._last_stats: dict = {}
        self._stats_time = 0.0
        self._thread = threading.Thread(target=self._run, name="moeyard-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str = "default", mode: str = "local", **kw) -> "AsyncLLM":
        from .llm import LLM
        own = {k: kw.pop(k) for k in ("max_queued", "request_timeout", "max_restarts", "restart_backoff")
               if k in kw}
        return cls(LLM(model, mode=mode, **kw), **own)

    # -- public API (any thread / event loop) --------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                          request_id: str | None = None, prompt_token_ids: list[int] | None = None
                          ) -> RequestStream:
        """Submit a request; return its stream once the engine accepted it (raises ``RequestError`` if not,
        ``QueueFullError`` when the queue is full, ``EngineDeadError`` when the engine is not ready)."""
        if isinstance(prompt, (list, tuple)):
            prompt, prompt_token_ids = None, list(prompt)
        return (await self.add_requests([(prompt, prompt_token_ids, params, request_id)]))[0]

    async def add_requests(self, requests: list[tuple]) -> list[RequestStream]:
        """Submit several requests ``(prompt, prompt_token_ids, params, request_id)`` at once: all are admitted
        or none (the first error is raised), in one engine-thread command."""
        loop = asyncio.get_running_loop()
        items = []
        for prompt, ids, params, rid in requests:
            params = params or SamplingParams()
            rid = rid if rid is not None else f"req-{uuid.uuid4().hex[:16]}"
            items.append((rid, prompt, None if ids is None else list(ids), params,
                          RequestStream(rid, loop, params, self.request_timeout, self._timed_out)))
        fut = concurrent.futures.Future()
        with self._cv:
            self._check_ready()
            cap = self.max_num_seqs + self.max_queued
            if self.max_num_seqs and self._pending + len(items) > cap:
                raise QueueFullError(f"the server is busy: {self._pending} requests are running or queued (at most "
                                     f"{cap}: max_num_seqs {self.max_num_seqs} + max_queued {self.max_queued}); "
                                     "retry later")
            self._pending += len(items)
            self._cmds.append(("add", items, fut))
            self._cv.notify()
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            for it in items:
                self.abort(it[0])
            raise
        return [it[4] for it in items]

    async def generate(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None):
        """``async for out in generate(...)``: incremental ``StreamOutput``s. Stopping early aborts the request."""
        stream = await self.add_request(prompt, params, request_id, prompt_token_ids)
        async for out in self.iterate(stream):
            yield out

    async def iterate(self, stream: RequestStream):
        """Iterate an accepted stream; if the consumer goes away before the end, the request is aborted."""
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str):
        """Abort a request (thread-safe, idempotent): it ends with ``finish_reason == "abort"``."""
        if self._thread.is_alive():
            self._submit(("abort", request_id), check=False)

    def _timed_out(self, request_id: str, msg: str):
        if self._thread.is_alive():
            self._submit(("fail", request_id, msg), check=False)

    async def stats(self) -> dict:
        """Engine and executor counters (taken on the engine thread) plus the server's queue state. While the
        engine is not ready (restarting, down) the last snapshot."""
        if not self._thread.is_alive() or self._state != "ready":
            return dict(self._last_stats)
        fut = concurrent.futures.Future()
        self._submit(("stats", fut), check=False)
        return await asyncio.wrap_future(fut)

    def get_stats(self, timeout: float = 30.0) -> dict:
        """Blocking ``stats()`` for non-async callers."""
        if not self._thread.is_alive() or self._state != "ready":
            return dict(self._last_stats)
        fut = concurrent.futures.Future()
        self._submit(("stats", fut), check=False)
        return fut.result(timeout)

    def stats_snapshot(self) -> tuple[dict, float]:
        """The engine thread's latest stats (refreshed every ``stats_interval`` s while it works) and their age in
        seconds. Never waits for the engine thread, so a stalled step cannot stall ``/metrics``."""
        return dict(self._last_stats), (time.monotonic() - self._stats_time if self._stats_time else float("inf"))

    @property
    def is_running(self) -> bool:
        """Ready for requests."""
        return self._thread.is_alive() and not self._stopping and self._state == "ready"

    @property
    def state(self) -> str:
        """starting | ready | degraded (rebuilding after a failure) | down (stopped, or past ``max_restarts``)."""
        if self._stopping or not self._thread.is_alive():
            return "down"
        return self._state

    def health(self) -> dict:
        st = self.state
        with self._cv:
            pending = self._pending
        return {"status": st, "ready": st == "ready", "live": st != "down", "restarts": self.restarts,
                "last_error": self._last_error, "pending_requests": pending}

    def shutdown(self, timeout: float = 30.0, close_model: bool = True):
        """Stop the engine thread: unfinished requests end with ``finish_reason == "error"`` ("the server is
        shutting down"); then close the model's executor. Idempotent."""
        with self._cv:
            self._stopping = True
            self._cmds.append(("stop",))
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if close_model and not getattr(self, "_closed", False):
            self._closed = True
            try:
                self.llm.close()
            except Exception:  # noqa: BLE001 — best effort at exit
                log.exception("closing the model failed")

    # -- engine thread -------------------------------------------------------------------------------------------
    def _check_ready(self):
        """Raise unless new requests can be accepted (caller holds ``_cv``)."""
        if self._stopping or self._dead:
            raise EngineDeadError(self._dead or "the engine is shutting down")
        if self._state != "ready":
            e = EngineDeadError(f"the engine is {self._state}"
                                + (f" after a failure ({self._last_error})" if self._last_error else "")
                                + "; retry later")
            e.retry_after = max(1.0, self.restart_backoff)
            raise e

    def _submit(self, cmd, check: bool = True):
        with self._cv:
            if check:
                self._check_ready()
            self._cmds.append(cmd)
            self._cv.notify()

    def _run(self):
        try:
            with self._cv:
                if not self._stopping:
                    self._state = "ready"
            while True:
                try:
                    self._loop()
                    return                                   # stopped
                except _ExecutorBroken as e:
                    msg = str(e)
                except Exception as e:  # noqa: BLE001 — a bug in the loop: fail its requests, rebuild, go on
                    log.exception("the engine thread failed")
                    msg = f"the engine failed ({type(e).__name__}: {e})"
                if not self._recover(msg):
                    return
        finally:
            with self._cv:
                self._dead = self._dead or "the engine is shut down"
                self._state = "down"
                rest = list(self._cmds)
                self._cmds.clear()
            self._answer_dead(rest)

    def _answer_dead(self, cmds, msg: str | None = None):
        """Answer commands nobody will run (stats: the last snapshot; adds: an error)."""
        for c in cmds:
            if c[0] == "stats":
                _settle(c[1], dict(self._last_stats))
            elif c[0] == "add":
                e = EngineDeadError(msg or self._dead or "the engine is not running")
                if msg:
                    e.retry_after = max(1.0, self.restart_backoff)
                self._unpend(len(c[1]))
                _settle(c[2], exc=e)

    def _unpend(self, n: int):
        with self._cv:
            self._pending = max(0, self._pending - n)

    def _loop(self):
        while True:
            eng = self.engine
            with self._cv:
                while not self._cmds and not eng.has_unfinished():
                    self._cv.wait(self._idle_wait)
                    if not self._cmds:
                        self._refresh_stats(force=True)
                cmds = list(self._cmds)
                self._cmds.clear()
            stop = False
            for i, c in enumerate(cmds):
                if c[0] == "stop":
                    stop = True
                    continue
                try:
                    self._handle(c)
                except Exception:  # noqa: BLE001 — one bad command must not take the engine thread down
                    log.exception("engine command %r failed", c[0])
                    for fut in (x for x in c[1:] if isinstance(x, concurrent.futures.Future)):
                        _settle(fut, exc=RequestError("the request could not be handled"))
            if stop:
                self._fail_all("the server is shutting down")
                return
            if eng.has_unfinished():
                try:
                    done = eng.step()
                except Exception as e:  # noqa: BLE001 — the engine isolates model failures; this is a bug
                    log.exception("engine step failed")
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                    done = []
                now = time.monotonic()
                for seq in done:
                    self._emit(seq, now)
                self._refresh_stats()
            broken = getattr(getattr(eng, "executor", None), "broken", None)
            if broken:
                raise _ExecutorBroken(f"the expert-parallel workers failed ({broken})")

    def _refresh_stats(self, force: bool = False):
        now = time.monotonic()
        if not force and now - self._stats_time < self.stats_interval:
            return
        try:
            s = dict(self.engine.stats())
        except Exception:  # noqa: BLE001 — stats are best effort
            return
        s["active_requests"] = len(self._streams)
        self._last_stats, self._stats_time = s, now

    def _recover(self, msg: str) -> bool:
        """Fail every request, then rebuild the engine with ``llm.restart()`` (backoff, at most ``max_restarts``
        times in this object's life). Returns False when the engine is down for good (or shutting down)."""
        with self._cv:
            self._state = "degraded"
            self._last_error = msg
            rest = [c for c in self._cmds if c[0] != "stop"]
            stop = any(c[0] == "stop" for c in self._cmds)
            self._cmds.clear()
            if stop:
                self._cmds.append(("stop",))
        log.error("%s; failing its requests", msg)
        try:
            self._fail_all(f"{msg}; the request cannot continue")
        except Exception:  # noqa: BLE001
            log.exception("failing the requests failed")
            for rid in list(self._streams):
                self._streams.pop(rid)._put(EngineDeadError(msg))
        self._answer_dead(rest, f"the engine is restarting after a failure ({msg}); retry later")
        restart = getattr(self.llm, "restart", None)
        delay = self.restart_backoff
        while True:
            if self._stopping:
                return False
            if restart is None or self.restarts >= self.max_restarts:
                with self._cv:
                    self._dead = (f"the engine is down after {self.restarts} restart(s): {msg}" if restart
                                  else f"the engine is down: {msg}")
                    self._state = "down"
                log.error(self._dead)
                return False
            with self._cv:
                self._cv.wait_for(lambda: self._stopping, timeout=delay)
            if self._stopping:
                return False
            self.restarts += 1
            log.warning("restarting the engine (attempt %d of %d)", self.restarts, self.max_restarts)
            try:
                restart()
            except Exception as e:  # noqa: BLE001 — try again after a longer wait, up to the limit
                log.exception("restarting the engine failed")
                msg = f"restart {self.restarts} failed: {type(e).__name__}: {e}"
                with self._cv:
                    self._last_error = msg
                delay = min(30.0, delay * 2)
                continue
            self.engine = self.llm.engine
            self.tokenizer = getattr(self.llm, "tokenizer", self.tokenizer)
            with self._cv:
                self._state = "ready"
                pend = [c for c in self._cmds if c[0] == "add"]
                self._cmds = collections.deque(c for c in self._cmds if c[0] != "add")
            self._answer_dead(pend, "the engine was restarting; retry")
            self._refresh_stats(force=True)
            log.warning("the engine is ready again after restart %d", self.restarts)
            return True

    def _handle(self, c):
        eng = self.engine
        kind = c[0]
        if kind == "add":
            _, items, fut = c
            if fut.cancelled():
                self._unpend(len(items))
                return
            seqs, err = [], None
            for rid, prompt, ids, params, stream in items:
                if rid in self._streams or any(rid == s.request_id for s in seqs):
                    err = RequestError(f"request id {rid!r} is already in use")
                    break
                try:
                    seqs.append(eng.add_request(prompt=prompt, prompt_token_ids=ids, params=params, request_id=rid))
                except Exception as e:  # noqa: BLE001 — RequestError and friends go back to the caller
                    err = e if isinstance(e, RequestError) else RequestError(f"{type(e).__name__}: {e}")
                    break
            if err is not None:
                for s in seqs:               # all or none
                    eng.abort(s.request_id)
                    eng.pop(s.request_id)
                self._unpend(len(items))
                _settle(fut, exc=err)
                return
            now = time.monotonic()
            for (rid, _, _, _, stream), seq in zip(items, seqs):
                stream.arrival = now
                self._streams[rid] = stream
                self.metrics.request_received()
            _settle(fut, None)
            for seq in seqs:
                if seq.finished:   # e.g. max_tokens == 0
                    self._emit(seq, now)
        elif kind in ("abort", "fail"):
            rid = c[1]
            if rid in self._streams:
                seq = eng.seqs.get(rid)
                if seq is not None and not seq.finished:
                    if kind == "abort":
                        eng.abort(rid)
                    else:
                        eng._fail(seq, c[2])
                if seq is not None:
                    self._emit(seq, time.monotonic())
        elif kind == "stats":
            fut = c[1]
            if fut.done():
                return
            try:
                s = dict(eng.stats())
                s["active_requests"] = len(self._streams)
                self._last_stats, self._stats_time = s, time.monotonic()
                _settle(fut, s)
            except Exception as e:  # noqa: BLE001
                _settle(fut, exc=e)

    def _emit(self, seq, now: float):
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        new_ids = list(seq.output_ids[stream.n_tokens:])
        new_lp = list(seq.logprobs[stream.n_logprobs:])
        stream.n_tokens = len(seq.output_ids)
        stream.n_logprobs = len(seq.logprobs)
        finished = seq.finished
        text = seq.text or ""
        end = len(text) if finished else _safe_text_end(text, seq.params.stop)
        delta = text[stream.n_text:end] if end > stream.n_text else ""
        stream.n_text = max(stream.n_text, end)
        if new_ids:
            if stream.first_token is None:
                stream.first_token = now
                self.metrics.first_token(now - stream.arrival)
            stream.last_token = now
            self.metrics.tokens(len(new_ids), now)
        if not (new_ids or delta or finished):
            return
        out = StreamOutput(seq.request_id, seq.prompt_token_ids, new_ids, delta, new_lp,
                           seq.finish_reason if finished else None, seq.error if finished else None,
                           len(seq.output_ids),
                           list(seq.prompt_logprobs) if finished and seq.params.prompt_logprobs is not None else None)
        if finished:      # the request's place is freed before its last output reaches the client, so a client
            n = len(seq.output_ids)     # that sends its next request at once is not refused as over the queue
            tpot = ((stream.last_token - stream.first_token) / (n - 1)
                    if n > 1 and stream.first_token is not None else None)
            self.metrics.request_finished(seq.finish_reason, len(seq.prompt_token_ids), now - stream.arrival, tpot)
            del self._streams[seq.request_id]
            self._unpend(1)
            self.engine.pop(seq.request_id)
        stream._put(out)

    def _fail_all(self, msg: str):
        now = time.monotonic()
        for rid in list(self._streams):
            seq = self.engine.seqs.get(rid)
            if seq is None:
                self._streams.pop(rid)._put(EngineDeadError(msg))
                self._unpend(1)
                continue
            if not seq.finished:
                self.engine._fail(seq, msg)
            self._emit(seq, now)


class _ExecutorBroken(Exception):
    """The executor reports itself broken (``executor.broken``): rebuild it."""
