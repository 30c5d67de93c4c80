"""Offload-mode benchmark of issue 5 on the small default model (192 KB experts) and a trace replay; the
benchmark on realistic expert sizes is bench_offload.py.

    .venv/bin/python benchmarks/bench_offload_small.py [--quick] [--skip-big] [--fractions 0.1,0.25,0.5]
        [--only SUBSTR,...] [--repeat N] [--reps 3] [--out /tmp/moeyard_bench_offload/offload.json]

e.g. the headline comparison only, twice: ``--skip-big --fractions 0.25 --only "combined),LRU" --repeat 2``.

Part A (model): the default model (``moe/default_model``) when present, else a random Mixtral written to /tmp.
For budgets 10/25/50 % of experts resident: all-resident local mode vs offload with prediction+prefetch vs
on-demand LRU without prediction — tokens/s, hit rate, stall, bytes, distinct experts per decode step with and
without token scheduling, and predictor precision/recall per look-ahead distance on held-out prompts (the
transition/token tables come from a routing trace recorded on *other* prompts, or the model's ``trace.npz``).

Part B (trace-driven, realistic sizes): a synthetic Mixtral-shaped checkpoint (D=4096, F=14336, bf16: 352 MB per
expert, >= 4 GB) in /tmp, replayed against the cache from a recorded routing trace with a fixed emulated compute
time per layer; hit rate, stall, achieved read GB/s vs the disk's sequential read (fadvise DONTNEED), peak RSS vs
budget. Every configuration runs in its own subprocess (clean peak RSS, no shared page cache state).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
RANDOM_MODEL = "/tmp/moeyard_bench_offload/random_mixtral"
BIG = "/tmp/moeyard_bench_offload/big_mixtral"


def peak_rss_mb() -> float:
    # VmHWM: ru_maxrss would keep the parent's size from before exec (every row reported the parent's 1.6 GB)
    from bench_engine import peak_rss
    return peak_rss() / 2**20


# ---------------------------------------------------------------------------------------------------------------
# models and workloads
def make_random_mixtral(path: str):
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None,
                           tie_word_embeddings=False)
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    m.to(torch.bfloat16).save_pretrained(path, save_original_format=True)


def model_path() -> tuple[str, str]:
    d = os.path.join(ROOT, "moe", "default_model")
    if os.path.isfile(os.path.join(d, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(d)):
        return d, "default model (moe/default_model)"
    make_random_mixtral(RANDOM_MODEL)
    return RANDOM_MODEL, ("random Mixtral (default model not present yet): 8 layers, 8 experts top-2, D=512, "
                          "F=1024, bf16 on disk")


def prompts(path, n, seed, length=24):
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(path)
    rng = np.random.default_rng(seed)
    if tok is not None:
        words = ("the a model expert token layer river city music history science water light small large "
                 "people time world story night market system energy field garden winter language").split()
        texts = [" ".join(rng.choice(words, length)) for _ in range(n)]
        return [tok.encode(t)[:length] for t in texts]
    V = MoEConfig.from_dir(path).vocab_size
    return [rng.integers(0, V, length).tolist() for _ in range(n)]


def record_trace(path, out, n=32, seed=123, max_tokens=32):
    """Routing trace experts[T, L, k] (int16) of local-mode generation over n prompts."""
    import torch
    from moeyard.runtime.llm import LLM
    from moeyard.runtime.sampling import SamplingParams
    llm = LLM(path, max_num_seqs=8)
    rows = {}

    def hook(layer, x, ids, w):
        rows.setdefault(layer, []).append(ids.detach().cpu().to(torch.int16))
    llm.engine.executor.route_hooks.append(hook)
    llm.generate(prompt_token_ids=prompts(path, n, seed), sampling_params=SamplingParams(max_tokens=max_tokens,
                                                                                          temperature=0))
    layers = sorted(rows)
    ex = np.stack([torch.cat(rows[l]).numpy() for l in layers], axis=1)
    np.savez(out, experts=ex)
    return ex.shape


# ---------------------------------------------------------------------------------------------------------------
# Part A worker: one configuration in this process
def run_model(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(cfg.get("threads", 1))
    from moeyard.runtime.llm import LLM
    from moeyard.runtime.sampling import SamplingParams
    path = cfg["path"]
    opts = dict(cfg.get("opts", {}))
    t0 = time.perf_counter()
    llm = LLM(path, mode=cfg["mode"], max_num_seqs=cfg["seqs"], **opts)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts(path, 2, 999), sampling_params=SamplingParams(max_tokens=4,
                                                                                         temperature=0))  # warm-up
    base = llm.stats()
    # ``reps`` passes over different held-out prompts: the median pass is the figure (single short passes on this
    # shared machine vary by +-20%); counters cover all passes
    rates, toks, dt, outs = [], 0, 0.0, []
    for r in range(cfg.get("reps", 1)):
        t0 = time.perf_counter()
        o = llm.generate(prompt_token_ids=prompts(path, cfg["n"], cfg["seed"] + r), sampling_params=sp)
        d = time.perf_counter() - t0
        n = sum(len(x.token_ids) for x in o)
        rates.append(n / d)
        toks, dt, outs = toks + n, dt + d, outs + o
    st = llm.stats()
    res = {"tokens": toks, "seconds": round(dt, 3), "tokens_per_s": round(sorted(rates)[len(rates) // 2], 2),
           "tokens_per_s_passes": [round(x, 1) for x in rates], "load_s": round(load_s, 2),
           "peak_rss_mb": round(peak_rss_mb(), 1), "outputs_hash": hash(tuple(tuple(o.token_ids) for o in outs))}
    if cfg["mode"] == "offload":
        for k in ("expert_hits", "expert_misses", "prefetch_issued", "prefetch_used", "prefetch_late",
                  "prefetch_not_started", "loads_inline", "bytes_loaded", "stall_seconds",
                  "decode_distinct_experts", "decode_steps"):
            res[k] = st[k] - base.get(k, 0)
        req = res["expert_hits"] + res["expert_misses"]
        res["hit_rate"] = round(res["expert_hits"] / req, 4)
        res["stall_seconds"] = round(res["stall_seconds"], 3)
        res["read_gbps_per_thread"] = st["read_gbps"]
        res["io_mode"] = st.get("io_mode")
        res["expert_slots"], res["expert_cache_mb"] = st["expert_slots"], round(st["expert_cache_bytes"] / 2**20, 1)
        if res["decode_steps"]:
            res["distinct_experts_per_decode_step"] = round(res["decode_distinct_experts"] / res["decode_steps"], 2)
        for k, v in st.items():
            if k.startswith("pred_"):
                res[k] = v
        dense = sum(p.numel() * p.element_size() for p in llm.engine.executor.model.parameters())
        res["dense_mb"] = round(dense / 2**20, 1)
        kv = llm.engine.executor.kv
        res["kv_mb"] = round(sum(t.numel() * t.element_size() for t in vars(kv).values()
                                 if isinstance(t, torch.Tensor)) / 2**20, 1)
    llm.close()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Part B: synthetic big checkpoint and trace replay
def write_big_checkpoint(path: str, layers=2, E=8, D=4096, F=14336):
    """Mixtral-layout safetensors with only routers and experts (bf16), written block by block (random bytes)."""
    fn = os.path.join(path, "model.safetensors")
    if os.path.isfile(fn):
        return fn
    os.makedirs(path, exist_ok=True)
    header, off = {}, 0
    for l in range(layers):
        header[f"model.layers.{l}.block_sparse_moe.gate.weight"] = {"dtype": "BF16", "shape": [E, D],
                                                                    "data_offsets": [off, off + E * D * 2]}
        off += E * D * 2
        for e in range(E):
            for w, shape in (("w1", [F, D]), ("w3", [F, D]), ("w2", [D, F])):
                n = shape[0] * shape[1] * 2
                header[f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"] = {
                    "dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
                off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    block = np.random.default_rng(0).integers(0, 2**16, 32 << 20, dtype=np.uint16).tobytes()   # 64 MB
    with open(fn + ".tmp", "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        left = off
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    os.replace(fn + ".tmp", fn)
    cfgd = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": D, "intermediate_size": F,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_local_experts": E, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfgd, f)
    return fn


def run_replay(cfg: dict) -> dict:
    """Replay ``trace`` (held-out part) against the cache of the big checkpoint, compute emulated by sleeping."""
    import torch
    from moeyard.moe.checkpoint import CheckpointReader
    from moeyard.moe.config import MoEConfig
    from moeyard.moe.predictors import TransitionPredictor
    from moeyard.offload.cache import ExpertCache
    from moeyard.offload.tiers import DiskTier
    path = cfg["path"]
    mc = MoEConfig.from_dir(path)
    tr = np.load(cfg["trace"])["experts"].astype(np.int64)
    L, E = len(mc.moe_layers), mc.num_experts
    tr = tr[:, :L] % E
    split = int(len(tr) * 0.5)
    train, test = tr[:split], tr[split:split + cfg["tokens"]]
    rss0 = peak_rss_mb()
    tier = DiskTier(mc, CheckpointReader(path))
    slots = max(mc.top_k, int(round(cfg["fraction"] * L * E)))
    cache = ExpertCache(mc, tier, slots, torch.bfloat16, torch.device("cpu"), eviction=cfg["eviction"],
                        io_threads=cfg["io_threads"])
    pred = TransitionPredictor(train, mc.moe_layers, E, mc.top_k) if cfg["prefetch"] else None
    prev: dict[int, set] = {}
    t0 = time.perf_counter()
    for t in range(len(test)):
        if pred is not None:
            pred.begin(None)
        for li, l in enumerate(mc.moe_layers):
            ids = torch.as_tensor(test[t, li][None, :])
            need = sorted(set(ids.flatten().tolist()))
            cache.begin_layer(l, need)
            if pred is not None:
                pred.observe(l, None, ids)
                min_p = cfg.get("min_p")
                if li + 1 < L and min_p:        # only experts the predictor gives at least min_p
                    sc = pred.scores(l, 1)[0]
                    nxt, pset = mc.moe_layers[li + 1], set((sc >= min_p).nonzero().flatten().tolist())
                elif li + 1 < L:
                    p, _ = pred.predict(l, 1)
                    nxt, pset = mc.moe_layers[li + 1], set(p.flatten().tolist())
                else:                           # the next token's first layer: last token's experts (no score)
                    nxt, pset = mc.moe_layers[0], set() if min_p else prev.get(mc.moe_layers[0], set())
                cache.set_predictions({(nxt, e): 1 for e in pset})
                cache.prefetch(nxt, sorted(pset))
            prev[l] = set(need)
            for e in need:
                w = cache.get(l, e)
                time.sleep(cfg["compute_ms"] / 1e3 / len(need))     # emulated expert compute
        cache.end_step()
    wall = time.perf_counter() - t0
    st = cache.stats()
    reader_mb = cache.proc.rss_anon_mb() if cache.proc is not None else 0.0
    cache.close()
    req = st["expert_hits"] + st["expert_misses"]
    return {"tokens": len(test), "wall_s": round(wall, 2), "tokens_per_s": round(len(test) / wall, 3),
            "hit_rate": round(st["expert_hits"] / req, 4), "stall_s": round(st["stall_seconds"], 2),
            "expert_slots": slots, "budget_mb": round(st["expert_cache_bytes"] / 2**20),
            "bytes_loaded_gb": round(st["bytes_loaded"] / 1e9, 2), "read_gbps_per_read": st["read_gbps"],
            "read_gbps_wall": round(st["bytes_loaded"] / 1e9 / wall, 3), "prefetch_issued": st["prefetch_issued"],
            "prefetch_used": st["prefetch_used"], "peak_rss_mb": round(peak_rss_mb()), "rss_before_cache_mb":
            round(rss0), "io_mode": st["io_mode"], "reader_private_mb": round(reader_mb or 0),
            # the replay never touches the slots, so with the reader process (slots in a shared memfd it fills) the
            # engine's own peak RSS leaves the pool out: memory in use = engine + pool + the reader's private part
            "memory_total_mb": round(peak_rss_mb() + (reader_mb or 0)
                                     + (st["expert_cache_bytes"] / 2**20 if st["io_mode"] == "process" else 0))}


def summarize(res: dict, fracs, round_no: int):
    """Same-run ratios: predicted+prefetch (combined) vs all-resident and vs on-demand LRU at each budget."""
    rt = res.get("resident", {}).get("tokens_per_s")
    for f in fracs:
        p, l = res.get(f"{f}/predicted+prefetch(combined)"), res.get(f"{f}/on-demand LRU")
        if not p or not l or "error" in p or "error" in l or not rt:
            continue
        print(f"[round {round_no}] {f}: hit rate {p['hit_rate']:.3f} (LRU {l['hit_rate']:.3f}); "
              f"{p['tokens_per_s']:.1f} tok/s = {p['tokens_per_s'] / rt:.2f}x resident ({rt:.1f}), "
              f"{p['tokens_per_s'] / l['tokens_per_s']:.2f}x LRU ({l['tokens_per_s']:.1f}); same outputs: "
              f"{p['outputs_hash'] == l['outputs_hash'] == res['resident']['outputs_hash']}", flush=True)


def sub(kind: str, cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([PY, __file__, "--worker", kind, json.dumps(cfg)], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--quick", action="store_true", help="16 tokens per prompt, 25%% budget only")
    ap.add_argument("--skip-big", action="store_true", help="skip part B (trace-driven, realistic sizes)")
    ap.add_argument("--fractions", default=None, help="comma-separated budgets for part A (default 0.1,0.25,0.5)")
    ap.add_argument("--only", default=None, help="run only part A configurations whose name contains one of these "
                    "comma-separated substrings (the all-resident run always runs)")
    ap.add_argument("--repeat", type=int, default=1, help="run part A this many times (rounds interleaved)")
    ap.add_argument("--reps", type=int, default=3, help="part A: generation passes per configuration (different "
                    "prompts each); the median pass's tok/s is reported")
    ap.add_argument("--out", default="/tmp/moeyard_bench_offload/offload.json")
    a = ap.parse_args()
    if a.worker:
        kind, cfg = a.worker
        fn = {"model": run_model, "replay": run_replay}[kind]
        print(json.dumps(fn(json.loads(cfg))))
        return
    path, what = model_path()
    print(f"model: {what}", flush=True)
    trace = os.path.join(path, "trace.npz")
    if not os.path.isfile(trace):
        trace = "/tmp/moeyard_bench_offload/trace.npz"
        if not os.path.isfile(trace):
            print("recording routing trace on training prompts ...", flush=True)
            record_trace(path, trace)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": what,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
                         f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, CPU only",
              "load_average_start": os.getloadavg(), "A": {}, "B": {}}
    # batch-1 decode (the ExpertFlow setting)
    base = dict(path=path, seqs=1, n=4, seed=7, max_tokens=16 if a.quick else 32, reps=1 if a.quick else a.reps)
    fracs = [float(f) for f in a.fractions.split(",")] if a.fractions else ([0.25] if a.quick else [0.1, 0.25, 0.5])
    runs = {"resident": dict(base, mode="local")}
    for frac in fracs:
        o = dict(expert_cache_fraction=frac, trace=trace)
        lru = dict(o, prefetch=False, eviction="lru", token_scheduling=False)
        runs[f"{frac}/predicted+prefetch(combined)"] = dict(base, mode="offload", opts=dict(o, predictor="combined"))
        runs[f"{frac}/on-demand LRU"] = dict(base, mode="offload", opts=lru)
        # the same two with reader threads in this process instead of the reader process (io_mode="thread")
        runs[f"{frac}/combined, reader threads"] = dict(base, mode="offload",
                                                         opts=dict(o, predictor="combined", io_mode="thread"))
        runs[f"{frac}/LRU, reader threads"] = dict(base, mode="offload", opts=dict(lru, io_mode="thread"))
        if frac == 0.25 and not a.quick:
            for p in ("router", "token", "transition"):
                runs[f"{frac}/predicted+prefetch({p})"] = dict(base, mode="offload", opts=dict(o, predictor=p))
            runs[f"{frac}/combined, prefetch whole step"] = dict(
                base, mode="offload", opts=dict(o, predictor="combined", prefetch_distance=0))
            runs[f"{frac}/combined, width 4"] = dict(base, mode="offload", opts=dict(o, predictor="combined", width=4))
            runs[f"{frac}/combined, not sticky"] = dict(base, mode="offload", opts=dict(o, predictor="combined",
                                                                                          sticky=0.0))
            # token scheduling: 16 running, decode batches of 4
            for ts in (True, False):
                runs[f"{frac}/sched={'group' if ts else 'fifo'} (16 seqs, batch 4)"] = dict(
                    base, mode="offload", seqs=16, n=16, max_tokens=16,
                    opts=dict(o, predictor="combined", max_decode_batch=4, token_scheduling=ts))
    if a.only:
        keys = a.only.split(",")
        runs = {k: v for k, v in runs.items() if k == "resident" or any(x in k for x in keys)}
    rounds = []
    for r_i in range(a.repeat):
        res = {}
        for name, cfg in runs.items():
            r = sub("model", cfg)
            res[name] = r
            print(f"[round {r_i + 1}] {name} {json.dumps(r)}", flush=True)
        rounds.append(res)
        summarize(res, fracs, r_i + 1)
    report["A"] = rounds[0] if a.repeat == 1 else {"rounds": rounds}
    report["load_average_end"] = os.getloadavg()
    if not a.skip_big:
        fn = write_big_checkpoint(BIG)
        size = os.path.getsize(fn)
        from moeyard.offload.tiers import sequential_read_gbps
        seq = sequential_read_gbps(fn, limit=4 << 30)
        report["B"]["checkpoint_gb"] = round(size / 1e9, 2)
        report["B"]["disk_sequential_gbps"] = round(seq, 3)
        print(f"big checkpoint {size / 1e9:.2f} GB, sequential read {seq:.3f} GB/s", flush=True)
        rb = dict(path=BIG, trace=trace, tokens=8 if a.quick else 16, compute_ms=20, io_threads=2)
        for name, c in {"0.25/predicted+prefetch": dict(rb, fraction=0.25, eviction="predicted", prefetch=True),
                        "0.25/on-demand LRU": dict(rb, fraction=0.25, eviction="lru", prefetch=False),
                        "0.25/predicted, only p >= 0.25": dict(rb, fraction=0.25, eviction="predicted", prefetch=True,
                                                               min_p=0.25),
                        "0.5/predicted+prefetch": dict(rb, fraction=0.5, eviction="predicted", prefetch=True),
                        "0.5/predicted, only p >= 0.25": dict(rb, fraction=0.5, eviction="predicted", prefetch=True,
                                                              min_p=0.25),
                        "0.5/on-demand LRU": dict(rb, fraction=0.5, eviction="lru", prefetch=False)}.items():
            r = sub("replay", c)
            report["B"][name] = r
            print(name, json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
