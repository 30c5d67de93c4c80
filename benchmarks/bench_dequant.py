"""Where offload should dequantize a quantized expert: in the numpy-only reader process (lookup tables) or in the
engine after the read (torch). One expert of published sizes, each path timed on the same bytes in one run:

- fp8: DeepSeek-V3 / Kimi K2 expert (hidden 7168, expert width 2048; e4m3 + float32 scales per 128x128 block);
- mxfp4: gpt-oss-120b expert (hidden 2880, width 2880; e2m1 pairs + e8m0 per 32 values).

Paths: ``numpy-lut`` (what the reader process could run: a 256-entry table gather, then the block scales);
``torch`` (``moe.quant_formats``, run in offload's I/O thread, or on the GPU); baselines from the same run: the
reader process's bf16 -> fp32 conversion of the same expert stored in bf16 (what it does today) and a plain
copy of the quantized bytes. Median of ``--passes`` passes, ms per expert; ``torch.get_num_threads()`` reported.

    python benchmarks/bench_dequant.py [--passes 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from moeyard.moe.quant_formats import FP4_VALUES, dequant_fp8, dequant_mxfp4


def _time(fn, passes):
    fn()
    ts = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def fp8_case(D=7168, F=2048, b=128):
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(r, c, generator=g) * 40).to(torch.float8_e4m3fn) for r, c in ((F, D), (F, D), (D, F))]
    ss = [torch.rand(r // b, c // b, generator=g) for r, c in ((F, D), (F, D), (D, F))]
    lut = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    wn = [w.view(torch.uint8).numpy() for w in ws]
    sn = [s.numpy() for s in ss]
    outs = [np.empty(w.shape, np.float32) for w in wn]

    def numpy_lut():
        for w, s, o in zip(wn, sn, outs):
            np.take(lut, w, out=o)
            R, C = o.shape
            o.reshape(R // b, b, C // b, b)[...] *= s[:, None, :, None]

    def torch_path():
        for w, s in zip(ws, ss):
            dequant_fp8(w, s, (b, b))
    return numpy_lut, torch_path, sum(w.size for w in wn), sum(w.size for w in wn) + sum(s.nbytes for s in sn)


def mxfp4_case(D=2880, F=2880):
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, 256, (r, c // 32, 16), generator=g, dtype=torch.uint8) for r, c in ((2 * F, D), (D, F))]
    scales = [torch.randint(118, 136, (r, c // 32), generator=g, dtype=torch.uint8) for r, c in ((2 * F, D), (D, F))]
    lut2 = np.array([[FP4_VALUES[i & 15], FP4_VALUES[i >> 4]] for i in range(256)], np.float32)
    exp = torch.pow(2.0, torch.arange(256, dtype=torch.int32) - 127).numpy()
    bn, sn = [x.numpy() for x in blocks], [x.numpy() for x in scales]
    outs = [np.empty(x.shape[:-1] + (32,), np.float32) for x in bn]

    def numpy_lut():
        for bl, sc, o in zip(bn, sn, outs):
            np.take(lut2, bl, axis=0, out=o.reshape(bl.shape + (2,)))
            o *= exp[sc][..., None]

    def torch_path():
        for bl, sc in zip(blocks, scales):
            dequant_mxfp4(bl, sc)
    n = sum(x.size for x in bn) * 2
    return numpy_lut, torch_path, n, sum(x.size for x in bn) + sum(x.size for x in sn)


def baselines(numel: int, qbytes: int):
    src = np.random.default_rng(0).integers(0, 1 << 16, numel, dtype=np.uint16)
    dst = np.empty(numel, np.uint32)
    raw = np.random.default_rng(1).integers(0, 256, qbytes, dtype=np.uint8)
    cp = np.empty_like(raw)
    return (lambda: np.left_shift(src, 16, out=dst, dtype=np.uint32)), (lambda: np.copyto(cp, raw))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=7)
    a = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    print("| format | expert | values | quantized MB | numpy-lut ms | torch ms | bf16->fp32 (reader today) ms | "
          "copy of quantized bytes ms | numpy-lut / torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, case, shape in (("fp8", fp8_case, "7168 x 2048 x 3"), ("mxfp4", mxfp4_case, "2880 x 2880 x 3")):
        np_fn, th_fn, numel, qbytes = case()
        conv, copy = baselines(numel, qbytes)
        t_np, t_th = _time(np_fn, a.passes), _time(th_fn, a.passes)
        t_cv, t_cp = _time(conv, a.passes), _time(copy, a.passes)
        print(f"| {name} | {shape} | {numel / 1e6:.1f} M | {qbytes / 2**20:.1f} | {t_np:.1f} | {t_th:.1f} | "
              f"{t_cv:.1f} | {t_cp:.1f} | {t_np / t_th:.2f} |")


if __name__ == "__main__":
    main()
