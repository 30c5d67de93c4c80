"""Shared helpers for benchmark scripts: machine description, markdown output, appending to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def machine() -> str:
    model = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, no GPU" if not _cuda() else f"{model} + CUDA"


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def cpu_class() -> str:
    """The SIMD class of this CPU, for section titles: a kernel figure is only comparable within one class."""
    from moeyard.moe.compute import cpu_flags
    f = cpu_flags()
    return "AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else "no AVX2"


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def record(section: str, command: str, body: str) -> str:
    """Replace (or add) ``## section`` in docs/BENCHMARKS.md with the body, command, date and machine."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = f"## {section}\n\nCommand: `{command}`  \nDate: {stamp}  \nMachine: {machine()}\n\n{body.strip()}\n"
    text = open(BENCH_MD).read() if os.path.exists(BENCH_MD) else "# Benchmarks\n"
    head = f"## {section}\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    os.makedirs(os.path.dirname(BENCH_MD), exist_ok=True)
    with open(BENCH_MD, "w") as f:
        f.write(text)
    return block
