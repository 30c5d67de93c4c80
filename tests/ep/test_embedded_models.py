"""Every mode serves each embedded model token-identically: local (itself equal to transformers, see
tests/test_default_model.py), offload with a quarter of the experts resident, and Ray expert parallelism with the
affinity placement from the model's shipped trace."""

import os

import pytest

pytest.importorskip("ray")

from moeyard.moe.loader import EMBEDDED_MODELS, embedded_model_path  # noqa: E402
from moeyard.runtime import LLM, SamplingParams  # noqa: E402

PROMPTS = ["The city is located on the", "def parse_args(argv):\n    parser =", "\\begin{theorem}\nLet $f$ be"]
SP = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NAMES = ["default", "deepseek-mini"]


def _tokens(llm):
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, SP)]
    finally:
        llm.close()


@pytest.mark.parametrize("name", NAMES)
def test_embedded_model_in_every_mode(ray_cluster, name):
    if not os.path.isfile(os.path.join(embedded_model_path(name), "config.json")):
        pytest.skip(f"the {name} model is absent")
    assert name in EMBEDDED_MODELS
    ref = _tokens(LLM(name, max_num_seqs=4))
    assert _tokens(LLM(name, mode="offload", expert_cache_fraction=0.25, max_num_seqs=4)) == ref
    assert _tokens(LLM(name, mode="ray", num_workers=2, placement="affinity", ep_scheme="standard",
                       max_num_seqs=4)) == ref
