"""Ray mode end to end on one local Ray cluster (shared by the module): lossless, counters, worker death."""

import threading
import time

import pytest

ray = pytest.importorskip("ray")

from moeyard.runtime import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


def local_tokens(path, prompts=PROMPTS, params=GREEDY):
    llm = LLM(path, max_num_seqs=4, max_num_batched_tokens=32)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


@pytest.fixture(scope="module")
def llm2(ray_cluster, tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    llm = LLM(path, mode="ray", num_workers=2, placement="round_robin", ep_scheme="standard", max_num_seqs=4,
              max_num_batched_tokens=32)
    yield llm
    llm.close()


def test_lossless_and_counters_2_workers(llm2, tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    want = local_tokens(path)
    before = llm2.stats()
    got = [o.token_ids for o in llm2.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    assert got == want
    st = llm2.stats()
    assert st["tokens_generated"] - before.get("tokens_generated", 0) == 4 * 8
    assert st["a2a_bytes"] > 0 and st["a2a_calls"] > 0 and st["kv_bytes"] == 0
    assert 0.2 < st["local_fraction"] < 0.8          # 2 workers, round robin: about half the experts are home
    assert st["ray_calls_per_step"] == 2.0           # one call per worker per step, not per layer
    assert st["num_workers"] == 2 and st["ep_scheme"] == "standard"


def test_worker_death_fails_requests_then_restart(llm2, tiny_ckpt):
    path, _ = tiny_ckpt("mixtral")
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    victim = llm2.engine.executor.group.actors[1]
    killed = {}

    def kill():
        killed["t"] = time.monotonic()
        ray.kill(victim, no_restart=True)
    timer = threading.Timer(2.0, kill)
    timer.start()
    outs = llm2.generate(prompt_token_ids=[[1, 2, 3], [4, 5]], sampling_params=long)
    done = time.monotonic()
    timer.join()
    assert "t" in killed, "generation finished before the kill; make it longer"
    assert all(o.finish_reason == "error" for o in outs)
    assert all("expert-parallel worker" in o.error for o in outs), outs[0].error
    assert done - killed["t"] < 30
    # requests admitted while the group is down fail at once with a clear message
    o = llm2.generate(prompt_token_ids=[[7, 7]], sampling_params=GREEDY)[0]
    assert o.finish_reason == "error" and "restart" in o.error
    llm2.restart()
    got = [o.token_ids for o in llm2.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    assert got == local_tokens(path)


def test_int8_experts_in_ray_mode_match_local(ray_cluster, tiny_ckpt):
    """Weight-only int8 (moe/compute.py) on the workers: the same tokens as local mode's int8."""
    path, _ = tiny_ckpt("mixtral")
    local = LLM(path, max_num_seqs=4, max_num_batched_tokens=32, quantization="int8")
    want = [o.token_ids for o in local.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    local.close()
    llm = LLM(path, mode="ray", num_workers=2, placement="round_robin", max_num_seqs=4, max_num_batched_tokens=32,
              quantization="int8")
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        assert got == want
    finally:
        llm.close()
