"""Ray Serve deployment of the OpenAI-compatible server: the same ``AsyncLLM`` + FastAPI app, behind ``serve.ingress``.

Each replica loads the model once (any mode: local, offload, or ray, whose workers become further actors) and
serves ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health`` and ``/metrics`` exactly like
``moeyard serve``.

From Python::

    import ray
    from ray import serve
    from moeyard.cluster.serve import build_deployment

    ray.init()
    serve.run(build_deployment("default", mode="local", max_num_seqs=64,
                               ray_actor_options={"num_cpus": 4}), route_prefix="/")
    # -> http://127.0.0.1:8000/v1/completions (Ray Serve's HTTP proxy; port set with serve.start(http_options=...))

From the Ray Serve CLI (arguments are ``key=value`` strings, values parsed as JSON when they can be)::

    serve run moeyard.cluster.serve:app_builder model=/path/to/ckpt mode=local max_num_seqs=32 num_replicas=1

Requests are batched inside a replica by the engine's continuous batching; several replicas (``num_replicas``)
are load-balanced by Ray Serve's router. Nothing here is imported by local mode: only this module needs Ray.
"""

from __future__ import annotations

import json
import os

from ..runtime.async_llm import AsyncLLM
from ..runtime.server import build_app

_REPLICA_LLM: AsyncLLM | None = None   # the replica's engine (one deployment replica per process)


def _replica_llm() -> AsyncLLM | None:
    """Looked up on every request: module-level so that cloudpickle ships it by reference to the replica."""
    return _REPLICA_LLM


def _set_replica_llm(llm: AsyncLLM | None) -> None:
    """Module-level (pickled by reference), so the replica sets the real module's engine, not a pickled copy of
    this module's globals that the deployment class (defined inside a function, so pickled by value) would get."""
    global _REPLICA_LLM
    _REPLICA_LLM = llm


def build_deployment(model: str = "default", mode: str = "local", model_name: str | None = None,
                     num_replicas: int = 1, ray_actor_options: dict | None = None, max_ongoing_requests: int = 256,
                     **llm_kwargs):
    """A bound Ray Serve application serving ``model`` in ``mode`` (``llm_kwargs`` go to ``LLM``: max_num_seqs,
    max_model_len, dtype, mode options...). Pass the result to ``serve.run``."""
    from ray import serve

    name = model_name or (model if model == "default" else os.path.basename(os.path.normpath(model)))
    app = build_app(_replica_llm, name)

    @serve.deployment(name="moeyard", num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options=ray_actor_options or {"num_cpus": 1})
    @serve.ingress(app)
    class MoeyardServer:
        def __init__(self, model: str, mode: str, llm_kwargs: dict):
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            _set_replica_llm(AsyncLLM.from_model(model, mode=mode, **llm_kwargs))

        async def check_health(self):
            llm = _replica_llm()
            if llm is None or not llm.health()["live"]:      # restarting (degraded) is still alive
                raise RuntimeError("the engine is down")

        def __del__(self):
            llm = _replica_llm()
            if llm is not None:
                llm.shutdown()

    return MoeyardServer.bind(model, mode, dict(llm_kwargs))


def app_builder(args: dict):
    """Entry point for ``serve run moeyard.cluster.serve:app_builder key=value ...``."""
    kw = {}
    for k, v in dict(args).items():
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        kw[k.replace("-", "_")] = v
    if "model" in kw:
        kw["model"] = str(kw["model"])
    return build_deployment(**kw)
