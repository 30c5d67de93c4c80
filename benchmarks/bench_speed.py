"""Engine speed (issue 18): decode tok/s of every weight format against llama.cpp and transformers, the share of
the memory-bandwidth limit, peak RSS. One run, every system on the same checkpoint, alternately.

    python benchmarks/bench_speed.py [--ckpt /tmp/moeyard-bench-mixtral-bf16] [--threads 1] [--passes 5] [--record]

- checkpoint: a random Mixtral-shaped model (``bench_engine.SHAPE``, ``--layers`` decoder layers) saved in bf16;
- moeyard: ``LLM(ckpt)`` (the compute plan chosen at load: bf16 storage, float32 arithmetic on AVX-512), and
  ``quantization="int8"`` / ``"int4"``; each in its own subprocess;
- llama.cpp (benchmark-only peer, ``benchmarks/peers.py``: built from the ``llama-cpp-python`` sdist's vendored
  tree, the checkpoint converted with its own ``convert_hf_to_gguf.py``): bf16, Q8_0, Q4_0 (``llama-quantize``);
  batch 1 ``llama-bench -p 0 -n N``, batch 16 ``llama-batched-bench -npl 16``;
- transformers: ``AutoModelForCausalLM`` in float32 (its fastest CPU dtype here), ``generate``;
- decode tok/s = batch x (N - 1) / (time of an N-token run - time of a 1-token run), per pass; the median of
  ``--passes`` passes (llama-bench: its mean over ``--passes`` repetitions);
- bandwidth ceiling: ``torch.sum`` over a 1 GiB float32 tensor with the same threads, median of 5, in this run;
  batch-1 share = (weight bytes one token reads: dense layers + top-k experts per layer, as stored) x tok/s / that;
- peak RSS (VmHWM) above the process's RSS after imports, against the weights' own size in the format run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def make_checkpoint(path: str, layers: int):
    from bench_engine import make_checkpoint as random_mixtral
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    random_mixtral(path, dtype="bfloat16", num_layers=layers, vocab_size=8192)
    # llama.cpp's converter wants a tokenizer: the embedded model's (its 8192 ids match the checkpoint's 8192 rows)
    from moeyard.moe.loader import default_model_path
    import shutil
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_path(), fn), os.path.join(path, fn))


def vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def read_bandwidth(threads: int) -> float:
    import torch
    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)     # 1 GiB
    a.sum()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(ts)


def model_bytes(llm) -> tuple[int, int]:
    """(bytes of all weights as stored, bytes one decode token reads: dense + top_k experts of each MoE layer)."""
    import torch
    from moeyard.moe.compute import PackedLinear
    model = llm.engine.executor.model
    cfg = llm.cfg
    dense = total = 0
    seen = set()
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            dense += mod.p.nbytes
        else:
            for _, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                b = p.numel() * p.element_size()
                total += b
                if not name.endswith("embed_tokens"):
                    dense += b
                else:
                    dense += p.shape[1] * p.element_size()     # one embedding row per token
    total += sum(m.p.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    experts = model.experts.nbytes
    total += experts
    per_expert = experts / (len(cfg.moe_layers) * cfg.num_experts)
    del torch
    return total, int(dense + cfg.top_k * per_expert * len(cfg.moe_layers))


def worker(system: str, ckpt: str, batch: int, new_tokens: int, passes: int, threads: int, quant: str | None) -> dict:
    import torch
    torch.set_num_threads(threads)
    if system == "moeyard":
        import moeyard.runtime  # noqa: F401 — counted in the baseline
        from moeyard.moe import compute
        compute.native()
    else:
        import transformers  # noqa: F401
    base = vm("VmRSS")
    prompts = [[(7 * i + j) % 7000 + 10 for j in range(16)] for i in range(batch)]
    extra = {}
    if system == "moeyard":
        from moeyard.runtime import LLM, SamplingParams
        llm = LLM(ckpt, max_num_seqs=max(batch, 2), max_model_len=128, quantization=quant, threads=threads)
        st = llm.stats()
        extra = {k: v for k, v in st.items() if k.startswith(("compute_", "threads"))}
        extra["weights_bytes"], extra["token_bytes"] = model_bytes(llm)

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
    run(2)
    tps = []
    for _ in range(passes):
        t1, tn = run(1), run(new_tokens)
        tps.append(batch * (new_tokens - 1) / max(tn - t1, 1e-9))
    return {"system": system, "quant": quant, "batch": batch, "decode_tok_s": statistics.median(tps),
            "passes": [round(x, 1) for x in tps], "peak_rss": vm("VmHWM"), "base_rss": base, **extra}


def sub(system, a, batch, quant=None):
    cmd = [sys.executable, __file__, "--worker", system, "--ckpt", a.ckpt, "--batch", str(batch), "--new-tokens",
           str(a.new_tokens), "--passes", str(a.passes), "--threads", str(a.threads)]
    if quant:
        cmd += ["--quant", quant]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system} {quant} b{batch} failed: {out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(r), flush=True)
    return r


def llama_runs(a, ggufs: dict, batch: int) -> dict:
    import peers
    out = {}
    if batch > 1 and not os.path.isfile(os.path.join(peers.llama_cpp_dir(), "build", "bin", "llama-batched-bench")):
        print("llama.cpp: llama-batched-bench not built, no batch > 1 peer", flush=True)
        return out
    for fmt, g in ggufs.items():
        if batch == 1:
            r = peers.llama_bench(g, a.new_tokens, a.threads, None, batch=1, reps=a.passes)
            out[fmt] = r["tokens_per_s"]
        else:
            out[fmt] = statistics.median(peers.llama_bench(g, a.new_tokens, a.threads, None, batch=batch)
                                         ["tokens_per_s"] for _ in range(max(1, a.passes // 2)))
        print(f"llama.cpp {fmt} b{batch}: {out[fmt]:.1f} tok/s", flush=True)
    return out


def gguf_files(a) -> dict:
    import peers
    d = peers.llama_cpp_dir()
    if d is None:
        raise RuntimeError("llama.cpp is not built: python -c 'import peers; peers.build_llama_cpp()' in benchmarks/")
    base = a.ckpt.rstrip("/") + ".bf16.gguf"
    peers.to_gguf(a.ckpt, base, "bf16")
    out = {"bf16": base}
    for q in ("Q8_0", "Q4_0"):
        f = a.ckpt.rstrip("/") + f".{q}.gguf"
        if not os.path.isfile(f):
            subprocess.run([f"{d}/build/bin/llama-quantize", base, f, q, str(a.threads)], check=True,
                           capture_output=True)
        out[q] = f
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/moeyard-bench-mixtral-bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant", default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a.batch, a.new_tokens, a.passes, a.threads, a.quant)))
        return
    t_start = time.time()
    make_checkpoint(a.ckpt, a.layers)
    from common import cpu_class, record, table
    from moeyard.moe.compute import cpu_model, isa_summary, native_status
    ggufs = {} if a.no_llama else gguf_files(a)
    batches = [int(b) for b in a.batches.split(",")]
    bw = [read_bandwidth(a.threads)]
    ours, llama, hf = {}, {}, {}
    for b in batches:
        for q in (None, "int8", "int4"):
            ours[(q, b)] = sub("moeyard", a, b, q)
        if ggufs:
            llama[b] = llama_runs(a, ggufs, b)
        if not a.no_hf:
            hf[b] = sub("transformers", a, b)["decode_tok_s"]
        bw.append(read_bandwidth(a.threads))
    bwm = statistics.median(bw)
    peer_of = {None: "bf16", "int8": "Q8_0", "int4": "Q4_0"}
    rows = []
    for q in (None, "int8", "int4"):
        for b in batches:
            o = ours[(q, b)]
            lc = llama.get(b, {}).get(peer_of[q])
            row = [o["compute_experts"], b, o["decode_tok_s"], lc if lc else "—",
                   f"{o['decode_tok_s'] / lc:.2f}x" if lc else "—", hf.get(b, "—"),
                   f"{o['decode_tok_s'] / hf[b]:.2f}x" if b in hf else "—"]
            if b == 1:
                row.append(f"{o['token_bytes'] / 2**20:.0f} MiB x {o['decode_tok_s']:.1f}/s = "
                           f"{o['token_bytes'] * o['decode_tok_s'] / 1e9:.2f} GB/s: "
                           f"**{100 * o['token_bytes'] * o['decode_tok_s'] / bwm:.0f}%**")
            else:
                row.append("")
            rss = (o["peak_rss"] - o["base_rss"]) / o["weights_bytes"]
            row.append(f"{o['weights_bytes'] / 2**20:.0f} MiB, {rss:.2f}x")
            rows.append(row)
    import torch
    from bench_engine import SHAPE
    busy = os.getloadavg()
    body = (f"CPU: {cpu_model()}, flags {isa_summary()}; torch {torch.__version__}; kernel {native_status()}; "
            f"**{a.threads} thread(s)** for every system (load "
            f"average {busy[0]:.1f} at the end of the run, other sessions' jobs included).\n\n"
            f"Checkpoint: random Mixtral shape {dict(SHAPE, num_layers=a.layers, vocab_size=8192)}, bf16. 16-token prompts, "
            f"{a.new_tokens} new tokens, greedy; median of {a.passes} passes. Read bandwidth (`torch.sum` over 1 GiB "
            f"float32, {a.threads} thread(s)): {bwm / 1e9:.1f} GB/s (median of {len(bw)} measurements in this run, "
            f"{min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f}). Peers: llama.cpp "
            f"{'(not run)' if not ggufs else 'bf16 / Q8_0 / Q4_0 of the same checkpoint'}, transformers float32.\n\n"
            + table(["ours", "batch", "moeyard tok/s", "llama.cpp tok/s (same class)", "vs llama.cpp",
                     "transformers tok/s", "vs transformers", "batch-1 bytes x tok/s vs bandwidth",
                     "weights, peak RSS above baseline / weights"], rows)
            + f"\n\n({time.time() - t_start:.0f} s)")
    print(body)
    if a.record:
        record(f"Engine speed: decode vs llama.cpp and the bandwidth limit ({cpu_class()} host)",
               f"python benchmarks/bench_speed.py --threads {a.threads} --passes {a.passes} --record", body)


if __name__ == "__main__":
    main()
