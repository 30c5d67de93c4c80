"""Ray Serve deployment (starts a Ray cluster; ~30 s). Skipped with MOEYARD_SKIP_RAY_SERVE=1."""

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MOEYARD_SKIP_RAY_SERVE") == "1",
                                reason="MOEYARD_SKIP_RAY_SERVE=1 is set")


def test_ray_serve_deployment(serve_ckpt):
    try:
        from ray import serve  # noqa: F401 — needs the ray[serve] extra (grpcio-reflection, watchfiles, ...)
    except ImportError as e:
        pytest.skip(f"Ray Serve is not installed: {e}")
    import httpx
    import openai
    import ray
    from ray import serve

    from moeyard.cluster.serve import build_deployment
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_deployment(serve_ckpt, model_name="tiny", max_num_seqs=4, max_model_len=256,
                                   ray_actor_options={"num_cpus": 0}), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ready"
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
        chunks = list(c.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        bad = httpx.post(url + "/v1/completions", json={"model": "tiny", "max_tokens": -1, "prompt": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert "moeyard_engine_tokens_generated_total" in httpx.get(url + "/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
