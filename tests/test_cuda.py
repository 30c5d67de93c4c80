"""CUDA paths (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine): local mode on the GPU
equals transformers; offload's GPU slots fed through the pinned host tier and the copy stream are lossless, hit the
host tier, and never reuse a slot before the compute stream is done with it."""

import pytest
import torch

from moeyard.runtime.llm import LLM
from moeyard.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 5, 9, 30, 77, 12], [3, 4, 100, 2], list(range(40, 70)), [42]]
SP = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _gen(llm):
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    finally:
        llm.close()


def _hf(hf, p, n=12):
    return hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_local_mode_on_gpu_equals_transformers(tiny_ckpt, arch):
    path, hf = tiny_ckpt(arch)
    llm = LLM(path, max_num_seqs=4, dtype="float32")
    assert llm._ctx.device.type == "cuda"
    assert _gen(llm) == [_hf(hf, p) for p in PROMPTS]


@pytest.mark.parametrize("opts", [dict(), dict(host_cache_fraction=0.5), dict(host_cache_fraction=0),
                                  dict(prefetch=False, eviction="lru", host_cache_fraction=0.3)])
def test_offload_on_gpu_is_lossless(tiny_ckpt, opts):
    path, _ = tiny_ckpt("mixtral")
    ref = _gen(LLM(path, max_num_seqs=4, dtype="float32"))
    llm = LLM(path, mode="offload", max_num_seqs=4, dtype="float32", expert_cache_fraction=0.25, **opts)
    st_holder = {}
    out = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    st_holder.update(llm.stats())
    llm.close()
    assert out == ref
    if opts.get("host_cache_fraction", 1) > 0:
        assert st_holder["host_hits"] > 0, st_holder
    else:
        assert "host_hits" not in st_holder
