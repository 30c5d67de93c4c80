"""An OpenAI-compatible HTTP server over ``AsyncLLM`` (FastAPI app factory; served by uvicorn).

    app = build_app(AsyncLLM(LLM(path)), model_name="moeyard")
    serve(app, host="127.0.0.1", port=8000)     # uvicorn; SIGTERM -> graceful shutdown, then the engine stops

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent
events ending with ``data: [DONE]``), ``GET /health``, ``GET /metrics`` (Prometheus text). Supported request
fields: ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k`` and
``ignore_eos`` (extensions), ``seed``, ``n`` (n requests; seeds ``seed + i`` when a seed is given), ``stop``,
``logprobs`` (completions: an int; chat: ``logprobs: true`` + ``top_logprobs``), ``stream`` and
``stream_options.include_usage``. Invalid requests get HTTP 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_llm import AsyncLLM, EngineDeadError, StreamOutput
from .sampling import RequestError, SamplingParams

log = logging.getLogger("moeyard")


# -- request models ------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False
    user: Optional[str] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


# -- errors --------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


# -- token text for logprobs ---------------------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token id -> (display string, bytes). Partial UTF-8 tokens show as ``bytes:\\xNN`` like OpenAI's."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._dec = _byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._special = set()
        if tokenizer is not None:
            try:
                self._special = {t.content for t in tokenizer._tok.get_added_tokens_decoder().values()}
            except Exception:  # noqa: BLE001
                pass

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        r = self._cache.get(tid)
        if r is not None:
            return r
        if self.tok is None:
            r = (f"token_id:{tid}", [])
        else:
            raw = self.tok._tok.id_to_token(tid)
            if raw is not None and raw not in self._special and all(ch in self._dec for ch in raw):
                b = bytes(self._dec[ch] for ch in raw)
            else:
                b = self.tok.decode([tid], skip_special_tokens=False).encode("utf-8")
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            r = (s, list(b))
        self._cache[tid] = r
        return r


# -- the app -------------------------------------------------------------------------------------------------------
def build_app(async_llm, model_name: str = "moeyard") -> FastAPI:
    """FastAPI app over ``async_llm`` (an ``AsyncLLM``, or a zero-argument callable returning one: Ray Serve).

    The app's lifespan shuts the engine down when the server stops.
    """

    def get_llm() -> AsyncLLM:
        return async_llm if isinstance(async_llm, AsyncLLM) or not callable(async_llm) else async_llm()

    @asynccontextmanager
    async def lifespan(app):
        yield
        llm = get_llm()
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    app = FastAPI(title="moeyard", lifespan=lifespan)
    app.state.model_name = model_name
    app.state.get_llm = get_llm
    token_text: dict[int, TokenText] = {}

    def tt(llm) -> TokenText:
        t = token_text.get(id(llm))
        if t is None:
            t = token_text[id(llm)] = TokenText(llm.tokenizer)
        return t

    # errors: everything as an OpenAI-style body
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            msg, param = f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg', ''))}", None
        else:
            param = ".".join(loc) or None
            msg = f"{param}: {e.get('msg', 'invalid value')}" if param else e.get("msg", "invalid request")
        _metrics(get_llm()).request_rejected()
        return JSONResponse(error_body(msg, param=param, code=e.get("type")), status_code=400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status == 400:
            _metrics(get_llm()).request_rejected()
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        t = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), t, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    # -- endpoints ---------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        llm = get_llm()
        if llm is None or not llm.is_running:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        llm = get_llm()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _CREATED,
                                            "owned_by": "moeyard", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        llm = get_llm()
        try:
            stats = await asyncio.wait_for(llm.stats(), 10.0)
        except Exception:  # noqa: BLE001 — metrics must always answer
            stats = {}
        stats = dict(stats)
        if "waiting" in stats:
            stats.setdefault("queue_length", stats["waiting"])
        return PlainTextResponse(llm.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        llm = _check(get_llm(), req, model_name)
        if req.echo:
            raise APIError("echo is not supported", param="echo")
        prompts = _prompts(req.prompt)
        sp = _sampling(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        return await _run(llm, req, prompts, sp, "cmpl", "prompt", tt(llm), chat=False, model_name=model_name,
                          request=request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        llm = _check(get_llm(), req, model_name)
        if llm.tokenizer is None:
            raise APIError("this model has no tokenizer (no tokenizer.json in the checkpoint), so chat completions "
                           "are unavailable; use /v1/completions with token ids", param="messages",
                           code="no_tokenizer")
        msgs = []
        for m in req.messages:
            c = m.content
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if p.get("type", "text") == "text")
            msgs.append({"role": m.role, "content": c or ""})
        try:
            prompt = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 — a template error is the request's problem
            raise APIError(f"cannot render the chat template: {e}", param="messages") from None
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if mt is None:
            mt = llm.max_model_len
        lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        sp = _sampling(req, mt, lp)
        return await _run(llm, req, [prompt], sp, "chatcmpl", "messages", tt(llm), chat=True, model_name=model_name,
                          request=request)

    return app


_CREATED = int(time.time())


def _metrics(llm):
    from .metrics import ServingMetrics
    return llm.metrics if llm is not None else ServingMetrics()


def _check(llm, req, model_name):
    if llm is None or not llm.is_running:
        raise APIError("the engine is not running", status=503, type_="server_error", code="unavailable")
    if req.model is not None and req.model != model_name:
        raise APIError(f"the model {req.model!r} does not exist; this server serves {model_name!r}", status=404,
                       param="model", code="model_not_found")
    return llm


def _prompts(p) -> list:
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def _sampling(req, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except RequestError as e:
        raise APIError(str(e)) from None


class _Choice:
    def __init__(self, index: int, prompt_idx: int, stream):
        self.index, self.prompt_idx, self.stream = index, prompt_idx, stream
        self.text, self.ids, self.lps = [], [], []
        self.finish_reason = self.error = None
        self.prompt_len = 0


async def _start(llm: AsyncLLM, prompts: list, sp: SamplingParams, n: int, base_id: str, param: str):
    """Admit n requests per prompt (all or none); distinct seeds ``seed + i`` when n > 1."""
    choices = []
    try:
        for pi, p in enumerate(prompts):
            for j in range(n):
                params = sp
                if n > 1 and sp.seed is not None:
                    params = SamplingParams(**{**_fields(sp), "seed": sp.seed + j})
                stream = await llm.add_request(p, params, request_id=f"{base_id}-{pi}-{j}")
                choices.append(_Choice(len(choices), pi, stream))
    except RequestError as e:
        for c in choices:
            llm.abort(c.stream.request_id)
        raise APIError(str(e), param=param) from None
    except EngineDeadError as e:
        for c in choices:
            llm.abort(c.stream.request_id)
        raise APIError(str(e), status=503, type_="server_error", code="unavailable") from None
    except BaseException:
        for c in choices:
            llm.abort(c.stream.request_id)
        raise
    return choices


def _fields(sp: SamplingParams) -> dict:
    import dataclasses
    return {f.name: getattr(sp, f.name) for f in dataclasses.fields(sp)}


def _logprobs_completion(outs_lps, tt: TokenText, offset0: int):
    tokens, tlp, top, offs = [], [], [], []
    off = offset0
    for r in outs_lps:
        s, _ = tt(r.token)
        tokens.append(s)
        tlp.append(r.logprob)
        top.append({tt(t)[0]: lp for t, lp in r.top} if r.top else None)
        offs.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}


def _logprobs_chat(outs_lps, tt: TokenText):
    content = []
    for r in outs_lps:
        s, b = tt(r.token)
        content.append({"token": s, "logprob": r.logprob, "bytes": b,
                        "top_logprobs": [{"token": tt(t)[0], "logprob": lp, "bytes": tt(t)[1]} for t, lp in r.top]})
    return {"content": content}


async def _watch_disconnect(request: Request, llm: AsyncLLM, choices):
    """Non-streaming requests: abort the engine requests when the HTTP client goes away."""
    while True:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            for c in choices:
                llm.abort(c.stream.request_id)
            return


async def _run(llm: AsyncLLM, req, prompts, sp, prefix, param, tt: TokenText, chat: bool, model_name: str,
               request: Request | None = None):
    rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    choices = await _start(llm, prompts, sp, req.n, rid, param)
    created = int(time.time())
    want_lp = sp.logprobs is not None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(llm, choices, rid, created, model_name, chat, want_lp, include_usage, tt),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_watch_disconnect(request, llm, choices)) if request is not None else None
    try:
        await asyncio.gather(*[_collect(llm, c) for c in choices])
    finally:
        if watcher is not None:
            watcher.cancel()
        for c in choices:
            if not c.stream.finished:
                llm.abort(c.stream.request_id)
    err = next((c for c in choices if c.finish_reason == "error"), None)
    if err is not None:
        raise APIError(f"generation failed: {err.error}", status=500, type_="server_error", code="generation_error")
    out_choices = []
    for c in choices:
        text = "".join(c.text)
        if chat:
            ch = {"index": c.index, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs_chat(c.lps, tt) if want_lp else None, "finish_reason": c.finish_reason}
        else:
            ch = {"index": c.index, "text": text, "logprobs": _logprobs_completion(c.lps, tt, 0) if want_lp else None,
                  "finish_reason": c.finish_reason}
        out_choices.append(ch)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": out_choices, "usage": _usage(choices)}


def _usage(choices) -> dict:
    prompt = {}
    for c in choices:
        prompt[c.prompt_idx] = c.prompt_len
    p = sum(prompt.values())
    comp = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": p, "completion_tokens": comp, "total_tokens": p + comp}


def _absorb(c: _Choice, out: StreamOutput):
    c.prompt_len = len(out.prompt_token_ids)
    c.text.append(out.text)
    c.ids.extend(out.token_ids)
    c.lps.extend(out.logprobs)
    if out.finished:
        c.finish_reason, c.error = out.finish_reason, out.error


async def _collect(llm: AsyncLLM, c: _Choice):
    async for out in llm.iterate(c.stream):
        _absorb(c, out)


async def _sse(llm, choices, rid, created, model_name, chat, want_lp, include_usage, tt):
    """Server-sent events for all choices, merged in arrival order; ``data: [DONE]`` at the end."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(c):
        try:
            async for out in llm.iterate(c.stream):
                await q.put((c, out))
        except Exception as e:  # noqa: BLE001
            await q.put((c, e))

    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices_json, usage=None):
        d = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices_json}
        if include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

    tasks = []
    try:
        if chat:
            for c in choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        tasks = [asyncio.create_task(pump(c)) for c in choices]
        left = len(choices)
        offsets = {c.index: 0 for c in choices}
        while left:
            c, out = await q.get()
            if isinstance(out, Exception):
                out = StreamOutput(c.stream.request_id, [], [], "", [], "error", f"{type(out).__name__}: {out}")
            _absorb(c, out)
            if out.finished:
                left -= 1
                if out.finish_reason == "error":
                    yield "data: " + json.dumps(error_body(f"generation failed: {out.error}", "server_error",
                                                           code="generation_error")) + "\n\n"
                    break
            if not (out.text or out.token_ids or out.finished):
                continue
            if chat:
                ch = {"index": c.index, "delta": {"content": out.text} if out.text or not out.finished else {},
                      "logprobs": _logprobs_chat(out.logprobs, tt) if want_lp else None,
                      "finish_reason": out.finish_reason}
            else:
                ch = {"index": c.index, "text": out.text,
                      "logprobs": _logprobs_completion(out.logprobs, tt, offsets[c.index]) if want_lp else None,
                      "finish_reason": out.finish_reason}
                offsets[c.index] += len(out.text)
            yield chunk([ch])
        if include_usage:
            yield chunk([], _usage(choices))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            if not c.stream.finished:
                llm.abort(c.stream.request_id)


# -- running -------------------------------------------------------------------------------------------------------
def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                graceful_timeout: float = 30.0):
    """A ``uvicorn.Server`` for ``app``. On SIGTERM/SIGINT it stops accepting connections and lets in-flight
    requests finish; requests still running shortly before ``graceful_timeout`` seconds are ended by the engine
    with a clear error (streams get an ``error`` event and ``data: [DONE]``, others a 500 error body), so nothing
    is cut off silently and nothing hangs; then the app's lifespan stops the engine thread."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            get_llm = getattr(app.state, "get_llm", None)

            async def deadline():
                await asyncio.sleep(max(graceful_timeout - 1.0, graceful_timeout * 0.5))
                llm = get_llm() if get_llm is not None else None
                if llm is not None:
                    await asyncio.to_thread(llm.shutdown, 30.0, False)   # fail what runs; keep the model open

            task = asyncio.create_task(deadline())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                         lifespan="on", access_log=False)
    return Server(cfg)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0):
    make_server(app, host, port, log_level, graceful_timeout).run()
