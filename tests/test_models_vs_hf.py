"""Our model against transformers (the oracle) on tiny random checkpoints of every architecture."""

import pytest
import torch

from moeyard.moe.loader import load_model
from moeyard.moe.model import ForwardBatch
from moeyard.runtime import LLM, SamplingParams
from tiny_models import ARCHS

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [200, 13, 99, 4]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_logits_match_transformers(tiny_ckpt, arch, fused):
    path, hf = tiny_ckpt(arch, fused=fused)
    lm = load_model(path, device="cpu")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model(ids.reshape(-1), ForwardBatch.blocks(2, 16, "cpu")).view(2, 16, -1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_ckpt, arch):
    path, hf = tiny_ckpt(arch, sharded=(arch == "mixtral"))
    llm = LLM(path, max_num_seqs=8)
    outs = llm.generate(prompt_token_ids=PROMPTS,
                        sampling_params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        assert o.finish_reason == "length"
    assert llm.stats()["tokens_generated"] == 24 * len(PROMPTS)


def test_sharded_checkpoint_has_index(tiny_ckpt):
    import os
    path, _ = tiny_ckpt("mixtral", sharded=True)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
