"""A fault per mode under the HTTP server, recovered without restarting the process: a stopped (SIGSTOP) offload
reader with a /metrics scrape during the stall, and a SIGKILLed Ray worker (the supervisor rebuilds the workers).
The engine-thread failure of local mode is in test_hardening.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from moeyard.runtime import LLM, AsyncLLM
from moeyard.runtime.server import build_app

BODY = {"model": "tiny", "prompt": [5, 6, 7], "temperature": 0, "ignore_eos": True}


def run(allm, fn):
    app = build_app(allm, "tiny")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as cl:
            return await fn(cl)
    return asyncio.run(asyncio.wait_for(go(), 240))


def test_offload_reader_sigstop_with_scrape(serve_ckpt):
    llm = LLM(serve_ckpt, mode="offload", expert_cache_fraction=0.25, read_timeout=2.0, max_num_seqs=2,
              max_model_len=1024)
    proc = llm.engine.executor.cache.proc
    assert proc is not None, "expected the reader process on CPU"
    allm = AsyncLLM(llm)
    stopped = []

    async def fn(cl):
        ref = (await cl.post("/v1/completions", json={**BODY, "max_tokens": 8})).json()["choices"][0]["text"]
        task = asyncio.create_task(cl.post("/v1/completions", json={**BODY, "max_tokens": 900}))
        while not (await allm.stats()).get("running"):
            await asyncio.sleep(0.01)
        pid = proc.proc.pid
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        await asyncio.sleep(0.5)
        for _ in range(3):                        # scrapes during the stall answer at once
            t0 = time.monotonic()
            m = await cl.get("/metrics")
            assert m.status_code == 200 and time.monotonic() - t0 < 1.0
            assert "moeyard_stats_age_seconds" in m.text
            await asyncio.sleep(0.3)
        r = await task                            # the hung reader is found after read_timeout, replaced
        assert r.status_code in (200, 500), r.text
        if r.status_code == 500:
            assert "reader" in r.json()["error"]["message"]
        assert proc.restarts >= 1 and proc.proc.pid != pid
        assert (await cl.get("/health")).status_code == 200
        again = await cl.post("/v1/completions", json={**BODY, "max_tokens": 8})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == ref
    try:
        run(allm, fn)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        allm.shutdown()


@pytest.mark.skipif(os.environ.get("MOEYARD_SKIP_RAY_SERVE") == "1", reason="MOEYARD_SKIP_RAY_SERVE=1 is set")
def test_ray_worker_sigkill_under_serve(serve_ckpt):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        llm = LLM(serve_ckpt, mode="ray", num_workers=2, max_num_seqs=2, max_model_len=1024)
        allm = AsyncLLM(llm, restart_backoff=0.2)

        async def fn(cl):
            ref = (await cl.post("/v1/completions", json={**BODY, "max_tokens": 8})).json()["choices"][0]["text"]
            task = asyncio.create_task(cl.post("/v1/completions", json={**BODY, "max_tokens": 900}))
            while not (await allm.stats()).get("running"):
                await asyncio.sleep(0.01)
            victim = llm.engine.executor.group.actors[1]
            pid = await asyncio.to_thread(lambda: ray.get(victim.pid.remote(), timeout=30))
            os.kill(pid, signal.SIGKILL)
            r = await task
            assert r.status_code == 500 and "expert-parallel worker" in r.json()["error"]["message"], r.text
            h = (await cl.get("/health")).json()
            assert h["status"] in ("degraded", "ready")
            for _ in range(1200):                                # the workers are rebuilt in the background
                if allm.health()["status"] == "ready" and allm.restarts == 1:
                    break
                await asyncio.sleep(0.1)
            assert allm.health()["status"] == "ready" and allm.restarts == 1
            again = await cl.post("/v1/completions", json={**BODY, "max_tokens": 8})
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == ref
        try:
            run(allm, fn)
        finally:
            allm.shutdown()
    finally:
        if started:
            ray.shutdown()
