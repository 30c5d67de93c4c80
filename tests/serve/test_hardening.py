"""Regression tests of issue 15 ("serving that survives its users"): engine faults, hostile requests, limits,
auth, error bodies. Most run the app in-process through httpx's ASGI transport (no sockets, fast)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from moeyard.runtime import LLM, AsyncLLM, SamplingParams
from moeyard.runtime.async_llm import QueueFullError
from moeyard.runtime.server import ServerLimits, build_app, public_message

MODEL = "tiny"
GREEDY = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(serve_ckpt):
    m = LLM(serve_ckpt, max_num_seqs=4, max_model_len=256)
    yield m
    m.close()


def run_app(allm, fn, **app_kw):
    """Run ``fn(client)`` (async) against ``build_app(allm)`` in-process; shut the engine thread down after."""
    app = build_app(allm, MODEL, **app_kw)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as cl:
            return await fn(cl)
    try:
        return asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        allm.shutdown(close_model=False)


def slow(llm, seconds: float, when=lambda items: True):
    """Make the executor's steps take ``seconds`` longer while ``when(items)``; returns an undo function."""
    ex = llm.engine.executor
    real = ex.execute

    def execute(items):
        if when(items):
            time.sleep(seconds)
        return real(items)
    ex.execute = execute
    return lambda: setattr(ex, "execute", real)


def assert_error(r, status: int, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# -- finding 1: a scrape that times out must not kill the engine ----------------------------------------------------
def test_cancelled_stats_future_does_not_kill_engine(llm):
    allm = AsyncLLM(llm)
    undo = slow(llm, 0.8)

    async def fn(cl):
        task = asyncio.create_task(cl.post("/v1/completions", json={**GREEDY, "max_tokens": 2}))
        while not (await allm.stats()).get("running"):
            await asyncio.sleep(0.02)
        with pytest.raises(asyncio.TimeoutError):            # the caller gives up: its future is cancelled
            await asyncio.wait_for(allm.stats(), 0.05)
        t0 = time.monotonic()
        m = await cl.get("/metrics")                          # answers from the snapshot, not after the step
        assert m.status_code == 200 and time.monotonic() - t0 < 0.5
        assert (await task).status_code == 200
        await asyncio.sleep(0.3)                              # the engine answered the cancelled future by now
        undo()
        assert allm.is_running and allm.health()["status"] == "ready"
        r = await cl.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    try:
        run_app(allm, fn)
    finally:
        undo()


# -- finding 2: body size, prompt length before tokenizing, tokenization off the engine thread -----------------------
def test_body_limit_and_tokenization_off_engine_thread(llm):
    allm = AsyncLLM(llm)
    seen = []
    real = llm.tokenizer.encode

    def encode(text):
        seen.append(threading.current_thread().name)
        return real(text)

    async def fn(cl):
        big = json.dumps({"model": MODEL, "prompt": "x" * 300_000}).encode()
        r = await cl.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        err = assert_error(r, 413)
        assert "max_body_bytes" in err["message"] and "100000" in err["message"]
        t0 = time.monotonic()
        r = await cl.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 15_000})   # 90 kB < limit
        assert_error(r, 400, "prompt")
        assert time.monotonic() - t0 < 2.0 and not seen         # refused by length, never tokenized
        r = await cl.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2})
        assert r.status_code == 200
        assert seen and all(n.startswith("moeyard-tokenize") for n in seen), seen
    llm.tokenizer.encode = encode
    try:
        run_app(allm, fn, limits=ServerLimits(max_body_bytes=100_000))
    finally:
        llm.tokenizer.encode = real


# -- finding 4: unbounded fan-out ---------------------------------------------------------------------------------
def test_fanout_limit_admits_nothing(llm):
    allm = AsyncLLM(llm)

    async def fn(cl):
        before = allm.metrics.requests_received
        r = await cl.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2]] * 200, "n": 64,
                                                    "max_tokens": 1})
        err = assert_error(r, 400, "n")
        assert "12800" in err["message"] and "max_choices" in err["message"]
        assert allm.metrics.requests_received == before
        r = await cl.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2]] * 3, "n": 2, "max_tokens": 1,
                                                    "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 6
    run_app(allm, fn, limits=ServerLimits(max_choices=8))


