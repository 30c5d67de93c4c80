"""Peer systems for benchmarks — llama.cpp and accelerate — built and run here, never imported by moeyard.

- ``llama_cpp_dir()``: a llama.cpp tree built from the ``llama-cpp-python`` sdist's vendored copy (see
  ``build_llama_cpp``; ``$LLAMA_CPP_DIR`` points at another build).
- ``to_gguf``: a checkpoint converted with llama.cpp's own ``convert_hf_to_gguf.py``, run in a peer venv under
  /tmp (its ``gguf`` package); our tokenizer is a byte-level BPE with GPT-2's pre-tokenizer that the script's
  hash table does not list, so the wrapper names it "gpt-2".
- ``run_capped``: a command inside a cgroup-v1 memory group capped at a byte limit (page cache is charged to the
  group, so a peer that mmaps the model cannot keep more of it in memory than the cap), returning its wall time
  and the bytes it read from storage (``ru_inblock`` of the child, 512-byte blocks, which counts mmap faults).
"""

from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import time

PEERS = os.environ.get("MOEYARD_PEERS_DIR", "/tmp/moeyard_peers")
CGROUP = "/sys/fs/cgroup/memory"


def llama_cpp_dir() -> str | None:
    cands = [os.environ.get("LLAMA_CPP_DIR", "")] + sorted(glob.glob(f"{PEERS}/llama_cpp_python-*/vendor/llama.cpp")) \
        + sorted(glob.glob("/tmp/llamacpp/llama_cpp_python-*/vendor/llama.cpp"))
    for d in cands:
        if d and os.path.isfile(os.path.join(d, "build", "bin", "llama-batched-bench")):
            return d
    return None


def build_llama_cpp(log=print) -> str:
    """Download the llama-cpp-python sdist and build its vendored llama.cpp (CPU, Release) under ``PEERS``."""
    d = llama_cpp_dir()
    if d:
        return d
    os.makedirs(PEERS, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", PEERS,
                    "llama-cpp-python"], check=True)
    tar = sorted(glob.glob(f"{PEERS}/llama_cpp_python-*.tar.gz"))[-1]
    subprocess.run(["tar", "xzf", tar, "-C", PEERS], check=True)
    src = tar[:-len(".tar.gz")] + "/vendor/llama.cpp"
    log(f"building llama.cpp in {src} (several minutes on 2 cores)")
    subprocess.run(["cmake", "-S", src, "-B", f"{src}/build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", f"{src}/build", "-j", "2", "--target", "llama-bench", "llama-batched-bench", "llama-cli",
                    "llama-quantize"], check=True, capture_output=True)
    return src


def peer_python() -> str:
    """A venv under ``PEERS`` that sees this interpreter's packages (torch, transformers) plus the peers' own
    (gguf from the llama.cpp tree, accelerate), so nothing is added to moeyard's environment."""
    venv = os.path.join(PEERS, "venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.isfile(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                              text=True, check=True).stdout.strip()
        # every site directory this interpreter sees (a venv layered over another by a .pth sees both)
        dirs = [d for d in sys.path if d.rstrip("/").endswith("site-packages") and os.path.isdir(d)]
        with open(os.path.join(site, "zz_moeyard_env.pth"), "w") as f:
            f.write("".join(d + "\n" for d in dirs))
    return py


def ensure_peer_packages(*pkgs: str):
    py = peer_python()
    for p in pkgs:
        mod = {"gguf": "gguf", "accelerate": "accelerate"}.get(p, p)
        if subprocess.run([py, "-c", f"import {mod}"], capture_output=True).returncode:
            src = os.path.join(llama_cpp_dir() or "", "gguf-py") if p == "gguf" else p
            subprocess.run([py, "-m", "pip", "install", "-q", src], check=True)


_CONVERT = """
import runpy, sys
sys.path.insert(0, {d!r})
sys.path.insert(0, {d!r} + "/gguf-py")      # the tree's own gguf package
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"   # byte-level BPE, GPT-2 pre-tokenizer
def _no_spm(self, *a, **k):   # our tokenizer.json is BPE: go straight to the GPT-2 path (no sentencepiece needed)
    raise FileNotFoundError("no sentencepiece model")
base.TextModel._set_vocab_sentencepiece = _no_spm
base.TextModel._set_vocab_llama_hf = _no_spm
sys.argv = ["convert_hf_to_gguf.py"] + {args!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def to_gguf(model_dir: str, out: str, outtype: str = "bf16") -> str:
    if os.path.isfile(out):
        return out
    d = llama_cpp_dir()
    code = _CONVERT.format(d=d, args=[model_dir, "--outfile", out + ".tmp", "--outtype", outtype],
                           script=os.path.join(d, "convert_hf_to_gguf.py"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"convert_hf_to_gguf failed: {r.stderr[-2000:]}")
    os.replace(out + ".tmp", out)
    return out


def quantize_gguf(gguf: str, kind: str, threads: int = 2) -> str:
    """``gguf`` requantized by llama.cpp's own ``llama-quantize`` to ``kind`` (Q8_0, Q4_0, ...), next to it."""
    out = gguf.replace(".bf16.gguf", "") + f".{kind.lower()}.gguf"
    if not os.path.isfile(out):
        subprocess.run([os.path.join(llama_cpp_dir(), "build", "bin", "llama-quantize"), gguf, out + ".tmp", kind,
                        str(threads)], check=True, capture_output=True)
        os.replace(out + ".tmp", out)
    return out


def drop_page_cache(paths: list[str]):
    """Evict these files from the page cache (clean pages), so the next reader starts cold."""
    for p in paths:
        for f in ([p] if os.path.isfile(p) else glob.glob(os.path.join(p, "*"))):
            if os.path.isfile(f):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd) if os.access(f, os.W_OK) else None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def cgroup_available() -> bool:
    return os.path.isdir(CGROUP) and os.access(CGROUP, os.W_OK)


