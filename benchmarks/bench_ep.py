"""Expert parallelism on Ray: bytes crossing workers per generated token, local fraction and tokens/s for
{standard, coherent} x {round_robin, affinity}, then what the measured local fractions mean at 64 workers on
two-tier links (``moeyard.placement.simulate``).

    RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 .venv/bin/python benchmarks/bench_ep.py [--model default]

Without the default model (``moe/default_model``) pass ``--random`` to benchmark a random Mixtral of the same
shape (routing of a random model has no structure, so affinity has little to find there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEXTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The theory of relativity changed the way physicists think about space and time because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The best way to learn a new language is to",
    "In 1969 the first humans landed on the moon, and",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The stock market fell sharply on Monday after investors",
    "To make a simple tomato sauce, first heat the olive oil and",
]


def random_mixtral(path: str):
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.experts import ParamExperts
    from moeyard.moe.model import MoEForCausalLM
    from moeyard.moe.save import mixtral_config_dict, save_mixtral
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    d = mixtral_config_dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                            num_experts=16, top_k=2, intermediate_size=512, max_position_embeddings=1024,
                            dtype="float32")
    cfg = MoEConfig.from_dict(d)
    torch.manual_seed(0)
    m = MoEForCausalLM(cfg, max_positions=1024)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.experts = ParamExperts(cfg, init_std=0.05)
    save_mixtral(m.state_dict(), m.experts, cfg, d, path, dtype=torch.float32)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--random", action="store_true", help="use a random Mixtral if the model is missing")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--placement-time-limit", type=float, default=20.0)
    ap.add_argument("--out", default="runs/bench/ep.json")
    a = ap.parse_args()

    import ray

    from moeyard.moe.loader import resolve_model_path
    from moeyard.runtime import LLM, SamplingParams
    try:
        path = resolve_model_path(a.model)
    except Exception:
        if not a.random:
            raise
        path = random_mixtral("/tmp/moeyard_bench_random_mixtral")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)

    results, affinity_file = [], None
    for placement in ("round_robin", "affinity"):
        for scheme in ("standard", "coherent"):
            pl = placement if (placement != "affinity" or affinity_file is None) else affinity_file
            t0 = time.perf_counter()
            llm = LLM(path, mode="ray", num_workers=a.workers, placement=pl, ep_scheme=scheme,
                      max_num_seqs=a.prompts, placement_time_limit=a.placement_time_limit)
            start_s = time.perf_counter() - t0
            ex = llm.engine.executor
            if placement == "affinity" and affinity_file is None:      # solve once, reuse for the other scheme
                affinity_file = os.path.abspath(os.path.join(os.path.dirname(a.out), "ep_affinity_placement.json"))
                os.makedirs(os.path.dirname(affinity_file), exist_ok=True)
                h = ex.placement_info["holders"]
                with open(affinity_file, "w") as f:
                    json.dump({"num_workers": a.workers, "assignment": [[list(c) for c in row] for row in h]}, f)
            if llm.tokenizer is not None:
                prompts = [llm.tokenizer.encode(TEXTS[i % len(TEXTS)]) for i in range(a.prompts)]
            else:
                rng = np.random.default_rng(0)
                prompts = [rng.integers(0, llm.cfg.vocab_size, 24).tolist() for _ in range(a.prompts)]
            llm.generate(prompt_token_ids=[prompts[0][:4]], sampling_params=SamplingParams(max_tokens=2))  # warm
            s0 = llm.stats()
            t1 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            wall = time.perf_counter() - t1
            s1 = llm.stats()
            llm.close()
            gen = s1["tokens_generated"] - s0["tokens_generated"]
            proc = gen + sum(len(p) for p in prompts)
            d = {k: s1[k] - s0.get(k, 0) for k in ("a2a_bytes", "moe_bytes", "kv_bytes", "hidden_bytes",
                                                     "meta_bytes", "a2a_calls", "routed_assignments")}
            loc = (s1["local_fraction"] * s1["routed_assignments"] - s0["local_fraction"] * s0["routed_assignments"])
            r = {"placement": placement, "scheme": scheme, "generated": gen, "prompt_tokens": proc - gen,
                 "bytes_per_generated_token": d["a2a_bytes"] / gen,
                 "bytes_per_processed_token": d["a2a_bytes"] / proc,
                 "breakdown_per_generated_token": {k: d[k] / gen for k in ("moe_bytes", "kv_bytes", "hidden_bytes",
                                                                           "meta_bytes")},
                 "a2a_calls_per_step": d["a2a_calls"] / max(1, (s1["ep_steps"] - s0["ep_steps"])),
                 "local_fraction": loc / d["routed_assignments"], "tokens_per_s": gen / wall,
                 "startup_s": start_s, "errors": sum(o.finish_reason == "error" for o in outs),
                 "tokens": [o.token_ids for o in outs]}
            results.append(r)
            print(f"{placement:12s} {scheme:9s} bytes/gen-token {r['bytes_per_generated_token']:10.0f}  "
                  f"local {r['local_fraction']:.3f}  tok/s {r['tokens_per_s']:6.1f}  "
                  f"{ {k: round(v) for k, v in r['breakdown_per_generated_token'].items()} }", flush=True)
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print("all four configurations produce identical greedy tokens:", same)

    # what the measured local fractions mean at 64 workers (8 nodes x 8), two-tier links
    sim = []
    try:
        from moeyard.placement import simulate
        from moeyard.moe.config import MoEConfig
        cfg = MoEConfig.from_dir(path)
        for r in results:
            for hidden in (cfg.hidden_size, 4096):
                s = simulate(None, None, 64, 8, intra_gbps=150.0, inter_gbps=25.0, hidden_size=hidden,
                             bytes_per_elem=2, tokens_per_step=256, local_fraction=r["local_fraction"],
                             num_layers=len(cfg.moe_layers), top_k=cfg.top_k)
                sim.append({"placement": r["placement"], "scheme": r["scheme"], "hidden": hidden, "local_fraction": r["local_fraction"],
                            "bytes_intra": s.bytes_intra, "bytes_inter": s.bytes_inter, "seconds": s.seconds})
                print(f"sim 64w/8n hidden {hidden}: {r['placement']:12s} {r['scheme']:9s} local {r['local_fraction']:.3f} "
                      f"bytes/step {s.bytes_total / 1e6:8.2f} MB  time/step {s.seconds * 1e6:8.1f} us")
    except Exception as exc:  # noqa: BLE001
        print("placement simulator not usable:", exc)
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}",
           "model": path, "workers": a.workers, "results": results, "identical_tokens": same, "simulation": sim}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
