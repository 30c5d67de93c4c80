"""The OpenAI-compatible server against the official ``openai`` client on a real uvicorn server (loopback)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import pytest

openai = pytest.importorskip("openai")

from moeyard.runtime import LLM, AsyncLLM  # noqa: E402
from moeyard.runtime.server import build_app  # noqa: E402
from serving import start_server  # noqa: E402

MODEL = "tiny"
PROMPT = "Hello, world! How are you"


def _start_server(llm):
    """``llm`` behind a real uvicorn server on a free loopback port, in a thread: (server, thread, AsyncLLM, url)."""
    allm = AsyncLLM(llm)
    srv, th, url = start_server(allm, MODEL)
    return srv, th, allm, url


@pytest.fixture(scope="module")
def server(serve_ckpt):
    llm = LLM(serve_ckpt, max_num_seqs=8, max_model_len=1024)
    srv, th, allm, url = _start_server(llm)
    yield SimpleNamespace(url=url, allm=allm, llm=llm,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60))
    srv.should_exit = True
    th.join(20)
    assert not th.is_alive()
    assert not allm._thread.is_alive()


def test_models(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [MODEL]
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ready" and h.json()["ready"] is True


def _stream_completion(client, **kw):
    chunks = list(client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw))
    text, reasons, usage = "", [], None
    for i, ch in enumerate(chunks):
        if ch.usage is not None:
            usage = ch.usage
            assert not ch.choices and i == len(chunks) - 1
        for c in ch.choices:
            text += c.text
            reasons.append(c.finish_reason)
    return text, reasons, usage, chunks


def test_completion_stream_equals_greedy(server):
    c = server.client
    ref = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    assert ref.object == "text_completion"
    ch = ref.choices[0]
    assert ch.finish_reason == "length" and len(ch.text) > 0
    u = ref.usage
    assert u.prompt_tokens == len(server.llm.tokenizer.encode(PROMPT))
    assert u.completion_tokens == 20 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    text, reasons, usage, _ = _stream_completion(c, prompt=PROMPT, max_tokens=20, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert text == ch.text
    assert [r for r in reasons if r] == ["length"] and reasons[-1] == "length"
    assert usage.model_dump() == u.model_dump()


def test_token_id_prompt_and_eos(server):
    ids = server.llm.tokenizer.encode(PROMPT)
    a = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    b = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids)
    assert a.usage.completion_tokens <= 8


def test_chat(server):
    c = server.client
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    ref = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, seed=1)
    m = ref.choices[0]
    assert ref.object == "chat.completion" and m.message.role == "assistant"
    prompt = server.llm.tokenizer.apply_chat_template(msgs)
    assert ref.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt))
    assert ref.usage.total_tokens == ref.usage.prompt_tokens + ref.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert text == m.message.content
    assert [r for r in reasons if r] == [m.finish_reason] and reasons[-1] == m.finish_reason
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def _stop_candidate(text: str):
    for i in range(2, len(text) - 3):
        s = text[i:i + 2]
        if "\ufffd" not in s and s.strip() and text.find(s) == i:
            return i, s
    pytest.skip("no usable stop string in the generated text")


def test_stop_strings(server):
    c = server.client
    full = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    i, stop = _stop_candidate(full)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "zzzq"])
    assert r.choices[0].text == full[:i] and r.choices[0].finish_reason == "stop"
    text, reasons, usage, _ = _stream_completion(c, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert text == full[:i] and [x for x in reasons if x] == ["stop"]
    assert usage.completion_tokens == r.usage.completion_tokens


def test_n_and_seeds(server):
    c = server.client
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True})
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]      # seeded: reproducible
    assert len({ch.text for ch in a.choices}) > 1                              # distinct seeds per choice
    assert a.usage.completion_tokens == 36
    assert a.usage.prompt_tokens == len(server.llm.tokenizer.encode(PROMPT))
    chunks = list(c.completions.create(stream=True, **kw))
    per = {0: "", 1: "", 2: ""}
    fin = {0: [], 1: [], 2: []}
    for ch in chunks:
        for x in ch.choices:
            per[x.index] += x.text
            if x.finish_reason:
                fin[x.index].append(x.finish_reason)
    assert per == {ch.index: ch.text for ch in a.choices}
    assert all(v == ["length"] for v in fin.values())


def test_logprobs(server):
    c = server.client
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert abs(max(top.values()) - chosen) < 1e-4      # greedy: the chosen token is the best one
    assert "".join(lp.tokens) == r.choices[0].text or "bytes:" in "".join(lp.tokens)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and isinstance(t.bytes, list) for t in content)


BAD = [
    ("/v1/completions", {"model": MODEL}, "prompt"),                                            # missing field
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),   # wrong type
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),       # negative
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 2000}, "prompt"),                 # too long
    ("/v1/completions", {"model": MODEL, "prompt": [999999]}, "prompt"),                        # bad token id
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
]


@pytest.mark.parametrize("path,body,param", BAD)
def test_bad_requests(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param
    ok = server.client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_malformed_json_and_openai_errors(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert server.client.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


@pytest.fixture
def slow_steps(server):
    """At least 10 ms per engine step, so a 900-token request is surely still running when its client leaves
    (a tiny model on a fast machine could otherwise finish before the client has read three chunks)."""
    ex = server.llm.engine.executor
    orig = ex.execute

    def slow(items):
        time.sleep(0.01)
        return orig(items)

    ex.execute = slow
    yield
    ex.execute = orig


def _read_chunks(lines, n: int) -> list[dict]:
    """The next ``n`` data chunks from an SSE line iterator."""
    seen = []
    for line in lines:
        if line.startswith("data: {"):
            seen.append(json.loads(line[len("data: "):]))
            if len(seen) == n:
                break
    return seen


def test_disconnect_frees_slot(server, slow_steps):
    before = server.allm.get_stats()
    aborted = server.allm.metrics.requests.get("abort", 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as cl:
        with cl.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            # Keep a reference to the line iterator. ``for line in r.iter_lines(): ... break`` drops it at the
            # break, and closing httpx's generator chain closes the connection: the client has left right there,
            # and the server's abort raced the check below (it "ended after 4 tokens" about 1 run in 6).
            lines = r.iter_lines()
            seen = _read_chunks(lines, 3)
            assert len(seen) == 3 and all(c["choices"][0]["finish_reason"] is None for c in seen), seen
            # Still connected (not reading): the request keeps running; nothing was aborted.
            n0 = server.allm.get_stats()["tokens_generated"]
            t0 = time.time()
            while (mid := server.allm.get_stats())["tokens_generated"] < n0 + 5:
                assert mid["running"] == 1, mid
                assert time.time() - t0 < 15, mid
                time.sleep(0.05)
            assert mid["running"] == 1 and mid["requests_aborted"] == before["requests_aborted"], mid
            assert server.allm.metrics.requests.get("abort", 0) == aborted
    # The client left (the response is closed): the request is aborted and its slot freed.
    t0 = time.time()
    while True:
        s = server.allm.get_stats()
        if s["running"] == 0 and s["active_requests"] == 0:
            break
        assert time.time() - t0 < 15, s
        time.sleep(0.1)
    assert not server.llm.engine.scheduler.running and not server.llm.engine.seqs
    assert s["tokens_generated"] - before["tokens_generated"] < 900
    assert s["requests_aborted"] == before["requests_aborted"] + 1
    assert server.allm.metrics.requests.get("abort", 0) == aborted + 1


def test_stream_runs_to_max_tokens(server):
    """The disconnect test's request, read to the end: greedy + ignore_eos runs the full 900 tokens (finish
    "length", no abort), the KV cache growing past its initial capacity on the way."""
    before = server.allm.get_stats()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=120) as cl:
        with cl.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [x for x in reasons if x] == ["length"] and reasons[-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 900
    s = server.allm.get_stats()
    assert s["tokens_generated"] - before["tokens_generated"] == 900
    assert s["requests_aborted"] == before["requests_aborted"]
    assert s["requests_finished"] - before["requests_finished"] == 1
    assert s["running"] == 0 and s["active_requests"] == 0


def test_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families
    server.client.completions.create(model=MODEL, prompt="m", max_tokens=3, temperature=0)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("moeyard_time_to_first_token_seconds", "moeyard_time_per_output_token_seconds"):
        assert fams[name].type == "histogram"
        count = [s.value for s in fams[name].samples if s.name.endswith("_count")][0]
        assert count >= 1
    assert fams["moeyard_requests_finished"].type == "counter"
    for g in ("moeyard_tokens_per_second", "moeyard_queue_length", "moeyard_running", "moeyard_stats_age_seconds"):
        assert fams[g].type == "gauge", g
    # cumulative engine counts are counters, and no two families share a name (finding 10)
    for c in ("moeyard_engine_tokens_generated", "moeyard_engine_steps", "moeyard_engine_model_seconds",
              "moeyard_prompt_tokens", "moeyard_engine_prompt_tokens"):
        assert fams[c].type == "counter", c
    assert len(fams) == len([ln for ln in r.text.splitlines() if ln.startswith("# TYPE ")])


def test_chat_without_tokenizer(serve_ckpt_no_tok):
    llm = LLM(serve_ckpt_no_tok, max_num_seqs=2, max_model_len=64)
    allm = AsyncLLM(llm)
    app = build_app(allm, "notok")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as cl:
            r = await cl.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
            r = await cl.post("/v1/completions", json={"prompt": "text", "max_tokens": 2})
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
            r = await cl.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    try:
        asyncio.run(go())
    finally:
        allm.shutdown()


def test_disconnect_non_streaming_frees_slot(server, slow_steps):
    aborted = server.allm.metrics.requests.get("abort", 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    # A raw socket, closed once the engine is running the request: no race with admission under load.
    import json as _json
    import socket
    import urllib.parse
    u = urllib.parse.urlparse(server.url)
    payload = _json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    t0 = time.time()
    while not server.allm.get_stats()["running"]:
        assert time.time() - t0 < 30, "the request never started"
        time.sleep(0.05)
    sock.close()
    t0 = time.time()
    while server.allm.metrics.requests.get("abort", 0) == aborted or server.allm.get_stats()["running"]:
        assert time.time() - t0 < 20, server.allm.get_stats()
        time.sleep(0.1)
    assert not server.llm.engine.scheduler.running


def test_stats_gauges_flatten():
    from moeyard.runtime.metrics import ServingMetrics
    txt = ServingMetrics().render({"cache": {"hit_rate": 0.25}, "a2a_bytes": 10, "name": "x", "ok": True}).decode()
    assert "moeyard_engine_cache_hit_rate 0.25" in txt and "moeyard_engine_a2a_bytes 10.0" in txt
    assert "moeyard_engine_name" not in txt


def test_prompt_batch_and_chat_n_stream(server):
    c = server.client
    r = c.completions.create(model=MODEL, prompt=["Hello", "The quick"], max_tokens=4, temperature=0, n=2,
                             extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text   # greedy
    tok = server.llm.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode("Hello")) + len(tok.encode("The quick"))
    assert r.usage.completion_tokens == 16
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0.9, seed=3, n=2,
                                            stream=True, extra_body={"ignore_eos": True}))
    fin = {0: [], 1: []}
    roles = {0: 0, 1: 0}
    for ch in chunks:
        for x in ch.choices:
            roles[x.index] += x.delta.role == "assistant"
            if x.finish_reason:
                fin[x.index].append(x.finish_reason)
    assert fin == {0: ["length"], 1: ["length"]} and roles == {0: 1, 1: 1}


def test_offload_mode_server_matches_local(server, serve_ckpt):
    """The same server with offload mode underneath (a quarter of the experts resident, the reader process and
    prediction on): concurrent streamed and plain completions are the local-mode server's greedy texts."""
    from concurrent.futures import ThreadPoolExecutor
    prompts = [PROMPT, "The quick brown fox", "Once upon a time", "1 2 3 4"]
    ref = [server.client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    llm = LLM(serve_ckpt, mode="offload", expert_cache_fraction=0.25, predictor="combined", max_num_seqs=4,
              max_model_len=1024)
    srv, th, allm, url = _start_server(llm)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def plain(p):
            return client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        def streamed(p):
            return _stream_completion(client, prompt=p, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})[0]
        with ThreadPoolExecutor(8) as pool:
            got_plain = list(pool.map(plain, prompts))
            got_stream = list(pool.map(streamed, prompts))
        assert got_plain == ref and got_stream == ref
        st = llm.stats()
        assert st["io_mode"] == "process" and st["expert_misses"] + st["expert_hits"] > 0
    finally:
        srv.should_exit = True
        th.join(20)
        reader = llm.engine.executor.cache.proc
        llm.close()
    assert not th.is_alive() and not allm._thread.is_alive()
    assert reader.proc is None                      # no reader process left behind
