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
    """The engine thread is stopped (shutdown, or it crashed); no new requests are accepted."""


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStream:
    """Async iterator over one request's ``StreamOutput``s; ends after the output carrying ``finish_reason``."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, params: SamplingParams):
        self.request_id = request_id
        self.loop = loop
        self.params = params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
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
        item = await self.queue.get()
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
    """Wrap an ``LLM`` (or anything with ``.engine`` and ``.close()``) with a background engine thread."""

    def __init__(self, llm, metrics: ServingMetrics | None = None, idle_wait: float = 1.0):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = getattr(llm, "tokenizer", None)
        self.max_model_len = getattr(llm, "max_model_len", getattr(self.engine, "max_model_len", None))
        self.metrics = metrics or ServingMetrics()
        self._cv = threading.Condition()
        self._cmds: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}        # engine thread only
        self._stopping = False
        self._dead: str | None = None
        self._idle_wait = idle_wait
        self._last_stats: dict = {}
        self._thread = threading.Thread(target=self._run, name="moeyard-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str = "default", mode: str = "local", **kw) -> "AsyncLLM":
        from .llm import LLM
        return cls(LLM(model, mode=mode, **kw))

    # -- public API (any thread / event loop) --------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                          request_id: str | None = None, prompt_token_ids: list[int] | None = None
                          ) -> RequestStream:
        """Submit a request; return its stream once the engine accepted it (raises ``RequestError`` if not)."""
        if isinstance(prompt, (list, tuple)):
            prompt, prompt_token_ids = None, list(prompt)
        params = params or SamplingParams()
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex[:16]}"
        loop = asyncio.get_running_loop()
        stream = RequestStream(rid, loop, params)
        fut = concurrent.futures.Future()
        self._submit(("add", rid, prompt, prompt_token_ids, params, stream, fut))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        return stream

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

    async def stats(self) -> dict:
        """Engine and executor counters (taken on the engine thread) plus the server's queue state."""
        if not self._thread.is_alive():
            return dict(self._last_stats)
        fut = concurrent.futures.Future()
        self._submit(("stats", fut), check=False)
        return await asyncio.wrap_future(fut)

    def get_stats(self, timeout: float = 30.0) -> dict:
        """Blocking ``stats()`` for non-async callers."""
        if not self._thread.is_alive():
            return dict(self._last_stats)
        fut = concurrent.futures.Future()
        self._submit(("stats", fut), check=False)
        return fut.result(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 30.0, close_model: bool = True):
        """Stop the engine thread: unfinished requests end with ``finish_reason == "error"`` ("the server is
        shutting down"); then close the model's executor. Idempotent."""
        with self._cv:
            self._stopping = True
            self._cmds.append(("stop",))
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if close_model and not getattr(self, "_closed", False):
            self._closed = True
            try:
                self.llm.close()
            except Exception:  # noqa: BLE001 — best effort at exit
                log.exception("closing the model failed")

    # -- engine thread -------------------------------------------------------------------------------------------
    def _submit(self, cmd, check: bool = True):
        with self._cv:
            if check and (self._stopping or self._dead):
                raise EngineDeadError(self._dead or "the engine is shutting down")
            self._cmds.append(cmd)
            self._cv.notify()

    def _run(self):
        eng = self.engine
        try:
            while True:
                with self._cv:
                    while not self._cmds and not eng.has_unfinished():
                        self._cv.wait(self._idle_wait)
                    cmds = list(self._cmds)
                    self._cmds.clear()
                stop = False
                for c in cmds:
                    if c[0] == "stop":
                        stop = True
                    else:
                        self._handle(c)
                if stop:
                    self._fail_all("the server is shutting down")
                    return
                if eng.has_unfinished():
                    try:
                        done = eng.step()
                    except Exception as e:  # noqa: BLE001 — the engine isolates model failures; this is a bug
                        log.exception("engine step failed")
                        self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                        continue
                    now = time.monotonic()
                    for seq in done:
                        self._emit(seq, now)
        except BaseException as e:  # noqa: BLE001
            log.exception("engine thread died")
            self._dead = f"the engine thread died: {type(e).__name__}: {e}"
            try:
                self._fail_all(self._dead)
            except Exception:  # noqa: BLE001
                pass
        finally:
            with self._cv:
                self._dead = self._dead or "the engine is shut down"
                rest = list(self._cmds)
                self._cmds.clear()
            for c in rest:   # answer what nobody will handle any more
                fut = c[-1] if c[0] in ("add", "stats") else None
                if fut is not None and not fut.done():
                    if c[0] == "stats":
                        fut.set_result(dict(self._last_stats))
                    else:
                        fut.set_exception(EngineDeadError(self._dead))

    def _handle(self, c):
        eng = self.engine
        kind = c[0]
        if kind == "add":
            _, rid, prompt, ids, params, stream, fut = c
            if fut.cancelled():
                return
            if rid in self._streams:
                fut.set_exception(RequestError(f"request id {rid!r} is already in use"))
                return
            try:
                seq = eng.add_request(prompt=prompt, prompt_token_ids=ids, params=params, request_id=rid)
            except Exception as e:  # noqa: BLE001 — RequestError and friends go back to the caller
                if not isinstance(e, RequestError):
                    e = RequestError(f"{type(e).__name__}: {e}")
                fut.set_exception(e)
                return
            stream.arrival = time.monotonic()
            self._streams[rid] = stream
            fut.set_result(None)
            self.metrics.request_received()
            if seq.finished:   # e.g. max_tokens == 0
                self._emit(seq, time.monotonic())
        elif kind == "abort":
            rid = c[1]
            if rid in self._streams:
                eng.abort(rid)
                seq = eng.seqs.get(rid)
                if seq is not None:
                    self._emit(seq, time.monotonic())
        elif kind == "stats":
            fut = c[1]
            try:
                s = dict(eng.stats())
                s["active_requests"] = len(self._streams)
                self._last_stats = s
                fut.set_result(s)
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)

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
                           len(seq.output_ids))
        stream._put(out)
        if finished:
            n = len(seq.output_ids)
            tpot = ((stream.last_token - stream.first_token) / (n - 1)
                    if n > 1 and stream.first_token is not None else None)
            self.metrics.request_finished(seq.finish_reason, len(seq.prompt_token_ids), now - stream.arrival, tpot)
            del self._streams[seq.request_id]
            self.engine.pop(seq.request_id)

    def _fail_all(self, msg: str):
        now = time.monotonic()
        for rid in list(self._streams):
            seq = self.engine.seqs.get(rid)
            if seq is None:
                self._streams.pop(rid)._put(EngineDeadError(msg))
                continue
            if not seq.finished:
                self.engine._fail(seq, msg)
            self._emit(seq, now)
