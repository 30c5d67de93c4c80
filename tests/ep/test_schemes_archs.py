"""Every scheme serves every architecture's attention: deepseek_v3 (MLA: the compressed latent is what is
replicated, moved and split), gpt_oss (sinks, sliding window), glm4_moe (partial RoPE, q/k/v bias, per-head q/k
norm) and minimax_m2 (q/k norm over the full projection: heads picked after it) token-identical to local mode at 2
and 4 workers, with and without speculative shuffling. Workers in threads over gloo; Ray in test_spec_ray.py."""

import warnings

import pytest

from moeyard.cluster import layout
from moeyard.cluster.executor import thread_executor
from moeyard.runtime import LLM, SamplingParams
from executors import generate_with

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# the 31-token prompt runs past gpt_oss's sliding window (8) and is prefilled in chunks
PROMPTS = [[5, 6, 7], list(range(30, 61)), [100], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]
EAGER = dict(max_moves=4, horizon=1e6, calibration_tokens=256)
ARCHS = ("deepseek_v3", "gpt_oss", "glm4_moe", "minimax_m2")


@pytest.fixture(scope="module")
def local_runs(tiny_ckpt):
    out = {}
    for arch in ARCHS:
        path, _ = tiny_ckpt(arch)
        llm = LLM(path, max_num_seqs=4, max_num_batched_tokens=16)
        out[arch] = (path, llm, [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS,
                                                                    sampling_params=GREEDY)])
    return out


def run(llm, ex):
    return generate_with(llm, ex, PROMPTS, GREEDY)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scheme", ["standard", "coherent", "tp"])
@pytest.mark.parametrize("spec", [False, True], ids=["plain", "shuffle"])
def test_lossless(local_runs, arch, world, scheme, spec):
    path, llm, want = local_runs[arch]
    placement = layout.static_placement("round_robin", llm.cfg, world)
    opts = ({"slack": 0.5} if scheme == "tp" else EAGER) if spec else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tiny checkpoints ship no trace.npz: calibration warning
        ex = thread_executor(path, placement, world, scheme, max_num_seqs=4, max_model_len=llm.max_model_len,
                             speculative_shuffle=spec, shuffle_options=opts)
    assert run(llm, ex) == want, (arch, world, scheme, spec)
    st = ex.stats()
    assert 0 < st["local_fraction"] < 1
    assert st["a2a_bytes"] == sum(st[f"{k}_bytes"] for k in ("moe", "kv", "hidden", "meta", "shuffle", "tp"))
    assert (st["kv_bytes"] > 0) == (scheme == "coherent")
    if spec and scheme != "tp":
        # every moved position carries its cache entries (MLA: the latent); coherent: every worker holds every
        # cache, so moving a sequence sends nothing
        assert st["shuffle_bytes"] == st["shuffle_moved_positions"] * ex.spec.kv_bytes_per_position
        assert (ex.spec.kv_bytes_per_position == 0) == (scheme == "coherent")
        if arch == "deepseek_v3":               # its sequences do move (the latent rows of every layer)
            assert st["shuffle_moves"] > 0
    if spec and scheme == "tp":
        assert st["shuffle_bytes"] > 0 and st["tp_bytes"] == 0


def test_mla_replicates_the_latent(local_runs):
    """Coherent on deepseek_v3: a replicated cache entry is the latent (kv_lora_rank + rope dim) plus its
    (slot, pos) row (int32), far less than the heads' expanded K/V."""
    path, llm, want = local_runs["deepseek_v3"]
    cfg = llm.cfg
    ex = thread_executor(path, layout.static_placement("round_robin", cfg, 2), 2, "coherent", max_num_seqs=4,
                         max_model_len=llm.max_model_len)
    assert run(llm, ex) == want
    per_entry = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 + 8
    expanded = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    kv = ex.stats()["kv_bytes"]
    assert kv > 0 and kv % per_entry == 0
    assert per_entry < expanded / 3
