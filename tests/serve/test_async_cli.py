"""AsyncLLM on its own (error isolation, abort, shutdown) and ``moeyard serve`` as a process (YAML config, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from moeyard.runtime import LLM, AsyncLLM, SamplingParams
from moeyard.runtime.executor import RequestFailed
from moeyard.runtime.sampling import RequestError
from serving import free_port



GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_error_reaches_only_its_request(serve_ckpt):
    llm = LLM(serve_ckpt, max_num_seqs=4, max_model_len=256)
    real = llm.engine.executor.execute

    def execute(items):
        if any(it.request_id == "bad" and it.start > 3 for it in items):
            raise RequestFailed(["bad"], "injected failure")
        return real(items)

    llm.engine.executor.execute = execute
    allm = AsyncLLM(llm)

    async def run(rid, prompt):
        outs = [o async for o in allm.generate(prompt, GREEDY, rid)]
        return outs

    async def main():
        good, bad = await asyncio.gather(run("good", [5, 6, 7]), run("bad", [1, 2, 3]))
        assert [o.finish_reason for o in good if o.finish_reason] == ["length"]
        assert sum(len(o.token_ids) for o in good) == 8 and good[-1].num_generated == 8
        assert bad[-1].finish_reason == "error" and "injected" in bad[-1].error
        assert [o.finish_reason for o in bad if o.finish_reason] == ["error"]
        with pytest.raises(RequestError):
            await allm.add_request(list(range(300)), GREEDY)     # longer than the context
        # a consumer that stops early aborts its request and frees its slot
        agen = allm.generate([4, 4, 4], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "early")
        async for o in agen:
            break
        await agen.aclose()
        for _ in range(100):
            s = await allm.stats()
            if s["running"] == 0 and s["active_requests"] == 0:
                break
            await asyncio.sleep(0.05)
        assert s["running"] == 0 and not llm.engine.scheduler.running
        # shutdown while a request runs: it ends with a clear error, nothing hangs
        agen = allm.generate([9, 9], SamplingParams(max_tokens=250, temperature=0, ignore_eos=True), "late")
        first = await agen.__anext__()
        await asyncio.to_thread(allm.shutdown)
        rest = [o async for o in agen]
        assert rest and rest[-1].finish_reason == "error" and "shutting down" in rest[-1].error
        assert not first.finished
        with pytest.raises(RuntimeError):
            await allm.add_request([1, 2, 3], GREEDY)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_config_merge(tmp_path):
    from moeyard.runtime.cli import build_parser
    y = tmp_path / "run.yaml"
    y.write_text("model: /some/ckpt\nmode: offload\nport: 9001\nmax-num-seqs: 5\n"
                 "options: {expert_cache_fraction: 0.5, prefetch: true}\n")
    args = build_parser().parse_args(["serve", "--config", str(y), "--port", "9100", "-o", "prefetch=false"])
    from moeyard.runtime.serve_cli import resolve_args
    cfg = resolve_args(args)
    assert cfg["model"] == "/some/ckpt" and cfg["mode"] == "offload" and cfg["max_num_seqs"] == 5
    assert cfg["port"] == 9100 and cfg["host"] == "127.0.0.1"
    assert cfg["options"] == {"expert_cache_fraction": 0.5, "prefetch": False}
    y.write_text("bogus: 1\n")
    with pytest.raises(ValueError):
        resolve_args(build_parser().parse_args(["serve", "--config", str(y)]))


def test_serve_process_sigterm(serve_ckpt, tmp_path):
    port = free_port()
    y = tmp_path / "run.yaml"
    y.write_text(f"model: {serve_ckpt}\nmax_num_seqs: 4\nmax_model_len: 1024\nport: 1\nlog_level: warning\n"
                 f"graceful_timeout: 1\nserved_model_name: tiny\n")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.Popen([sys.executable, "-m", "moeyard.runtime.cli", "serve", "--config", str(y),
                          "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 90, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        streams = {"short": ([], threading.Event(), 20), "long": ([], threading.Event(), 1000)}

        def client(name):
            lines, started, n = streams[name]
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": n, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=90) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        ths = [threading.Thread(target=client, args=(k,)) for k in streams]
        for th in ths:
            th.start()
        assert all(v[1].wait(30) for v in streams.values())
        p.send_signal(signal.SIGTERM)
        t_term = time.time()
        for th in ths:
            th.join(90)
            assert not th.is_alive()
        rc = p.wait(60)
        assert rc == 0   # a clean shutdown after SIGTERM exits 0 (uvicorn would re-raise the signal)
        assert time.time() - t_term < 40
        for name, (lines, _, n) in streams.items():
            assert lines[-1] == "data: [DONE]", (name, lines[-3:])
            events = [json.loads(x[6:]) for x in lines[:-1]]
            reasons = [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]
            errors = [e["error"]["message"] for e in events if "error" in e]
            if name == "long":    # cut by the graceful-shutdown deadline: a clear error, not a silent cut
                assert not reasons and errors and "shutting down" in errors[0]
            else:                 # finished normally (or, on a very slow machine, the same clear error)
                assert reasons == ["length"] or (errors and "shutting down" in errors[0])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ray_serve_module_importable():
    import moeyard.cluster.serve as rs
    assert callable(rs.build_deployment) and callable(rs.app_builder)
