"""An OpenAI-compatible HTTP server over ``AsyncLLM`` (FastAPI app factory; served by uvicorn).

    app = build_app(AsyncLLM(LLM(path)), model_name="moeyard", api_key="secret")
    serve(app, host="127.0.0.1", port=8000)     # uvicorn; SIGTERM -> graceful shutdown, then the engine stops

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent
events ending with ``data: [DONE]``), ``GET /health`` (= ``/health/ready``: 200 only while the engine serves),
``GET /health/live`` (200 unless the engine is down for good), ``GET /metrics`` (Prometheus, ``prometheus_client``).
The full list of fields, limits and errors is in docs/SERVING.md. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` whose message names the parameter and never a file path or
an exception type. With an API key (``api_key=`` or ``MOEYARD_API_KEY``) every ``/v1`` route needs
``Authorization: Bearer <key>`` (compared in constant time). ``/docs`` and ``/openapi.json`` exist only with
``enable_docs=True``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_llm import AsyncLLM, EngineDeadError, QueueFullError, StreamOutput
from .sampling import RequestError, SamplingParams

log = logging.getLogger("moeyard")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of the HTTP server (the queue and the deadline are ``AsyncLLM`` options)."""
    max_body_bytes: int = 2 << 20          # request body; larger: 413
    max_prompt_tokens: int | None = None   # per prompt; None: the context minus one
    max_choices: int = 64                  # prompts x n of one request


# -- request models ------------------------------------------------------------------------------------------------
def _no_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


Num = Annotated[float, BeforeValidator(_no_bool)]
Seed = Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    temperature: Num = Field(1.0, ge=0.0, le=2.0)
    top_p: Num = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = Field(1, ge=1, le=64)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Seed] = None
    ignore_eos: StrictBool = False
    user: Optional[str] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


# Fields of OpenAI's (and vLLM's) schema that change what is generated and that this server does not implement: a
# request that sets one to anything but its no-op value gets a 400 naming it, instead of having it ignored.
_INERT = {
    "best_of": lambda v, r: v is None or v == 1 or v == r.n,
    "repetition_penalty": lambda v, r: v is None or v == 1,
    "suffix": lambda v, r: not v,
    "tools": lambda v, r: not v,
    "functions": lambda v, r: not v,
    "tool_choice": lambda v, r: v in (None, "none", "auto") and not getattr(r, "tools", None),
    "function_call": lambda v, r: v in (None, "none", "auto"),
    "response_format": lambda v, r: v is None or v == {"type": "text"},
    "min_tokens": lambda v, r: not v,
    "min_p": lambda v, r: not v,
    "use_beam_search": lambda v, r: not v,
    "length_penalty": lambda v, r: v is None or v == 1,
    "prompt_logprobs": lambda v, r: v is None,
    "guided_json": lambda v, r: v is None,
    "guided_regex": lambda v, r: v is None,
    "guided_choice": lambda v, r: v is None,
    "guided_grammar": lambda v, r: v is None,
    "audio": lambda v, r: v is None,
    "modalities": lambda v, r: v in (None, ["text"]),
    "prediction": lambda v, r: v is None,
    "n_probs": lambda v, r: v is None,
}


