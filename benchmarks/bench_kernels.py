"""The weight-only kernels as decode uses them (issue 18): rate per matrix shape, format and activation rows with the
weights coming from DRAM, in 4 KiB pages and in a huge-page ``compute.Arena``; optionally a second build of the same
kernel with other compiler flags (e.g. ``-mno-avx512vnni``: the 256-bit path on a VNNI host), and the split of a
batch-1 decode step into the products and everything else.

    python benchmarks/bench_kernels.py [--threads 1] [--compare-build=-mno-avx512vnni] [--decode-split] [--record]

- rate: one pass multiplies ``M`` activation rows by each of enough matrices of the shape (~200 MB, beyond the
  last-level cache) in turn, as a decode step walks its layers; GB/s are the matrices' bytes (scales included) per
  second, G/s their weights per second; median of ``--passes`` passes; ``torch.sum`` over 1 GiB float32 measured in
  the same run is the bandwidth beside them;
- ``--decode-split``: batch-1 decode tok/s on ``bench_speed``'s checkpoint with each format, once with the native
  kernels and once with kernels that return zeros at once: the difference is the time in the products.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHAPES = ((2816, 1024), (1024, 2816), (8192, 1024))   # an expert's gate/up half and down, an lm_head of 8192 rows


def rate(C, x, ps, passes: int) -> float:
    for p in ps:
        C.matmul(x, p)
    rs = []
    for _ in range(passes):
        t = time.perf_counter()
        for p in ps:
            C.matmul(x, p)
        rs.append(sum(p.nbytes for p in ps) / (time.perf_counter() - t) / 1e9)
    return statistics.median(rs)


def kernel_rows(C, kinds, rows, passes: int, arena: bool) -> dict:
    import torch
    out = {}
    for N, K in SHAPES:
        for kind in kinds:
            w = torch.randn(N, K)
            one = C.pack(w, kind, "w")
            n = max(4, int(200e6 / one.nbytes))
            ps = [one] + [C.pack(torch.randn(N, K), kind, "w") for _ in range(n - 1)]
            if arena:
                a = C.Arena(sum(C.Arena.packed_size(p) for p in ps))
                ps = [a.packed(p) for p in ps]
            for M in rows:
                gbs = rate(C, torch.randn(M, K), ps, passes)
                out[(N, K, kind, M)] = (gbs, gbs * 1e9 / one.nbytes * N * K / 1e9)
    return out


class Zeros:
    """Kernels that return zeros: what a decode step costs outside its products."""

    def __init__(self, real):
        self.real = real

    def isa(self):
        return self.real.isa()

    def mm_bf16(self, x, w):
        return x.new_zeros(x.shape[0], w.shape[0])

    def mm_int8(self, x, w, s, q8):
        return x.new_zeros(x.shape[0], w.shape[0])

    def mm_int4(self, x, w, s, g, q8):
        return x.new_zeros(x.shape[0], w.shape[0])

    def mm_int4x8(self, x, w, s):
        return x.new_zeros(x.shape[0], w.shape[0])

    def expert_swiglu(self, x, gu, gus, dn, dns, kind, g, q8):
        return x.new_zeros(x.shape[0], x.shape[1])

    def __getattr__(self, name):      # the fused small ops (rms_norm, rope) run as they are
        return getattr(self.real, name)


def tok_s(llm, ids, sp, one, passes: int) -> float:
    """Decode tok/s: (time of 32 tokens - time of 1) per 31 tokens, median of ``passes``."""
    llm.generate(prompt_token_ids=ids, sampling_params=sp)
    r = []
    for _ in range(passes):
        t = time.perf_counter()
        llm.generate(prompt_token_ids=ids, sampling_params=sp)
        t32 = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate(prompt_token_ids=ids, sampling_params=one)
        r.append(31 / (t32 - (time.perf_counter() - t)))
    return statistics.median(r)


def decode_split(C, passes: int, threads: int) -> list[list]:
    from bench_speed import make_checkpoint
    from moeyard.runtime import LLM, SamplingParams
    ckpt = "/tmp/moeyard-bench-mixtral-bf16"
    make_checkpoint(ckpt, 4)
    rows = []
    real = C.native()
    for q in (None, "int8", "int4"):
        llm = LLM(ckpt, max_num_seqs=2, max_model_len=128, quantization=q, threads=threads)
        sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        ids = [[(7 * j) % 7000 + 10 for j in range(16)]]

        full = tok_s(llm, ids, sp, one, passes)
        C._native = Zeros(real)
        try:
            rest = tok_s(llm, ids, sp, one, passes)
        finally:
            C._native = real
        llm.close()
        ms, ms_rest = 1e3 / full, 1e3 / rest
        rows.append([q or "bf16", round(full, 1), round(ms, 2), round(ms - ms_rest, 2), round(ms_rest, 2)])
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--kinds", default="bf16,int8,int4")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--compare-build", default=None, help="extra compiler flags of a second build of the kernel")
    ap.add_argument("--decode-split", action="store_true")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from bench_speed import read_bandwidth
    from common import cpu_class, record, table
    from moeyard.moe import compute as C
    kinds, rows = a.kinds.split(","), [int(r) for r in a.rows.split(",")]
    bw = read_bandwidth(a.threads) / 1e9
    builds = [("native", C.native(), False), ("native, huge-page arena", C.native(), True)]
    if a.compare_build:
        from torch.utils.cpp_extension import load
        other = load("moeyard_wmm_cmp", C._SRCS, build_directory=tempfile.mkdtemp(), verbose=False,
                     extra_cflags=["-O3", "-march=native", "-std=c++17"] + a.compare_build.split())
        builds.append((f"{a.compare_build}, huge-page arena", other, True))
    res = {}
    real = C.native()
    for name, mod, arena in builds:
        C._native = mod
        try:
            res[f"{name} ({mod.isa()})"] = kernel_rows(C, kinds, rows, a.passes, arena)
        finally:
            C._native = real
        print(name, "done", flush=True)
    bw2 = read_bandwidth(a.threads) / 1e9
    heads = ["shape", "format", "rows"] + [f"{b}: GB/s (G weights/s)" for b in res]
    body_rows = []
    for (N, K, kind, M) in next(iter(res.values())):
        body_rows.append([f"[{N}, {K}]", kind, M] + [f"{r[(N, K, kind, M)][0]:.1f} ({r[(N, K, kind, M)][1]:.1f})"
                                                     for r in res.values()])
    body = (f"CPU flags {C.isa_summary()}, torch {torch.__version__}, {a.threads} thread(s). Weights from DRAM "
            f"(~200 MB of matrices of each shape cycled), median of {a.passes} passes. `torch.sum` bandwidth in this "
            f"run: {bw:.1f} GB/s before, {bw2:.1f} GB/s after.\n\n" + table(heads, body_rows))
    if a.decode_split:
        split = decode_split(C, a.passes, a.threads)
        body += ("\n\nBatch-1 decode, `bench_speed`'s checkpoint, 32 tokens after a 16-token prompt, median of "
                 f"{a.passes}:\n\n" + table(["format", "tok/s", "ms/token", "in the products", "everything else"],
                                             split))
    print(body)
    if a.record:
        cmd = "python benchmarks/bench_kernels.py" + (f" --compare-build={a.compare_build}" if a.compare_build
                                                       else "") + (" --decode-split" if a.decode_split else "")
        record(f"Engine speed: the kernels from DRAM ({cpu_class()} host)", cmd, body)


if __name__ == "__main__":
    main()
