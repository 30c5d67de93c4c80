"""Decode speed of the local engine against transformers on a Mixtral-shaped random checkpoint (≥ 1 GB).

Each system runs in its own subprocess (so peak RSS is its own), alternately, on the same checkpoint:
- decode tokens/s at batch 1 and batch 16 (greedy, fixed new-token count, timing excludes prefill by
  subtracting a 1-token run);
- batch-1 roofline: active weight bytes per token (dense + top-k experts per layer) × tokens/s ÷ the copy
  bandwidth measured in the same run (STREAM convention: bytes read + written);
- peak RSS of our engine against the checkpoint size.

    python benchmarks/bench_engine.py [--ckpt /tmp/moeyard-bench-mixtral] [--record]

``--arch deepseek_v3``: the same decode comparison on a DeepSeek-V3-shaped random checkpoint (MLA, YaRN,
group-limited sigmoid routing, shared expert, a dense first layer; written by transformers'
``DeepseekV3ForCausalLM`` at random init + ``save_pretrained`` into /tmp), plus the KV cache bytes per token of
our compressed latent cache against what full keys and values would take.

    python benchmarks/bench_engine.py --arch deepseek_v3 [--ckpt /tmp/moeyard-bench-dsv3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPE = dict(vocab_size=8000, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, num_experts=8,
             top_k=2, intermediate_size=2816, max_position_embeddings=2048)


def make_checkpoint(path: str, dtype: str = "float32", **shape):
    """A random Mixtral of ``SHAPE`` (overridden by ``shape``) written to ``path`` in ``dtype``, once."""
    import torch
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.experts import ExpertWeights
    from moeyard.moe.save import mixtral_config_dict, save_mixtral
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    cd = mixtral_config_dict(**{**SHAPE, **shape}, dtype=dtype)
    cfg = MoEConfig.from_dict(cd)
    g = torch.Generator().manual_seed(0)
    D, F, V = cfg.hidden_size, cfg.expert_intermediate_size, cfg.vocab_size

    def rnd(*s, std=0.02):
        return torch.randn(*s, generator=g) * std

    state = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": torch.ones(D), "lm_head.weight": rnd(V, D)}
    for l in range(cfg.num_layers):
        p = f"model.layers.{l}"
        state.update({f"{p}.input_layernorm.weight": torch.ones(D), f"{p}.post_attention_layernorm.weight": torch.ones(D),
                      f"{p}.self_attn.q_proj.weight": rnd(D, D), f"{p}.self_attn.k_proj.weight": rnd(D // 4, D),
                      f"{p}.self_attn.v_proj.weight": rnd(D // 4, D), f"{p}.self_attn.o_proj.weight": rnd(D, D),
                      f"{p}.mlp.gate.weight": rnd(cfg.num_experts, D, std=0.5)})

    class Experts:
        def get(self, l, e):
            return ExpertWeights(rnd(F, D), rnd(F, D), rnd(D, F))

    save_mixtral(state, Experts(), cfg, cd, path, dtype=getattr(torch, dtype), max_shard_bytes=600 << 20)


DSV3_SHAPE = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=1024,
                  num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
                  n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                  q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, max_position_embeddings=2048,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                   "rope_theta": 10000.0})


def make_checkpoint_dsv3(path: str):
    """Random-init DeepseekV3ForCausalLM (routers scaled up, random score-correction bias) saved by transformers."""
    import torch
    import transformers
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**DSV3_SHAPE)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.05)
    model.save_pretrained(path, max_shard_size="600MB")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not inherit the parent's size across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large tensor copy (best of 5)."""
    import torch
    a = torch.empty(256 << 20, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() / (time.perf_counter() - t))
    return best


def worker(system: str, ckpt: str, batch: int, new_tokens: int) -> dict:
    import torch
    if system == "moeyard":
        import moeyard.runtime  # noqa: F401 — counted in the process baseline below
    else:
        import transformers  # noqa: F401
    base = peak_rss()
    torch.manual_seed(0)
    prompts = [[(7 * i + j) % 7000 + 10 for j in range(16)] for i in range(batch)]
    if system == "moeyard":
        from moeyard.runtime import LLM, SamplingParams
        llm = LLM(ckpt, max_num_seqs=max(batch, 2), max_model_len=256)

        def run(n):
            t = time.perf_counter()
            llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=n, temperature=0,
                                                                                 ignore_eos=True))
            return time.perf_counter() - t
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        ids = torch.tensor(prompts)

        def run(n):
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            return time.perf_counter() - t
    run(2)  # warm-up
    t1 = min(run(1) for _ in range(2))
    tn = min(run(new_tokens) for _ in range(2))
    decode_tps = batch * (new_tokens - 1) / max(tn - t1, 1e-9)
    return {"system": system, "batch": batch, "decode_tok_s": decode_tps, "peak_rss": peak_rss(), "base_rss": base}


