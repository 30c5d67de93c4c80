"""Offload mode where it matters: experts of megabytes, a fraction of them in memory, against what users run.

    .venv/bin/python benchmarks/bench_offload.py [--models default,deepseek-mini] [--width 8192]
        [--fractions 0.1,0.25,0.5] [--batches 1,8] [--new-tokens 48] [--reps 3] [--peers llama.cpp,accelerate]
        [--quantization int8|int4] [--record]

Workload: the inflated copy of each embedded model (``moeyard inflate``: the model's own learned routing, every
routed expert ``--width`` wide, ~6 MB in bf16 at 8192), prompts from MT-Bench (``../shared/prompts``) and held-out
corpus text. Per model, in one run, each configuration in its own subprocess (its own peak memory, a cold page
cache for the checkpoint):
- resident: local mode, every expert in memory (the speed ceiling, and the tokens every other row must equal);
- offload at each budget and batch: prediction with the gate (default options), prediction without the gate,
  on-demand LRU (prefetch off): tokens/s (median pass), hit rate, stall, bytes read per token (``/proc`` I/O of the
  engine and its reader process), prefetches issued/used, predictor precision/recall per layer;
- the hindsight ceiling at each budget: Belady's optimal cache over the resident run's real expert requests gives
  the fewest bytes any policy must read; with reads perfectly overlapped the time per token is at least
  max(resident compute, those bytes / the disk's O_DIRECT read bandwidth measured in the same run);
- peers at 25 % batch 1 (``--peers``): llama.cpp on the same checkpoint (GGUF from its convert script, mmap; with
  ``--quantization`` also its Q8_0 / Q4_0 requantization by ``llama-quantize``, the same weight class) in a
  memory cgroup capped at moeyard's own peak memory at that budget, and transformers + accelerate disk offload
  with the same budget (``max_memory``), also capped: tokens/s and bytes read per token.

``--quantization int8|int4``: the inflated checkpoint is written once more by ``moeyard quantize``; resident is
local mode on the bf16 checkpoint with that quantization, offload reads the quantized copy (int8/int4 bytes straight
into the slots) and must give the same tokens; Belady's bytes are those of a packed expert.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))
WORK = os.environ.get("MOEYARD_BENCH_DIR", "/tmp/moeyard_bench_offload_big")


# ---------------------------------------------------------------------------------------------------------------
# workload
def prompt_texts(n: int, seed: int) -> list[str]:
    """Half MT-Bench first turns, half held-out corpus windows (~300 characters)."""
    rng = np.random.default_rng(seed)
    texts = []
    mt = os.path.join(ROOT, "..", "shared", "prompts", "mt_bench_questions.jsonl")
    if os.path.isfile(mt):
        qs = [json.loads(line)["turns"][0] for line in open(mt)]
        texts += [qs[i] for i in rng.choice(len(qs), n - n // 2, replace=False)]
    from corpus import DOMAINS, split
    while len(texts) < n:
        d = DOMAINS[len(texts) % len(DOMAINS)]
        val = split(d, "val")
        s = int(rng.integers(0, len(val) - 400))
        texts.append(val[s:s + 300])
    return texts


def prompt_ids(path: str, n: int, seed: int, max_len: int = 48) -> list[list[int]]:
    from moeyard.moe.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(path)
    return [tok.encode(t)[-max_len:] for t in prompt_texts(n, seed)]


def io_read_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def disk_read_gbps(path: str, mb: int = 512) -> float:
    """O_DIRECT sequential read bandwidth of the checkpoint's file (what a reader that bypasses the cache sees)."""
    fn = max((os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")), key=os.path.getsize)
    r = subprocess.run(["dd", f"if={fn}", "of=/dev/null", "bs=8M", "iflag=direct", f"count={mb // 8}"],
                       capture_output=True, text=True)
    line = r.stderr.strip().splitlines()[-1]
    nbytes, secs = int(line.split()[0]), float(line.split(",")[-2].split()[0])
    return nbytes / secs / 1e9


# ---------------------------------------------------------------------------------------------------------------
# one configuration (a subprocess)
def worker(cfg: dict) -> dict:
    import torch
    from moeyard.runtime import LLM, SamplingParams
    torch.set_num_threads(cfg["threads"])
    opts = dict(cfg.get("opts", {}))
    io0 = io_read_bytes()
    llm = LLM(cfg["path"], mode=cfg["mode"], max_num_seqs=cfg["batch"], **opts)
    routes: list[tuple[int, list]] = []
    if cfg.get("record_routes"):
        llm.engine.executor.route_hooks.append(
            lambda layer, x, ids, w: routes.append((layer, ids.detach().cpu().tolist())))
    sp = SamplingParams(max_tokens=cfg["new_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompt_ids(cfg["path"], cfg["batch"], 999), sampling_params=sp)   # warm-up
    routes.clear()
    base = llm.stats()
    io1 = io_read_bytes()
    rates, outs, toks = [], [], 0
    for r in range(cfg["reps"]):
        ps = prompt_ids(cfg["path"], cfg["prompts"], cfg["seed"] + r)
        t0 = time.perf_counter()
        for i in range(0, len(ps), cfg["batch"]):
            o = llm.generate(prompt_token_ids=ps[i:i + cfg["batch"]], sampling_params=sp)
            outs += [x.token_ids for x in o]
        dt = time.perf_counter() - t0
        n = sum(len(x) for x in outs[-len(ps):])
        rates.append(n / dt)
        toks += n
    st = llm.stats()
    reader = getattr(getattr(llm.engine.executor, "cache", None), "proc", None)     # offload's reader process
    reader_io = io_read_bytes(reader.proc.pid) if reader is not None and reader.proc is not None else 0
    res = {"tokens_per_s": round(float(np.median(rates)), 3), "passes": [round(x, 2) for x in rates],
           "tokens": toks, "digest": hashlib.md5(json.dumps(outs).encode()).hexdigest()[:10],
           "read_mb_per_token": round((io_read_bytes() - io1 + reader_io) / 2**20 / toks, 2),
           "load_read_mb": round((io1 - io0) / 2**20, 1), "compute_dtype": str(st.get("compute_dtype", ""))}
    llm.close()
    # VmHWM: ru_maxrss would keep the parent's size from before exec (every row reported the parent's 1.6 GB)
    from bench_engine import peak_rss
    res["peak_rss_mb"] = round(peak_rss() / 2**20, 1)
    if cfg["mode"] == "offload":
        d = {k: st[k] - base.get(k, 0) for k in ("expert_hits", "expert_misses", "prefetch_issued",
                                                 "prefetch_used", "prefetch_wasted", "stall_seconds",
                                                 "bytes_loaded") if k in st}
        req = d["expert_hits"] + d["expert_misses"]
        d["hit_rate"] = round(d["expert_hits"] / max(1, req), 4)
        d["stall_ms_per_token"] = round(d.pop("stall_seconds") * 1e3 / toks, 2)
        d["loaded_mb_per_token"] = round(d.pop("bytes_loaded") / 2**20 / toks, 2)
        d["reader_rss_mb"] = st.get("reader_rss_mb")
        d["pool_mb"] = round(st["expert_cache_bytes"] / 2**20, 1)
        d["slot_kind"] = st.get("expert_slot_kind")
        d["read_gbps"] = st.get("read_gbps")         # the tier's own read bandwidth (expert reads, this run)
        d.update({k: v for k, v in st.items() if k.startswith("gate_") or k == "budget_cut"})
        for k in ("pred_precision_per_layer", "pred_recall_per_layer", "gated_out"):
            if k in st:
                d[k] = st[k]
        res.update(d)
    if routes:
        res["routes"] = routes
    return res


def run(cfg: dict) -> dict:
    from peers import drop_page_cache
    drop_page_cache([cfg["path"]])
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"worker failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# the hindsight ceiling
def belady_misses(requests: list[list[tuple[int, int]]], slots: int) -> int:
    """Misses of Belady's MIN over ``requests`` (one list of (layer, expert) per MoE layer step, all of a step's
    experts needed together): on a miss with a full cache, evict the expert whose next use is farthest."""
    flat = [(i, k) for i, step in enumerate(requests) for k in step]
    nxt, last = [0] * len(flat), {}
    for j in range(len(flat) - 1, -1, -1):
        nxt[j] = last.get(flat[j][1], 1 << 60)
        last[flat[j][1]] = j
    import heapq
    cache: dict = {}            # key -> next use
    heap: list = []             # (-next use, key)
    misses = 0
    for j, (_, k) in enumerate(flat):
        if k not in cache:
            misses += 1
            if len(cache) >= slots:
                while True:
                    nu, v = heapq.heappop(heap)
                    if cache.get(v) == -nu:
                        del cache[v]
                        break
        cache[k] = nxt[j]
        heapq.heappush(heap, (-nxt[j], k))
    return misses


def lru_misses(requests, slots: int) -> int:
    from collections import OrderedDict
    c, misses = OrderedDict(), 0
    for step in requests:
        for k in step:
            if k in c:
                c.move_to_end(k)
            else:
                misses += 1
                if len(c) >= slots:
                    c.popitem(last=False)
                c[k] = True
    return misses


def requests_of(routes) -> list[list[tuple[int, int]]]:
    return [sorted({(layer, e) for row in ids for e in row}) for layer, ids in routes]


# ---------------------------------------------------------------------------------------------------------------
def inflated(name: str, width: int) -> str:
    from moeyard.moe.inflate import inflate
    from moeyard.moe.loader import resolve_model_path
    dst = os.path.join(WORK, f"{name}_f{width}")
    if not os.path.isfile(os.path.join(dst, "config.json")):
        os.makedirs(WORK, exist_ok=True)
        print(f"inflating {name} to experts {width} wide -> {dst}", flush=True)
        inflate(resolve_model_path(name), dst, width)
    return dst


def quantized(path: str, kind: str) -> str:
    from moeyard.moe.quantize import quantize_checkpoint
    dst = f"{path}_{kind}"
    if not os.path.isfile(os.path.join(dst, "config.json")):
        print(f"quantizing {path} to {kind} -> {dst}", flush=True)
        quantize_checkpoint(path, dst, kind)
    return dst


def packed_expert_bytes(path: str) -> int:
    """Bytes of one expert (matrices and scales) as stored in ``path``."""
    from moeyard.moe.checkpoint import CheckpointReader
    from moeyard.moe.config import MoEConfig
    from moeyard.offload.tiers import DiskTier
    cfg = MoEConfig.from_dir(path)
    tier = DiskTier(cfg, CheckpointReader(path))
    return sum(x.nbytes for x in next(iter(tier.ranges.values())))


def bench_model(name: str, a, out: dict, save=lambda: None) -> dict:
    """Fills ``out`` row by row (``save()`` after each: a run cut short keeps what it measured)."""
    from moeyard.moe.config import MoEConfig
    path = inflated(name, a.width)
    cfg = MoEConfig.from_dir(path)
    q = a.quantization
    opath = quantized(path, q) if q else path           # what offload mode reads
    total = len(cfg.moe_layers) * cfg.num_experts
    bw = float(np.median([disk_read_gbps(path) for _ in range(3)]))
    base = dict(path=path, threads=a.threads, new_tokens=a.new_tokens, reps=a.reps, prompts=a.prompts, seed=7)
    out.update({"model": name, "path": opath, "quantization": q, "disk_gbps": round(bw, 3), "rows": []})
    print(f"\n# {name}: {total} routed experts of {cfg.expert_bytes(2) / 2**20:.1f} MB (bf16), disk {bw:.2f} GB/s",
          flush=True)
    for batch in a.batches:
        res = run({**base, "mode": "local", "batch": batch, "record_routes": True,
                   "opts": {"quantization": q} if q else {}})
        reqs = requests_of(res.pop("routes"))
        expert_mb = (packed_expert_bytes(opath) if q else cfg.expert_bytes(2)) / 2**20
        out["rows"].append({"config": "resident", "batch": batch, **res})
        print(f"  b{batch} resident: {res['tokens_per_s']} tok/s, peak {res['peak_rss_mb']} MB", flush=True)
        t_compute = 1.0 / res["tokens_per_s"]
        for frac in a.fractions:
            slots = int(frac * total)
            bel, lru = belady_misses(reqs, slots), lru_misses(reqs, slots)
            ntok = res["tokens"]          # the routes were recorded over every pass, as were the tokens
            io_s = bel * expert_mb * 2**20 / ntok / (bw * 1e9)
            ceiling = 1.0 / max(t_compute, io_s)
            row0 = {"config": "ceiling (Belady + perfect overlap)", "batch": batch, "fraction": frac,
                    "tokens_per_s": round(ceiling, 3), "belady_mb_per_token": round(bel * expert_mb / ntok, 2),
                    "lru_sim_mb_per_token": round(lru * expert_mb / ntok, 2)}
            out["rows"].append(row0)
            configs = [("predicted + gate", {}), ("predicted, no gate", {"gate": False}),
                       ("on-demand LRU", {"prefetch": False, "eviction": "lru"})]
            for v in a.variants:
                configs.append((f"predicted + gate {json.dumps(v, sort_keys=True)}", v))
            for label, opts in configs:
                if a.only and not any(s in label for s in a.only.split(",")):
                    continue
                o = {"expert_cache_fraction": frac, "predictor": "combined", **opts}
                try:
                    r = run({**base, "path": opath, "mode": "offload", "batch": batch, "opts": o})
                except RuntimeError as e:
                    print(f"  b{batch} {frac:.0%} {label}: failed: {str(e)[-300:]}", flush=True)
                    continue
                r.update(config=label, batch=batch, fraction=frac, same_tokens=r["digest"] == res["digest"])
                out["rows"].append(r)
                save()
                print(f"  b{batch} {frac:.0%} {label}: {r['tokens_per_s']} tok/s "
                      f"({r['tokens_per_s'] / res['tokens_per_s']:.2f}x resident), hit {r['hit_rate']}, "
                      f"stall {r['stall_ms_per_token']} ms/tok, read {r['read_mb_per_token']} MB/tok, "
                      f"same tokens {r['same_tokens']}", flush=True)
            # the same bound at the bandwidth on-demand reads got in this run (LRU: bytes loaded / time stalled, an
            # upper bound as some of its reads overlap compute) rather than dd's sequential figure
            lru_bw = [round(x["loaded_mb_per_token"] * 2**20 / (x["stall_ms_per_token"] * 1e6), 3)
                      for x in out["rows"] if x.get("config") == "on-demand LRU" and x.get("fraction") == frac
                      and x["batch"] == batch and x.get("stall_ms_per_token")]
            if lru_bw:
                row0["tier_gbps"] = lru_bw[0]
                row0["tokens_per_s_at_tier_gbps"] = round(
                    1.0 / max(t_compute, bel * expert_mb * 2**20 / ntok / (lru_bw[0] * 1e9)), 3)
            print(f"  b{batch} {frac:.0%} ceiling: {ceiling:.2f} tok/s (Belady {row0['belady_mb_per_token']} MB/tok, "
                  f"LRU sim {row0['lru_sim_mb_per_token']} MB/tok; at the LRU run's read bandwidth "
                  f"{row0.get('tier_gbps')} GB/s: {row0.get('tokens_per_s_at_tier_gbps')} tok/s)", flush=True)
            save()
    if a.peers:
        out["peers"] = bench_peers(path, cfg, out, a)
    return out


def bench_peers(path: str, cfg, out: dict, a) -> list[dict]:
    import peers
    rows = []
    ours = [r for r in out["rows"] if r.get("config") == "predicted + gate" and r["batch"] == 1
            and r["fraction"] == 0.25]
    if not ours:
        return rows
    cap = int((ours[0]["peak_rss_mb"] + (ours[0].get("reader_rss_mb") or 0)) * 2**20)
    print(f"  peers at 25% batch 1, memory cap {cap / 2**20:.0f} MB (moeyard's peak)", flush=True)
    if "llama.cpp" in a.peers:
        try:
            peers.build_llama_cpp()
            gguf = peers.to_gguf(path, os.path.join(WORK, os.path.basename(path) + ".bf16.gguf"))
            r = peers.llama_bench(gguf, a.new_tokens, a.threads, cap)
            rows.append({"peer": "llama.cpp (bf16 GGUF, mmap, capped)", **r})
            print(f"  llama.cpp: {r}", flush=True)
            if a.quantization:      # and the same weight class as our quantized slots: Q8_0 / Q4_0
                kind = {"int8": "Q8_0", "int4": "Q4_0"}[a.quantization]
                r = peers.llama_bench(peers.quantize_gguf(gguf, kind, a.threads), a.new_tokens, a.threads, cap)
                rows.append({"peer": f"llama.cpp ({kind} GGUF, mmap, capped)", **r})
                print(f"  llama.cpp {kind}: {r}", flush=True)
        except Exception as e:   # noqa: BLE001 — a peer that cannot run is reported, the run goes on
            rows.append({"peer": "llama.cpp", "error": str(e)[-500:]})
            print(f"  llama.cpp failed: {str(e)[-500:]}", flush=True)
    if "accelerate" in a.peers:
        try:
            peers.ensure_peer_packages("accelerate")
            budget = int(cap * 0.8)
            cmd = [peers.peer_python(), __file__, "--accelerate-worker",
                   json.dumps({"path": path, "budget": budget, "new_tokens": a.new_tokens, "threads": a.threads,
                               "prompts": 2, "offload": os.path.join(WORK, "accel_offload")})]
            r, nbytes = peers.read_bytes_of(peers.run_capped, cmd, cap, "accelerate", timeout=3600)
            if r["returncode"]:
                raise RuntimeError(r["stderr"][-1500:])
            res = json.loads(r["stdout"].strip().splitlines()[-1])
            res["read_mb_per_token"] = round(nbytes / 2**20 / res["tokens"], 2)
            rows.append({"peer": "transformers + accelerate disk offload (capped)", **res})
            print(f"  accelerate: {res}", flush=True)
        except Exception as e:   # noqa: BLE001
            rows.append({"peer": "accelerate", "error": str(e)[-500:]})
            print(f"  accelerate failed: {str(e)[-500:]}", flush=True)
    return rows


def accelerate_worker(cfg: dict) -> dict:
    import shutil
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(cfg["threads"])
    shutil.rmtree(cfg["offload"], ignore_errors=True)
    m = AutoModelForCausalLM.from_pretrained(cfg["path"], dtype=torch.bfloat16, device_map="auto",
                                             max_memory={"cpu": cfg["budget"]}, offload_folder=cfg["offload"])
    m.eval()
    ps = prompt_ids(cfg["path"], cfg["prompts"], 7)
    toks, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for p in ps:
            o = m.generate(torch.tensor([p]), max_new_tokens=cfg["new_tokens"], do_sample=False, eos_token_id=None,
                           pad_token_id=0)
            toks += o.shape[1] - len(p)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": round(toks / dt, 3), "tokens": toks,
            "offloaded_modules": sum(1 for v in m.hf_device_map.values() if v == "disk")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--accelerate-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="default,deepseek-mini")
    ap.add_argument("--width", type=int, default=8192, help="expert width of the inflated copies")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per pass")
    ap.add_argument("--reps", type=int, default=3, help="passes per configuration (the median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma list: run only offload configurations containing these")
    ap.add_argument("--peers", default="", help="comma list of llama.cpp, accelerate")
    ap.add_argument("--variants", default="[]",
                    help='JSON list of extra offload option sets to run beside the defaults, e.g. '
                         '\'[{"min_p": 0.3, "budget_layers": 4}]\'')
    ap.add_argument("--quantization", default=None, choices=("int8", "int4"),
                    help="resident with this quantization, offload on a `moeyard quantize` copy")
    ap.add_argument("--out", default=os.path.join(WORK, "offload.json"))
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.accelerate_worker:
        print(json.dumps(accelerate_worker(json.loads(a.accelerate_worker))))
        return
    a.fractions = [float(x) for x in a.fractions.split(",")]
    a.batches = [int(x) for x in a.batches.split(",")]
    a.variants = json.loads(a.variants)
    a.peers = [x for x in a.peers.split(",") if x]
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(), "models": []}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    for name in a.models.split(","):
        res["models"].append({})
        bench_model(name, a, res["models"][-1], save)
        save()
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