def test_queue_full_is_429_with_retry_after(serve_ckpt):
    small = LLM(serve_ckpt, max_num_seqs=1, max_model_len=256)
    allm = AsyncLLM(small, max_queued=0)
    undo = slow(small, 0.05)

    async def fn(cl):
        long = asyncio.create_task(cl.post("/v1/completions", json={**GREEDY, "max_tokens": 100}))
        while not (await allm.stats()).get("running"):
            await asyncio.sleep(0.02)
        r = await cl.post("/v1/completions", json=GREEDY)
        err = assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1 and err["code"] == "queue_full" and "max_queued" in err["message"]
        with pytest.raises(QueueFullError):
            await allm.add_request([1, 2], SamplingParams(max_tokens=1))
        allm.abort(next(iter(small.engine.seqs)))
        await long
        r = await cl.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200
    try:
        run_app(allm, fn)
    finally:
        undo()
        small.close()


def test_request_deadline(llm):
    allm = AsyncLLM(llm, request_timeout=0.5)
    undo = slow(llm, 0.05)

    async def fn(cl):
        r = await cl.post("/v1/completions", json={**GREEDY, "max_tokens": 200})
        err = assert_error(r, 504)
        assert err["code"] == "timeout" and "request_timeout" in err["message"]
        async with cl.stream("POST", "/v1/completions", json={**GREEDY, "max_tokens": 200, "stream": True}) as s:
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and "request_timeout" in lines[-2]
        for _ in range(100):                                    # the engine failed both: slots are free
            st = await allm.stats()
            if st["running"] == 0 and st["active_requests"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st["running"] == 0 and st["active_requests"] == 0 and allm.health()["pending_requests"] == 0
    try:
        run_app(allm, fn)
    finally:
        undo()


# -- the supervisor ------------------------------------------------------------------------------------------------
def test_engine_thread_failure_is_rebuilt(serve_ckpt):
    """A failure of the engine thread itself (not a model step): its requests fail with a clear error, /health
    says degraded (503) while the engine is rebuilt in the background, then ready; later requests succeed."""
    m = LLM(serve_ckpt, max_num_seqs=2, max_model_len=256)
    real_restart = m.restart

    def restart():
        time.sleep(0.6)
        real_restart()
    m.restart = restart
    allm = AsyncLLM(m, restart_backoff=0.05)
    boom = {"armed": True}
    real_emit = allm._emit

    def emit(seq, now):
        if boom["armed"] and seq.output_ids:
            boom["armed"] = False
            raise RuntimeError("injected engine-thread failure in /secret/dir/file.py")
        return real_emit(seq, now)
    allm._emit = emit

    async def fn(cl):
        r = await cl.post("/v1/completions", json={**GREEDY, "max_tokens": 50})
        err = assert_error(r, 500)
        assert "injected engine-thread failure" in err["message"]
        assert "/secret" not in err["message"] and "RuntimeError" not in err["message"]
        h = await cl.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "degraded"
        assert (await cl.get("/health/live")).status_code == 200
        r = await cl.post("/v1/completions", json=GREEDY)
        assert_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        for _ in range(200):
            if allm.health()["status"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert allm.health()["status"] == "ready" and allm.restarts == 1
        r = await cl.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert (await cl.get("/health")).status_code == 200
    try:
        run_app(allm, fn)
    finally:
        m.close()


def test_broken_executor_restarts_then_down_past_the_limit(serve_ckpt):
    """An executor that reports itself broken (Ray mode: a dead worker) is rebuilt automatically; past
    ``max_restarts`` the engine is down and /health/live fails."""
    m = LLM(serve_ckpt, max_num_seqs=2, max_model_len=256)

    def break_it():
        ex = m.engine.executor
        real = ex.execute

        def execute(items):
            ex.broken = "worker 1 died"
            return real(items)
        ex.execute = execute
    break_it()
    allm = AsyncLLM(m, restart_backoff=0.05, max_restarts=1)

    async def fn(cl):
        r = await cl.post("/v1/completions", json=GREEDY)
        assert r.status_code in (200, 500)            # the step ran; the break is noticed after it
        for _ in range(200):
            if allm.restarts == 1 and allm.health()["status"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert allm.health()["status"] == "ready"
        r = await cl.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        break_it()                                    # breaks again: no restarts left -> down
        await cl.post("/v1/completions", json=GREEDY)
        for _ in range(200):
            if allm.health()["status"] == "down":
                break
            await asyncio.sleep(0.05)
        assert (await cl.get("/health/live")).status_code == 503
        assert_error(await cl.post("/v1/completions", json=GREEDY), 503)
        metrics = (await cl.get("/metrics")).text
        assert 'moeyard_engine_state{state="down"} 1.0' in metrics and "moeyard_engine_restarts_total 1.0" in metrics
    try:
        run_app(allm, fn)
    finally:
        m.close()


# -- finding 5: API key, docs, error bodies --------------------------------------------------------------------------
def test_api_key_and_docs(llm, monkeypatch):
    monkeypatch.setenv("MOEYARD_API_KEY", "s3cret")
    allm = AsyncLLM(llm)

    async def fn(cl):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/v1/models", "/v1/completions"):
                r = await (cl.get(path, headers=headers) if path == "/v1/models"
                           else cl.post(path, json=GREEDY, headers=headers))
                assert assert_error(r, 401)["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer s3cret"}
        assert (await cl.get("/v1/models", headers=ok)).status_code == 200
        assert (await cl.post("/v1/completions", json=GREEDY, headers=ok)).status_code == 200
        assert (await cl.get("/health")).status_code == 200          # probes need no key
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert (await cl.get(path)).status_code == 404
    run_app(allm, fn)
    allm = AsyncLLM(llm)

    async def docs(cl):
        assert (await cl.get("/openapi.json")).status_code == 200
    run_app(allm, docs, enable_docs=True, api_key="")


def test_error_messages_name_no_path_or_exception_type():
    assert public_message("RuntimeError: cannot read /home/u/models/x/model-00001.safetensors (boom)") == \
        "cannot read model-00001.safetensors (boom)"
    assert public_message("OverflowError: Python int too large") == "Python int too large"
    assert public_message("use /v1/completions with token ids") == "use /v1/completions with token ids"


@pytest.mark.parametrize("body,param", [
    ({**GREEDY, "max_tokens": True}, "max_tokens"),                      # finding 7: true is not 1
    ({**GREEDY, "seed": 2 ** 70}, "seed"),                                # finding 7: named seed, no overflow text
    ({**GREEDY, "temperature": True}, "temperature"),
    ({**GREEDY, "logit_bias": {"5": 1000}}, "logit_bias"),                # out of range
    ({**GREEDY, "logit_bias": {"999999": 1}}, "logit_bias"),              # not a token id of the model
    ({**GREEDY, "presence_penalty": 2.5}, "presence_penalty"),
    ({**GREEDY, "frequency_penalty": "x"}, "frequency_penalty"),
    ({**GREEDY, "best_of": 3}, "best_of"),                                # finding 8: refused, not ignored
    ({**GREEDY, "max_tokens": 300}, "max_tokens"),                        # finding 8: beyond the context
    ({**GREEDY, "suffix": "x"}, "suffix"),
])
def test_bad_fields_are_named(llm, body, param):
    allm = AsyncLLM(llm)

    async def fn(cl):
        err = assert_error(await cl.post("/v1/completions", json=body), 400, param)
        assert "Error" not in err["message"] and "/" not in err["message"].replace("docs/SERVING.md", "")
        if param == "max_tokens" and body["max_tokens"] == 300:
            assert "256" in err["message"] and "303" in err["message"]          # both lengths
        # inert values are fine
        r = await cl.post("/v1/completions", json={**GREEDY, "presence_penalty": 0, "logit_bias": {}, "best_of": 1})
        assert r.status_code == 200
    run_app(allm, fn)


def test_chat_fields(llm):
    allm = AsyncLLM(llm)

    async def fn(cl):
        msgs = [{"role": "user", "content": "hi"}]
        assert_error(await cl.post("/v1/chat/completions", json={"messages": [{"role": "bogus", "content": "x"}]}),
                     400, "messages.0.role")
        for k, v in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                     ("response_format", {"type": "json_object"})):
            assert_error(await cl.post("/v1/chat/completions", json={"messages": msgs, k: v}), 400, k)
        r = await cl.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1000})
        assert "256" in assert_error(r, 400, "max_tokens")["message"]
        r = await cl.post("/v1/chat/completions", json={"messages": msgs, "temperature": 0, "ignore_eos": True,
                                                        "response_format": {"type": "text"}})
        assert r.status_code == 200                      # no max_tokens: the rest of the context
        u = r.json()["usage"]
        assert u["prompt_tokens"] + u["completion_tokens"] == 256
    run_app(allm, fn)