def _refuse_unsupported(req):
    extra = req.model_extra or {}
    for name in ("presence_penalty", "frequency_penalty"):       # implemented (runtime/sampling.py)
        v = extra.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2):
            raise APIError(f"{name} must be a number between -2 and 2", param=name)
    lb = extra.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise APIError("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    for name, inert in _INERT.items():
        if name in extra and not inert(extra[name], req):
            raise APIError(f"{name} is not supported by this server (see docs/SERVING.md for the supported fields)",
                           param=name, code="unsupported_parameter")


# -- errors --------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_
        self.headers = headers


_PATH = re.compile(r"(?<![\w.:/])(?:~|\.\.?)?(?:/[^\s'\"(),:;\[\]{}<>]+){2,}")
_EXC = re.compile(r"\b(?:[a-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?:\(\))?:?\s*")


def public_message(msg: str) -> str:
    """An error message fit for a client: absolute paths shortened to their last part, exception type names
    dropped (``RuntimeError: x`` -> ``x``), one line."""
    msg = str(msg).strip().splitlines()[0] if str(msg).strip() else "error"

    def short(m):
        p = m.group(0)
        if p.startswith(("/v1/", "/health", "/metrics")):
            return p
        return os.path.basename(p.rstrip("/")) or "<path>"
    msg = _PATH.sub(short, msg)
    msg = _EXC.sub("", msg).strip()
    return msg[:1000] or "error"


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": public_message(message), "type": type_, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _unavailable(e: EngineDeadError) -> APIError:
    ra = getattr(e, "retry_after", None)
    headers = {"Retry-After": str(max(1, int(round(ra))))} if ra else None
    if isinstance(e, QueueFullError):
        return APIError(str(e), status=429, type_="server_error", code="queue_full", headers=headers)
    return APIError(str(e), status=503, type_="server_error", code="unavailable", headers=headers)


# -- ASGI guard: body size and API key, before FastAPI parses anything -----------------------------------------------
async def _send_json(send, status: int, body: dict, headers: dict | None = None):
    data = json.dumps(body).encode()
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """Refuses a ``/v1`` request without the API key (401) and a body over ``max_body_bytes`` (413) before the
    app reads it into memory or parses it."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None):
        self.app, self.max_body = app, max_body_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                return await _send_json(send, 401, error_body(
                    "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                    param=None, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_body(f"the request body is larger than the server's limit of {self.max_body} bytes "
                             "(max_body_bytes)", code="body_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await _send_json(send, 413, too_big, {"Connection": "close"})
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_json(send, 413, too_big, {"Connection": "close"})
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


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
def build_app(async_llm, model_name: str = "moeyard", api_key: str | None = None, enable_docs: bool = False,
              limits: ServerLimits | None = None) -> FastAPI:
    """The app over ``async_llm`` (an ``AsyncLLM``, or a zero-argument callable returning one: Ray Serve).

    ``api_key``: required on every ``/v1`` route (default: ``MOEYARD_API_KEY`` when set). ``enable_docs``: serve
    ``/docs`` and ``/openapi.json``. ``limits``: ``ServerLimits``. The app's lifespan shuts the engine down when the
    server stops.
    """
    limits = limits or ServerLimits()
    if api_key is None:
        api_key = os.environ.get("MOEYARD_API_KEY") or None

    def get_llm() -> AsyncLLM:
        return async_llm if isinstance(async_llm, AsyncLLM) or not callable(async_llm) else async_llm()

    pools: list = []       # the tokenizer threads, made on first use (the app must pickle for Ray Serve)

    def tok_pool():
        if not pools:
            pools.append(concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="moeyard-tokenize"))
        return pools[0]

    @asynccontextmanager
    async def lifespan(app):
        yield
        for p in pools:
            p.shutdown(wait=False, cancel_futures=True)
        llm = get_llm()
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    docs = dict(docs_url="/docs", redoc_url=None, openapi_url="/openapi.json") if enable_docs else \
        dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="moeyard", lifespan=lifespan, **docs)
    app.state.model_name = model_name
    app.state.get_llm = get_llm
    app.state.limits = limits
    token_text: dict[int, TokenText] = {}

    def tt(llm) -> TokenText:
        t = token_text.get(id(llm.tokenizer))
        if t is None:
            t = token_text[id(llm.tokenizer)] = TokenText(llm.tokenizer)
        return t

    # errors: everything as an OpenAI-style body
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # a union (prompt: str | list[...]) reports each member; name the field, not the member types
        loc = [x for x in loc if not re.fullmatch(r"(str|int|list\[.*\]|function-.*|constrained-.*)", x)]
        if e.get("type") == "json_invalid":
            msg, param = "malformed JSON body", None
        else:
            param = ".".join(loc) or None
            m = e.get("msg", "invalid value")
            if loc and loc[0] == "prompt" and len(errs) > 1:    # every member of the union failed
                param = "prompt"
                m = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
            if e.get("type") in ("union_tag_invalid", "literal_error") or m.startswith("Input should be"):
                m = m.replace("Input should be", "must be")
            msg = f"{param}: {m}" if param else m
        _metrics(get_llm()).request_rejected()
        return JSONResponse(error_body(msg, param=param, code=e.get("type")), status_code=400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if 400 <= exc.status < 500:
            _metrics(get_llm()).request_rejected()
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        t = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), t, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body("internal server error (the server log has the details)", "server_error"),
                            status_code=500)

    # -- endpoints ---------------------------------------------------------------------------------------------------
    def _health():
        llm = get_llm()
        if llm is None:
            return {"status": "starting", "ready": False, "live": True}
        return llm.health()

    @app.get("/health")
    @app.get("/health/ready")
    async def ready():
        h = _health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/health/live")
    async def live():
        h = _health()
        return JSONResponse(h, status_code=200 if h["live"] else 503)

    @app.get("/v1/models")
    async def models():
        llm = get_llm()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _CREATED,
                                            "owned_by": "moeyard",
                                            "max_model_len": llm.max_model_len if llm is not None else None}]}

    @app.get("/metrics")
    async def metrics():
        from .metrics import CONTENT_TYPE
        llm = get_llm()
        if llm is None:
            return Response(b"", media_type=CONTENT_TYPE)
        stats, age = llm.stats_snapshot()          # never waits for the engine thread
        return Response(llm.metrics.render(stats, age, llm.health()), media_type=CONTENT_TYPE)

    async def tokenize(llm, text: str, param: str) -> list[int]:
        """Tokenize on a worker thread (never the event loop or the engine thread); refuse text that cannot fit
        before spending time on it."""
        if llm.tokenizer is None:
            raise APIError("this checkpoint has no tokenizer.json: send token ids instead of text", param=param,
                           code="no_tokenizer")
        cap = _prompt_cap(llm, limits)
        per = _max_token_chars(llm.tokenizer)
        if len(text) > cap * per:
            raise APIError(f"the prompt has {len(text)} characters, more than {cap} tokens can hold (the most a "
                           f"prompt may have: {_cap_name(llm, limits)})", param=param, code="prompt_too_long")
        return await asyncio.get_running_loop().run_in_executor(tok_pool(), llm.tokenizer.encode, text)

    async def prompt_ids(llm, p, param: str) -> list[int]:
        ids = await tokenize(llm, p, param) if isinstance(p, str) else list(p)
        cap = _prompt_cap(llm, limits)
        if len(ids) > cap:
            raise APIError(f"the prompt has {len(ids)} tokens, more than the {cap} allowed "
                           f"({_cap_name(llm, limits)})", param=param, code="prompt_too_long")
        return ids

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        llm = _check(get_llm(), req, model_name)
        _refuse_unsupported(req)
        if req.echo and req.stream:
            raise APIError("echo is not supported with stream: true", param="echo", code="unsupported_parameter")
        prompts = _prompts(req.prompt)
        _check_fanout(len(prompts), req.n, limits, "prompt")
        ids = [await prompt_ids(llm, p, "prompt") for p in prompts]
        explicit = req.max_tokens is not None
        mts = [_max_tokens(llm, len(x), req.max_tokens if explicit else 16, explicit, "max_tokens") for x in ids]
        echo = None
        if req.echo:     # the prompt's text (and its tokens' logprobs) go in front of the completion
            echo = [p if isinstance(p, str) else (llm.tokenizer.decode(x, skip_special_tokens=False)
                                                  if llm.tokenizer is not None else "")
                    for p, x in zip(prompts, ids)]
        plp = req.logprobs if req.echo else None
        # echo with max_tokens 0 (scoring a prompt): run one token for the prompt's logits, return none of it
        drop = bool(req.echo) and all(mt == 0 for mt in mts)
        sps = [_sampling(req, 1 if drop else mt, req.logprobs, plp) for mt in mts]
        return await _run(llm, req, ids, sps, "cmpl", "prompt", tt(llm), chat=False, model_name=model_name,
                          request=request, echo=echo, drop=drop)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        llm = _check(get_llm(), req, model_name)
        _refuse_unsupported(req)
        if llm.tokenizer is None:
            raise APIError("this model has no tokenizer (no tokenizer.json in the checkpoint), so chat completions "
                           "are unavailable; use /v1/completions with token ids", param="messages",
                           code="no_tokenizer")
        _check_fanout(1, req.n, limits, "messages")
        msgs = []
        for m in req.messages:
            c = m.content
            if isinstance(c, list):
                c = "".join(str(p.get("text", "")) for p in c if p.get("type", "text") == "text")
            msgs.append({"role": m.role, "content": c or ""})
        try:
            prompt = await asyncio.get_running_loop().run_in_executor(
                tok_pool(), llm.tokenizer.apply_chat_template, msgs, True)
        except Exception:  # noqa: BLE001 — a template error is the request's problem
            raise APIError("cannot render the chat template for these messages", param="messages") from None
        ids = await prompt_ids(llm, prompt, "messages")
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        mt = _max_tokens(llm, len(ids), mt, mt is not None, name)
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        sp = _sampling(req, mt, lp)
        return await _run(llm, req, [ids], [sp], "chatcmpl", "messages", tt(llm), chat=True, model_name=model_name,
                          request=request)

    app.add_middleware(_Guard, max_body_bytes=limits.max_body_bytes, api_key=api_key)
    return app


_CREATED = int(time.time())


def _metrics(llm):
    from .metrics import ServingMetrics
    return llm.metrics if llm is not None else ServingMetrics()


def _check(llm, req, model_name):
    if llm is None:
        raise APIError("the engine is starting; retry later", status=503, type_="server_error", code="unavailable",
                       headers={"Retry-After": "5"})
    if not llm.is_running:
        h = llm.health()
        e = EngineDeadError(f"the engine is {h['status']}" + ("; retry later" if h["live"] else ""))
        e.retry_after = 5.0 if h["live"] else None
        raise _unavailable(e)
    if req.model is not None and req.model != model_name:
        raise APIError(f"the model {req.model!r} does not exist; this server serves {model_name!r}", status=404,
                       param="model", code="model_not_found")
    return llm


def _prompt_cap(llm, limits: ServerLimits) -> int:
    ctx = (llm.max_model_len or 1 << 30) - 1
    return min(ctx, limits.max_prompt_tokens) if limits.max_prompt_tokens else ctx


def _cap_name(llm, limits: ServerLimits) -> str:
    if limits.max_prompt_tokens and limits.max_prompt_tokens < (llm.max_model_len or 1 << 30) - 1:
        return "the server's max_prompt_tokens"
    return f"the context is {llm.max_model_len} tokens, and one must be left to generate"


_TOKEN_CHARS: dict[int, int] = {}


def _max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (so ``len(text) / this`` bounds the tokens of
    ``text`` from below): the longest vocabulary string, added tokens included."""
    k = id(tokenizer)
    if k not in _TOKEN_CHARS:
        try:
            vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
            _TOKEN_CHARS[k] = max(8, max((len(t) for t in vocab), default=8))
        except Exception:  # noqa: BLE001
            _TOKEN_CHARS[k] = 64
    return _TOKEN_CHARS[k]


def _check_fanout(n_prompts: int, n: int, limits: ServerLimits, param: str):
    if n_prompts * n > limits.max_choices:
        what = f"{n_prompts} prompts x n={n}" if n_prompts > 1 else f"n={n}"
        raise APIError(f"this request asks for {n_prompts * n} completions ({what}); at most {limits.max_choices} "
                       "per request (max_choices)", param="n" if n > 1 else param, code="too_many_choices")


def _max_tokens(llm, prompt_len: int, mt: int | None, explicit: bool, name: str) -> int:
    """``mt`` checked against the context: asked for explicitly, a 400 naming both lengths when it does not fit
    (like vLLM); by default, whatever is left of the context."""
    ctx = llm.max_model_len
    if ctx is None:
        return mt if mt is not None else 16
    room = ctx - prompt_len
    if mt is None:
        return room
    if prompt_len + mt > ctx:
        if not explicit:
            return room
        raise APIError(f"this model's maximum context length is {ctx} tokens, but the request asks for "
                       f"{prompt_len + mt} tokens ({prompt_len} in the prompt, {mt} in {name}); reduce "
                       f"{name} to at most {room}", param=name, code="context_length_exceeded")
    return mt


def _prompts(p) -> list:
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def _sampling(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    extra = req.model_extra or {}
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              presence_penalty=extra.get("presence_penalty") or 0.0,
                              frequency_penalty=extra.get("frequency_penalty") or 0.0,
                              logit_bias=extra.get("logit_bias") or None, prompt_logprobs=prompt_logprobs)
    except RequestError as e:
        raise APIError(str(e), param=getattr(e, "param", None)) from None


class _Choice:
    def __init__(self, index: int, prompt_idx: int, stream):
        self.index, self.prompt_idx, self.stream = index, prompt_idx, stream
        self.text, self.ids, self.lps = [], [], []
        self.finish_reason = self.error = None
        self.prompt_len = 0
        self.prompt_lps = None


async def _start(llm: AsyncLLM, prompts: list, sps: list, n: int, base_id: str, param: str):
    """Admit n requests per prompt, all or none, in one engine command; distinct seeds ``seed + i`` when n > 1."""
    reqs, where = [], []
    for pi, (p, sp) in enumerate(zip(prompts, sps)):
        for j in range(n):
            params = sp
            if n > 1 and sp.seed is not None:
                params = SamplingParams(**{**_fields(sp), "seed": (sp.seed + j) % (2 ** 63)})
            reqs.append((None, p, params, f"{base_id}-{pi}-{j}"))
            where.append(pi)
    try:
        streams = await llm.add_requests(reqs)
    except RequestError as e:
        raise APIError(str(e), param=getattr(e, "param", None) or param) from None
    except EngineDeadError as e:
        raise _unavailable(e) from None
    return [_Choice(i, pi, s) for i, (pi, s) in enumerate(zip(where, streams))]


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


async def _run(llm: AsyncLLM, req, prompts, sps, prefix, param, tt: TokenText, chat: bool, model_name: str,
               request: Request | None = None, echo: list[str] | None = None, drop: bool = False):
    rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    choices = await _start(llm, prompts, sps, req.n, rid, param)
    created = int(time.time())
    want_lp = sps[0].logprobs is not None
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
        if err.error and "(request_timeout)" in err.error:
            raise APIError(err.error, status=504, type_="server_error", code="timeout")
        raise APIError(f"generation failed: {err.error}", status=500, type_="server_error", code="generation_error")
    out_choices = []
    for c in choices:
        text = "".join(c.text)
        if chat:
            ch = {"index": c.index, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs_chat(c.lps, tt) if want_lp else None, "finish_reason": c.finish_reason}
        elif echo is not None:
            ptext = echo[c.prompt_idx]
            if drop:
                text, c.lps, c.ids = "", [], []
            lp = None
            if want_lp:
                pl = c.prompt_lps or [None]
                lp = _logprobs_completion([r for r in pl if r is not None], tt, 0)
                first, _ = tt(prompts[c.prompt_idx][0])
                gen = _logprobs_completion(c.lps, tt, 0)
                lp = {"tokens": [first] + lp["tokens"] + gen["tokens"],
                      "token_logprobs": [None] + lp["token_logprobs"] + gen["token_logprobs"],
                      "top_logprobs": [None] + lp["top_logprobs"] + gen["top_logprobs"]}
                offs, off = [], 0
                for t in lp["tokens"]:
                    offs.append(off)
                    off += len(t)
                lp["text_offset"] = offs
            ch = {"index": c.index, "text": ptext + text, "logprobs": lp, "finish_reason": c.finish_reason}
        else:
            ch = {"index": c.index, "text": text, "logprobs": _logprobs_completion(c.lps, tt, 0) if want_lp else None,
                  "finish_reason": c.finish_reason}
        out_choices.append(ch)
    usage = _usage(choices)
    if drop:
        usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0,
                 "total_tokens": usage["prompt_tokens"]}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": out_choices, "usage": usage}


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
        if out.prompt_logprobs is not None:
            c.prompt_lps = out.prompt_logprobs


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
                out = StreamOutput(c.stream.request_id, [], [], "", [], "error", str(out))
            _absorb(c, out)
            if out.finished:
                left -= 1
                if out.finish_reason == "error":
                    timeout = bool(out.error and "(request_timeout)" in out.error)
                    msg = out.error if timeout else f"generation failed: {out.error}"
                    yield "data: " + json.dumps(error_body(msg, "server_error",
                                                           code="timeout" if timeout else "generation_error")) + "\n\n"
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
def bind_socket(host: str, port: int):
    """A listening socket on (host, port), opened before a model is loaded so that a port already in use is a
    one-line error at once. Raises ``ValueError`` naming the address."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(2048)
    except OSError as e:
        s.close()
        why = "is already in use" if e.errno in (98, 48) else f"cannot be opened ({e.strerror})"
        raise ValueError(f"port {port} on {host} {why} (--port, --host)") from None
    s.set_inheritable(True)
    return s


def _idle_closing_protocol():
    """uvicorn's HTTP protocol, but a connection that sends nothing is closed after ``timeout_keep_alive`` seconds
    from the start too (uvicorn starts that timer only after a first response, so idle half-open sockets were held
    for ever)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class IdleClosing(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            if getattr(self, "timeout_keep_alive_task", None) is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
    return IdleClosing


def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                graceful_timeout: float = 30.0, timeout_keep_alive: float = 5.0):
    """A ``uvicorn.Server`` for ``app``. On SIGTERM/SIGINT it stops accepting connections and lets in-flight
    requests finish; requests still running shortly before ``graceful_timeout`` seconds are ended by the engine
    with a clear error (streams get an ``error`` event and ``data: [DONE]``, others a 500 error body), so nothing
    is cut off silently and nothing hangs; then the app's lifespan stops the engine thread. A clean shutdown after
    a signal exits with status 0 (uvicorn would re-raise the signal)."""
    import contextlib

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

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self.signalled = list(self._captured_signals)
                self._captured_signals.clear()      # shut down cleanly: exit 0, not by the signal

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                         lifespan="on", access_log=False, timeout_keep_alive=timeout_keep_alive,
                         http=_idle_closing_protocol())
    return Server(cfg)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 30.0, sock=None):
    """Run ``app`` until SIGTERM/SIGINT; ``sock``: an already bound socket (``bind_socket``)."""
    make_server(app, host, port, log_level, graceful_timeout).run(sockets=[sock] if sock is not None else None)
