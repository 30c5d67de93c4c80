"""A bounded HTTP fuzz test (loopback only): hypothesis builds request bodies over the schema of
``/v1/completions`` and ``/v1/chat/completions`` with values of every JSON type, in range and out of it. Each
answer must be a 200 or a 4xx carrying an OpenAI error body whose message names no path and no exception type,
never a 5xx, and the server must be ready after each case."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moeyard.runtime import LLM, AsyncLLM  # noqa: E402
from moeyard.runtime.server import ServerLimits  # noqa: E402
from serving import start_server  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) |
                    st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                                max_size=4),
                    max_leaves=8)
SMALL = st.integers(0, 4)
FIELDS = {
    "max_tokens": SMALL | JSON, "temperature": st.floats(0, 2) | JSON, "top_p": st.floats(0.01, 1) | JSON,
    "top_k": SMALL | JSON, "n": st.integers(1, 3) | JSON, "stream": st.booleans() | JSON, "stop": JSON,
    "seed": st.integers(-2 ** 70, 2 ** 70) | JSON, "ignore_eos": st.booleans() | JSON, "logprobs": SMALL | JSON,
    "echo": st.booleans() | JSON, "presence_penalty": st.floats(-3, 3) | JSON, "logit_bias": JSON,
    "best_of": JSON, "tools": JSON, "response_format": JSON, "model": st.just("tiny") | JSON, "user": JSON,
    "stream_options": JSON, "top_logprobs": SMALL | JSON, "max_completion_tokens": SMALL | JSON,
}
PROMPT = st.text(max_size=40) | st.lists(st.integers(-5, 500), max_size=8) | \
    st.lists(st.lists(st.integers(0, 383), min_size=1, max_size=4), max_size=3) | JSON
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bogus"]) | JSON,
                                           "content": st.text(max_size=20) | JSON}), max_size=3) | JSON


def body(kind):
    fields = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))
    main = {"prompt": PROMPT} if kind == "completions" else {"messages": MESSAGES}
    return st.tuples(st.fixed_dictionaries(main), fields).map(lambda t: {**t[1], **t[0]})


@pytest.fixture(scope="module")
def url(serve_ckpt):
    llm = LLM(serve_ckpt, max_num_seqs=4, max_model_len=128)
    allm = AsyncLLM(llm, request_timeout=30)
    srv, th, base = start_server(allm, app_kw={"limits": ServerLimits(max_body_bytes=64 << 10, max_choices=8)},
                                 log_level="critical", timeout_keep_alive=1)
    yield base
    srv.should_exit = True
    th.join(20)
    llm.close()


def check(url, path, b, client):
    r = client.post(url + path, content=json.dumps(b, default=str), headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (b, r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert "Error:" not in err["message"] and "Traceback" not in err["message"] and "/work" not in err["message"]
    h = client.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ready", h.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow], derandomize=True)
@given(b=body("completions"))
def test_fuzz_completions(url, b):
    with httpx.Client(timeout=60) as c:
        check(url, "/v1/completions", b, c)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow], derandomize=True)
@given(b=body("chat"))
def test_fuzz_chat(url, b):
    with httpx.Client(timeout=60) as c:
        check(url, "/v1/chat/completions", b, c)


def test_fuzz_raw_bytes(url):
    """Not JSON at all, or JSON of the wrong shape: 400s, and the server stays up."""
    with httpx.Client(timeout=30) as c:
        for raw in (b"", b"\xff\xfe", b"[]", b"null", b"1", b'"x"', b"{" * 5000, b'{"prompt": "x"' + b" " * 10):
            r = c.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json(), (raw[:20], r.text[:300])
        assert c.get(url + "/health").status_code == 200


def test_idle_sockets_are_closed(url):
    """Finding 7: connections that never send a byte are closed after timeout_keep_alive (1 s here)."""
    import urllib.parse
    u = urllib.parse.urlparse(url)
    socks = [socket.create_connection((u.hostname, u.port), timeout=10) for _ in range(30)]
    try:
        t0 = time.time()
        for s in socks:
            assert s.recv(1) == b""               # closed by the server (recv would block until the 10 s timeout)
        assert time.time() - t0 < 8
    finally:
        for s in socks:
            s.close()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