# -- finding 9: port in use ----------------------------------------------------------------------------------------
def test_port_in_use_fails_before_loading(serve_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "moeyard.runtime.cli", "serve", "--model", serve_ckpt,
                            "--port", str(port)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert p.returncode == 2, p.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in p.stderr and "Traceback" not in p.stderr
    assert "loading" not in p.stdout
    assert time.time() - t0 < 60


# -- finding 8: penalties and logit_bias are implemented ------------------------------------------------------------
def test_logit_bias_and_penalties(llm):
    from moeyard.runtime.sampling import apply_penalties
    import torch
    logits = torch.zeros(2, 6)
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"3": 2.0})
    out = apply_penalties(logits, [sp, SamplingParams()], [[1, 1, 2], [1]])
    assert out[0].tolist() == [0.0, -1.0, -0.75, 2.0, 0.0, 0.0] and out[1].tolist() == [0.0] * 6
    allm = AsyncLLM(llm)

    async def fn(cl):
        r = await cl.post("/v1/completions", json={**GREEDY, "max_tokens": 6, "logit_bias": {"42": 100}, "logprobs": 0})
        assert r.status_code == 200, r.text
        toks = [t for t in r.json()["choices"][0]["logprobs"]["tokens"]]
        assert len(toks) == 6 and len(set(toks)) == 1        # every token is the biased one
        # +100 on token 42, minus 2 per time it was generated: it wins about 50 times, then another token does
        r = await cl.post("/v1/completions", json={**GREEDY, "max_tokens": 80, "logit_bias": {"42": 100},
                                                    "frequency_penalty": 2.0, "logprobs": 0})
        toks = r.json()["choices"][0]["logprobs"]["tokens"]
        assert toks[:40] == [toks[0]] * 40 and len(set(toks)) > 1, toks
    run_app(allm, fn)


