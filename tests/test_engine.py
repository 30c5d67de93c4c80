"""Engine behaviour: batching invariance, continuous batching, sampling controls, stop conditions."""

import pytest
import torch

from moeyard.runtime import LLM, SamplingParams
from moeyard.runtime.sampling import RequestError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(30, 71)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    path, _ = tiny_ckpt("qwen2_moe")
    return LLM(path, max_num_seqs=4, max_num_batched_tokens=32)


def test_batched_equals_unbatched(llm):
    together = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_continuous_batching_equals_one_by_one(llm):
    """Requests join while others decode (and more than max_num_seqs wait): same tokens as alone."""
    alone = {i: llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for i, p in enumerate(PROMPTS)}
    eng = llm.engine
    seqs = {}
    prompts = PROMPTS + PROMPTS[:2]
    seqs[0] = eng.add_request(prompt_token_ids=prompts[0], params=GREEDY)
    step = 0
    while eng.has_unfinished() or len(seqs) < len(prompts):
        if len(seqs) < len(prompts) and step % 3 == 2:
            i = len(seqs)
            seqs[i] = eng.add_request(prompt_token_ids=prompts[i], params=GREEDY)
        eng.step()
        step += 1
    for i, s in seqs.items():
        assert s.output_ids == alone[i % len(PROMPTS)], i
        eng.pop(s.request_id)


def test_seeded_sampling_is_reproducible(llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0].token_ids
    b = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0].token_ids
    c = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(
        max_tokens=12, temperature=1.0, seed=124, ignore_eos=True))[0].token_ids
    assert a == b and len(a) == 12
    assert a != c


def test_top_k_one_is_greedy(llm):
    g = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=GREEDY)[0].token_ids
    s = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(
        max_tokens=16, temperature=0.7, top_k=1, seed=0, ignore_eos=True))[0].token_ids
    assert g == s


def test_stop_token_ids_and_max_tokens(llm):
    full = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=GREEDY)[0].token_ids
    stop_at = full[5]
    first = full.index(stop_at)
    o = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(
        max_tokens=16, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert o.token_ids == full[:first + 1] and o.finish_reason == "stop"
    o = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(o.token_ids) <= 3


def test_eos_stops_unless_ignored(tiny_ckpt):
    path, _ = tiny_ckpt("qwen2_moe")
    base = LLM(path, max_num_seqs=2)
    full = base.generate(prompt_token_ids=[[4, 5]], sampling_params=GREEDY)[0].token_ids
    base.engine.eos_ids = (full[3],)
    o = base.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(max_tokens=16, temperature=0))[0]
    assert o.finish_reason == "stop" and o.token_ids[-1] == full[3] and len(o.token_ids) == full.index(full[3]) + 1
    o = base.generate(prompt_token_ids=[[4, 5]], sampling_params=GREEDY)[0]
    assert o.token_ids == full


def test_context_limit_and_bad_requests(llm):
    with pytest.raises(RequestError, match="context"):
        llm.generate(prompt_token_ids=[list(range(200)) * 30], sampling_params=GREEDY)
    for kw, msg in [({"max_tokens": -1}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(RequestError, match=msg):
            SamplingParams(**kw)
    with pytest.raises(RequestError, match="token ids"):
        llm.generate(prompt_token_ids=[[1, 99999]], sampling_params=GREEDY)
    # the engine still serves after rejected requests
    assert len(llm.generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY)[0].token_ids) == 16


def test_max_tokens_beyond_context_is_refused(tiny_ckpt):
    """max_tokens past the context is an error naming both lengths (it used to be capped silently); a request that
    fits exactly runs to the context end."""
    path, _ = tiny_ckpt("qwen2_moe")
    small = LLM(path, max_num_seqs=2, max_model_len=20)
    with pytest.raises(RequestError, match=r"context is 20 tokens.*31 \(15 in the prompt, 16 in max_tokens\)") as e:
        small.generate(prompt_token_ids=[list(range(1, 16))], sampling_params=GREEDY)
    assert e.value.param == "max_tokens"
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    o = small.generate(prompt_token_ids=[list(range(1, 16))], sampling_params=sp)[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5


def test_unknown_mode_names_valid_ones(tiny_ckpt):
    path, _ = tiny_ckpt("qwen2_moe")
    with pytest.raises(ValueError, match="valid modes: local"):
        LLM(path, mode="warp")


def test_a_failing_step_fails_only_its_requests(llm):
    ex = llm.engine.executor
    orig = ex.execute
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk read failed")
        return orig(items)

    ex.execute = flaky
    try:
        bad = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)[0]
    finally:
        ex.execute = orig
    assert bad.finish_reason == "error" and "disk read failed" in bad.error
    assert len(llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)[0].token_ids) == 16