def run_capped(cmd: list[str], limit_bytes: int | None, name: str, env=None, timeout: float = 1800) -> dict:
    """Run ``cmd`` in a fresh memory cgroup limited to ``limit_bytes`` (None: no cap). Returns returncode, output,
    wall seconds, bytes read from storage, the group's peak memory and whether the cap was hit."""
    grp = None
    if limit_bytes is not None:
        if not cgroup_available():
            raise RuntimeError(f"no writable cgroup-v1 memory controller at {CGROUP}")
        grp = os.path.join(CGROUP, f"moeyard-{name}-{os.getpid()}")
        os.makedirs(grp, exist_ok=True)
        with open(os.path.join(grp, "memory.limit_in_bytes"), "w") as f:
            f.write(str(int(limit_bytes)))
    procs = os.path.join(grp, "cgroup.procs") if grp else None

    def enter():
        if procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=enter)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)   # cumulative; the caller diffs when it needs per-run
    res = {"returncode": p.returncode, "stdout": out, "stderr": err, "wall_s": wall, "inblock_total": ru.ru_inblock}
    if grp:
        for k, fn in (("peak_bytes", "memory.max_usage_in_bytes"), ("failcnt", "memory.failcnt")):
            try:
                res[k] = int(open(os.path.join(grp, fn)).read())
            except OSError:
                res[k] = None
        try:
            os.rmdir(grp)
        except OSError:
            pass
    return res


def read_bytes_of(fn, *args, **kw) -> tuple[dict, int]:
    """(result of ``run_capped``, bytes the child read from storage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    r = fn(*args, **kw)
    return r, (r["inblock_total"] - before) * 512


def llama_bench(gguf: str, n_gen: int, threads: int, limit_bytes: int | None, batch: int = 1, reps: int = 3) -> dict:
    """llama.cpp's decode speed (``llama-bench -p 0 -n n_gen``, mmap on, the default) under the memory cap; batch
    > 1 uses ``llama-batched-bench`` (``-npl batch``)."""
    d = llama_cpp_dir()
    drop_page_cache([gguf])
    if batch == 1:
        cmd = [f"{d}/build/bin/llama-bench", "-m", gguf, "-p", "0", "-n", str(n_gen), "-t", str(threads),
               "-r", str(reps), "-o", "json"]
    else:
        cmd = [f"{d}/build/bin/llama-batched-bench", "-m", gguf, "-npp", "16", "-ntg", str(n_gen), "-npl",
               str(batch), "-t", str(threads), "-c", str(batch * (16 + n_gen) + 64), "--output-format", "jsonl"]
    r, nbytes = read_bytes_of(run_capped, cmd, limit_bytes, "llama")
    if r["returncode"]:
        raise RuntimeError(f"llama.cpp failed ({r['returncode']}): {r['stderr'][-1500:]}")
    if batch == 1:
        rows = json.loads(r["stdout"])
        tps = float(rows[0]["avg_ts"])
        tokens = n_gen * reps
    else:
        row = [json.loads(line) for line in r["stdout"].splitlines() if line.startswith("{")][-1]
        tps = float(row["speed_tg"])
        tokens = n_gen * batch
    return {"tokens_per_s": round(tps, 2), "read_bytes": nbytes, "read_mb_per_token": round(nbytes / 2**20 / tokens, 2),
            "peak_mb": round((r.get("peak_bytes") or 0) / 2**20, 1), "cap_hits": r.get("failcnt"),
            "wall_s": round(r["wall_s"], 1)}