# -- echo with prompt logprobs (lm-evaluation-harness loglikelihood) -------------------------------------------------
def test_echo_prompt_logprobs_match_transformers(llm, serve_ckpt):
    transformers = pytest.importorskip("transformers")
    import torch
    hf = transformers.AutoModelForCausalLM.from_pretrained(serve_ckpt, torch_dtype=torch.float32).eval()
    prompt = "The quick brown fox jumps over the lazy dog. Hello, world!"
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    allm = AsyncLLM(llm)

    async def fn(cl):
        for mt in (0, 1):
            r = await cl.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "echo": True,
                                                        "logprobs": 1, "max_tokens": mt, "temperature": 0})
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            lp = ch["logprobs"]
            assert ch["text"].startswith(prompt) and (mt or ch["text"] == prompt)
            assert len(lp["tokens"]) == len(ids) + mt and lp["token_logprobs"][0] is None
            got = lp["token_logprobs"][1:len(ids)]
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
            assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
            assert r.json()["usage"]["completion_tokens"] == mt
        assert_error(await cl.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "echo": True,
                                                             "stream": True}), 400, "echo")
    run_app(allm, fn)
    # chunked prefill (8-token chunks) gives the same prompt logprobs through the Python API
    small = LLM(serve_ckpt, max_num_seqs=2, max_model_len=256, max_num_batched_tokens=8)
    try:
        o = small.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, temperature=0,
                                                                                  prompt_logprobs=0))[0]
    finally:
        small.close()
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(ids)
    assert [r.token for r in o.prompt_logprobs[1:]] == ids[1:]
    assert max(abs(r.logprob - w) for r, w in zip(o.prompt_logprobs[1:], want)) < 1e-4
    # offload mode (a subclass of the local executor, with prefetching) gives them too
    off = LLM(serve_ckpt, mode="offload", expert_cache_fraction=0.5, max_num_seqs=2, max_model_len=256,
              max_num_batched_tokens=8)
    try:
        o2 = off.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=3, temperature=0,
                                                                                 prompt_logprobs=0))[0]
    finally:
        off.close()
    assert max(abs(r.logprob - w) for r, w in zip(o2.prompt_logprobs[1:], want)) < 1e-4
    assert o2.finish_reason == "length" and len(o2.token_ids) == 3


# -- finding 11: CLI output and help ---------------------------------------------------------------------------------
def test_demo_plain_output_and_cli_help(capsys):
    from moeyard.runtime.cli import build_parser, main
    assert main(["demo", "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out and "routing of the demo tokens" in out      # not a terminal: no ANSI codes
    sub = build_parser()._subparsers._group_actions[0].choices
    for cmd, flags in (("profile", ("--model", "--text", "--tokens", "--chunk", "--dtype", "--out")),
                       ("simulate", ("--hidden-size", "--bytes-per-elem", "--tokens-per-step")),
                       ("serve", ("--api-key", "--max-queued", "--request-timeout", "--max-body-bytes"))):
        helps = {a.option_strings[0]: a.help for a in sub[cmd]._actions if a.option_strings}
        for f in flags:
            assert helps.get(f), (cmd, f)
    assert "4096" in sub["simulate"].format_help() and "held" in sub["place"].format_help()
