"""Which weight-only kernels to use on this CPU (issue 18): one expert-sized matrix, every candidate, one run.

    PYTHONPATH=/tmp/torchao_pkg python benchmarks/bench_candidates.py [--threads 1] [--passes 15]

(torchao is not a moeyard dependency: install it aside, ``pip install --no-deps --target /tmp/torchao_pkg
torchao``.) Candidates, each on the same [N, K] weight (N = 2 x 2816 fused gate/up rows x 4, K = 1024, ~46 M
values, out of cache) at M = 1, 4 and 16 activation rows:
- torch ``linear`` in float32 and in bf16 (activations bf16);
- aten ``_weight_int8pack_mm`` (bf16 activations; what torchao's CPU int8 weight-only layout calls) and
  ``_weight_int4pack_mm_for_cpu`` (group 32);
- torchao ``quantize_`` with ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig(int4_packing_format=
  "opaque")`` on an ``nn.Linear`` when torchao imports;
- ours: ``moe/compute.py`` bf16 / int8 / int4 (float32 activations).
Figures: weights per second (G/s) and bytes of the weight read per second (GB/s), median of ``--passes``, against
``torch.sum`` over 1 GiB float32 measured between candidates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def med(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=15)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from moeyard.moe import compute as C
    torch.set_num_threads(a.threads)
    N, K = 2 * 2816 * 4, 1024
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    big = torch.ones(1 << 28)
    cands = {}
    wb = w.bfloat16()
    cands["torch linear fp32"] = (lambda x: F.linear(x, w), w.nbytes, torch.float32)
    cands["torch linear bf16"] = (lambda x: F.linear(x, wb), wb.nbytes, torch.bfloat16)
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
    cands["aten _weight_int8pack_mm"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8.bfloat16()),
                                         q8.nbytes, torch.bfloat16)
    try:
        q4 = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        sz = (torch.rand(K // 32, N, 2, generator=g) * 0.01).bfloat16()
        cands["aten _weight_int4pack_mm_for_cpu"] = (
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), N * K // 2, torch.bfloat16)
    except Exception as e:   # noqa: BLE001
        print("aten int4:", e)
    notes = []
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        for name, cfg in (("int8", Int8WeightOnlyConfig()),
                          ("int4", Int4WeightOnlyConfig(group_size=32, int4_packing_format="plain_int32"))):
            try:
                lin = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
                lin.weight.data.copy_(wb)
                quantize_(lin, cfg)
                nb = N * K // (1 if name == "int8" else 2)
                cands[f"torchao {torchao.__version__} {name}"] = (lambda x, lin=lin: lin(x), nb, torch.bfloat16)
            except Exception as e:   # noqa: BLE001
                notes.append(f"torchao {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    except ImportError as e:
        notes.append(f"torchao not importable ({e})")
    for kind in ("bf16", "int8", "int4"):
        p = C.pack(w, kind, "w")
        cands[f"moeyard {kind} ({C.native_status()})"] = (lambda x, p=p: C.matmul(x, p), p.nbytes, torch.float32)
    from common import cpu_class, record, table
    rows = []
    bws = []
    for name, (f, nb, dt) in cands.items():
        bws.append(big.numel() * 4 / med(lambda: big.sum(), 5))
        row = [name]
        for M in (1, 4, 16):
            x = torch.randn(M, K, generator=g).to(dt)
            try:
                with torch.inference_mode():
                    t = med(lambda: f(x), a.passes if M == 1 else max(3, a.passes // 3))
                row.append(f"{N * K / t / 1e9:.2f} G/s ({nb / t / 1e9:.1f} GB/s)")
            except Exception as e:   # noqa: BLE001
                row.append(f"fails: {type(e).__name__}")
        rows.append(row)
        print(row, flush=True)
    from moeyard.moe.compute import cpu_model, isa_summary
    body = (f"CPU {cpu_model()} ({isa_summary()}), torch {torch.__version__}, {a.threads} thread(s), machine shared "
            f"(load average {os.getloadavg()[0]:.1f}). Weight [{N}, {K}]; weights/s (bytes of weight/s), median of "
            f"{a.passes} (M = 1) or {max(3, a.passes // 3)} passes. `torch.sum` read bandwidth between candidates: "
            f"median {statistics.median(bws) / 1e9:.1f} GB/s ({min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f}).\n\n"
            + table(["candidate", "M = 1", "M = 4", "M = 16"], rows)
            + ("\n\n" + "\n".join(notes) if notes else ""))
    print(body)
    if a.record:
        record(f"Engine speed: weight-only kernel candidates ({cpu_class()} host)",
               f"PYTHONPATH=/tmp/torchao_pkg python benchmarks/bench_candidates.py --threads {a.threads} --record",
               body)


if __name__ == "__main__":
    main()
