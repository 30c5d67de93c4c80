"""One offload configuration, several passes: per-token time, hit rate, stall, reader CPU, miss rate per MoE layer.

    .venv/bin/python benchmarks/offload_passes.py [--fraction 0.25] [--passes 6] [--opts '{"width": 2}'] [--lru]

For paired comparisons of two versions of the code (``git stash`` / ``git checkout`` between runs, alternating
A B A B ...): the figures in docs/BENCHMARKS.md's "Overhead pass" list (reader nap, reader threads, next-step
first-layer prefetch) were taken this way. Each pass generates 4 × 32 greedy tokens from new held-out prompts
(seed 100 + pass) at decode batch 1 after a warm-up on prompts of its own; reported: median and best wall and
compute-process CPU milliseconds per token, then the counters over all passes. One torch thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--fraction", type=float, default=0.25, help="expert_cache_fraction")
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--opts", default="{}", help="extra offload options as JSON")
    ap.add_argument("--lru", action="store_true", help="on-demand LRU, no prediction (the baseline)")
    ap.add_argument("--local", action="store_true", help="local mode (all resident)")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from bench_offload_small import model_path, prompts
    from moeyard.offload import cache as cache_mod
    from moeyard.runtime.llm import LLM
    from moeyard.runtime.sampling import SamplingParams
    path = a.model or model_path()[0]
    if a.local:
        opts, mode = {}, "local"
    else:
        mode = "offload"
        opts = dict(expert_cache_fraction=a.fraction, trace=os.path.join(path, "trace.npz"))
        opts.update(dict(prefetch=False, eviction="lru", token_scheduling=False) if a.lru else
                    dict(predictor="combined"))
        opts.update(json.loads(a.opts))
    requests, misses = collections.Counter(), collections.Counter()
    orig_get = cache_mod.ExpertCache.get

    def get(self, layer, expert):                 # hit/miss as classified when the layer routed
        requests[layer] += 1
        misses[layer] += self._class.get((layer, expert)) is False
        return orig_get(self, layer, expert)
    cache_mod.ExpertCache.get = get
    llm = LLM(path, mode=mode, max_num_seqs=1, **opts)
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts(path, 2, 999), sampling_params=SamplingParams(max_tokens=4, temperature=0))
    walls, cpus = [], []
    for p in range(a.passes):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompt_token_ids=prompts(path, 4, 100 + p), sampling_params=sp)
        n = sum(len(o.token_ids) for o in outs)
        walls.append((time.perf_counter() - t0) * 1e3 / n)
        cpus.append((time.process_time() - c0) * 1e3 / n)
    st = llm.stats()
    llm.close()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"mode": mode, "opts": opts, "wall_ms_per_token_median": round(statistics.median(walls), 3),
           "wall_ms_per_token_best": round(min(walls), 3), "cpu_ms_per_token_median": round(statistics.median(cpus), 3),
           "passes_wall_ms": [round(w, 2) for w in walls]}
    if mode == "offload":
        res.update({k: st.get(k) for k in ("hit_rate", "stall_seconds", "prefetch_issued", "prefetch_used",
                                           "prefetch_late", "prefetch_not_started", "slots_stolen", "io_mode")})
        res["stall_seconds"] = round(res["stall_seconds"], 3)
        res["reader_cpu_s"] = round(child.ru_utime + child.ru_stime, 2)
        res["miss_rate_per_layer"] = {l: round(misses[l] / requests[l], 3) for l in sorted(requests)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