def sub(system, ckpt, batch, n):
    out = subprocess.run([sys.executable, __file__, "--worker", system, "--ckpt", ckpt, "--batch", str(batch),
                          "--new-tokens", str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--arch", default="mixtral", choices=["mixtral", "deepseek_v3"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a.batch, a.new_tokens)))
        return
    if a.arch == "deepseek_v3":
        return main_dsv3(a)
    a.ckpt = a.ckpt or "/tmp/moeyard-bench-mixtral"
    make_checkpoint(a.ckpt)
    from moeyard.moe.checkpoint import CheckpointReader
    from moeyard.moe.config import MoEConfig
    from common import record, table
    cfg = MoEConfig.from_dir(a.ckpt)
    rd = CheckpointReader(a.ckpt)
    size = sum(rd.nbytes(n) for n in rd.names())
    expert = cfg.expert_bytes(4)
    dense = size - expert * cfg.num_experts * cfg.num_layers - cfg.vocab_size * cfg.hidden_size * 4  # minus embedding
    active = dense + cfg.hidden_size * 4 + cfg.top_k * expert * cfg.num_layers
    bw = copy_bandwidth()
    res = {}
    for batch in (1, 16):
        for system in ("moeyard", "transformers"):
            res[(system, batch)] = sub(system, a.ckpt, batch, a.new_tokens)
    rows = []
    for batch in (1, 16):
        ours, hf = res[("moeyard", batch)], res[("transformers", batch)]
        rows.append([batch, ours["decode_tok_s"], hf["decode_tok_s"], ours["decode_tok_s"] / hf["decode_tok_s"]])
    ours1 = res[("moeyard", 1)]
    base_rss = max(res[("moeyard", b)]["base_rss"] for b in (1, 16))
    roof = active * ours1["decode_tok_s"] / bw
    body = (f"Checkpoint: random Mixtral shape {SHAPE}, float32, {size / 2**30:.2f} GiB on disk.\n\n"
            + table(["batch", "moeyard decode tok/s", "transformers decode tok/s", "ratio"], rows)
            + f"\n\nBatch-1 roofline: {active / 2**20:.0f} MiB of active weights per token × "
              f"{ours1['decode_tok_s']:.2f} tok/s = {active * ours1['decode_tok_s'] / 1e9:.2f} GB/s against a copy "
              f"bandwidth of {bw / 1e9:.2f} GB/s (read + write) measured in the same run: **{100 * roof:.0f}%**.\n\n"
            f"Peak RSS: moeyard {max_peak_rss(res, 'moeyard') / 2**30:.2f} GiB "
            f"({max_peak_rss(res, 'moeyard') / size:.2f}× the checkpoint; "
            f"{(max_peak_rss(res, 'moeyard') - base_rss) / size:.2f}× above the "
            f"{base_rss / 2**20:.0f} MiB of the process after importing torch and moeyard); transformers "
            f"{max_peak_rss(res, 'transformers') / 2**30:.2f} GiB.")
    print(body)
    if a.record:
        record("Engine (local mode) vs transformers", "python benchmarks/bench_engine.py --record", body)


def max_peak_rss(res: dict, system: str) -> int:
    """Largest peak RSS of ``system`` over the batch sizes run (``res[(system, batch)]``)."""
    return max(v["peak_rss"] for (s, _), v in res.items() if s == system)


def main_dsv3(a):
    a.ckpt = a.ckpt or "/tmp/moeyard-bench-dsv3"
    make_checkpoint_dsv3(a.ckpt)
    import torch
    from moeyard.moe.checkpoint import CheckpointReader
    from moeyard.moe.config import MoEConfig
    from moeyard.runtime.modes import new_kv_cache
    from common import record, table
    cfg = MoEConfig.from_dir(a.ckpt)
    rd = CheckpointReader(a.ckpt)
    size = sum(rd.nbytes(n) for n in rd.names())
    kv = new_kv_cache(cfg, 1, 16, torch.float32, torch.device("cpu"))
    ours_kv = kv.bytes_per_token()
    full_kv = cfg.num_layers * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    res = {}
    for batch in (1, 8):
        for system in ("moeyard", "transformers"):
            res[(system, batch)] = sub(system, a.ckpt, batch, a.new_tokens)
            print(res[(system, batch)], flush=True)
    rows = []
    for batch in (1, 8):
        ours, hf = res[("moeyard", batch)], res[("transformers", batch)]
        rows.append([batch, ours["decode_tok_s"], hf["decode_tok_s"], ours["decode_tok_s"] / hf["decode_tok_s"]])
    shape = {k: v for k, v in DSV3_SHAPE.items() if k != "rope_parameters"}
    body = (f"Checkpoint: random DeepSeek-V3 shape {shape}, YaRN factor 4 (mscale_all_dim 1), float32, "
            f"written by transformers `DeepseekV3ForCausalLM.save_pretrained` (per-expert layout), "
            f"{size / 2**30:.2f} GiB on disk. 16-token prompts, {a.new_tokens} new tokens, greedy; decode tok/s "
            f"excludes prefill (a 1-token run is subtracted). Each system in its own subprocess.\n\n"
            + table(["batch", "moeyard decode tok/s", "transformers decode tok/s", "ratio"], rows)
            + f"\n\nKV cache per token (all {cfg.num_layers} layers, float32): moeyard caches the MLA latent "
              f"(kv_lora_rank {cfg.kv_lora_rank} after kv_a_layernorm + roped k_pe {cfg.qk_rope_head_dim}) = "
              f"**{ours_kv} B/token**; full keys and values ({cfg.num_heads} heads × (qk {cfg.qk_nope_head_dim}+"
              f"{cfg.qk_rope_head_dim} + v {cfg.v_head_dim})) would take {full_kv} B/token: "
              f"**{full_kv / ours_kv:.1f}× smaller**. (At DeepSeek-V3's real shape, 128 heads × (192 + 128) vs "
              f"512 + 64, the ratio is {128 * 320 / 576:.0f}×.)\n\n"
              f"Peak RSS: moeyard {max_peak_rss(res, 'moeyard') / 2**30:.2f} GiB, "
              f"transformers {max_peak_rss(res, 'transformers') / 2**30:.2f} GiB.")
    print(body)
    if a.record:
        record("DeepSeek-V3 and gpt-oss", "python benchmarks/bench_engine.py --arch deepseek_v3 --record", body)


if __name__ == "__main__":
    main()
