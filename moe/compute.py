"""The compute plan: how weights are stored and multiplied on this machine, and the weight-only kernels.

Decode is memory-bound: a step reads every active weight once, so the fastest plan stores weights in the fewest
bytes the CPU multiplies at full speed. At load (``plan_for``) we choose, per checkpoint dtype, CPU ISA and
``quantization``:

- ``float32`` (torch's own matmuls): no native kernel, an fp32 checkpoint, or a GPU (bf16 and the device's own
  kernels there, as before);
- ``bf16`` storage, float32 compute (``moe/csrc/wmm.cpp``): a bf16 checkpoint on a CPU where the native kernel
  has an intrinsics path (AVX-512, or AVX2 + FMA + F16C: a bf16 -> fp32 conversion is one shift, exact). Half the
  bytes of float32 and the same values;
- ``int8`` (per output channel) and ``int4`` (groups of 32 along the input, float16 scales, like llama.cpp's
  Q4_0): weight-only quantization, ``LLM(quantization=...)``.

Activations stay float32 in every plan; a kernel computes what "dequantize to float32, then matmul" computes, up to
the order of the additions (tests/test_compute.py checks each kernel against that reference). Without the native
build (no compiler) the same packed weights are multiplied by that reference in torch, slower.

Candidates we measured before writing the kernel (docs/BENCHMARKS.md, "Engine speed"): torch's fp32 and bf16
``linear``, aten's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` (what torchao's CPU int8/int4
weight-only layouts call) — fast at batch 1 only in bf16 activations and 10-100x slower at batch 16.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError

log = logging.getLogger("moeyard")

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 32
# Rows of activations above which a packed weight is dequantized and multiplied by torch (prefill): the kernels
# stream the weight once per call and are built for the few rows of a decode step.
KERNEL_MAX_ROWS = 16
# Activations of the int8 / int4 kernels: quantized to int8 in blocks of 32 per call (as llama.cpp does for Q8_0 /
# Q4_0 on CPU; integer dot products, so the kernels are no longer compute-bound below the memory bandwidth), or,
# with ``MOEYARD_ACTIVATIONS=float32``, kept in float32 (weight-only: what "dequantize, then matmul" computes).
ACTIVATIONS = ("int8", "float32")


_ACT_Q8: bool | None = None     # read from the environment once (at load: ``check_activations``), not per call


def act_q8() -> bool:
    if _ACT_Q8 is None:
        check_activations()
    return _ACT_Q8


def check_activations() -> None:
    """Read ``MOEYARD_ACTIVATIONS`` (at load, so a bad value fails there, and later calls read no environment)."""
    global _ACT_Q8
    v = os.environ.get("MOEYARD_ACTIVATIONS", "int8")
    if v not in ACTIVATIONS:
        raise ModelError(f"MOEYARD_ACTIVATIONS={v!r} is not valid; valid: {', '.join(ACTIVATIONS)}")
    _ACT_Q8 = v != "float32"


# ISAs the native kernel reports (``isa()``) for its intrinsics paths; "scalar" (plain loops) is slower than torch's
# float32 matmul, so bf16 storage is chosen only with one of these.
VECTOR_ISAS = ("avx512-vnni", "avx512", "avx2")


def check_quantization(q) -> str | None:
    if q is None or q in ("none", "None", ""):
        return None
    if q not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {q!r}; valid: {', '.join(QUANTIZATIONS)} (or None)")
    return q


# -- the native kernel ------------------------------------------------------------------------------------------

_lock = threading.Lock()
_native = None
_native_error: str | None = None
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SRCS = [os.path.join(_CSRC, "wmm.cpp"), os.path.join(_CSRC, "ops.cpp")]   # the products; the fused small ops


def build_dir() -> str:
    return os.environ.get("MOEYARD_KERNEL_DIR", os.path.join(os.path.expanduser("~"), ".cache", "moeyard", "wmm"))


_KERNEL_OFF = os.environ.get("MOEYARD_KERNEL", "") == "torch"     # read again at each plan (check_kernel)


def check_kernel() -> None:
    """Read ``MOEYARD_KERNEL`` (at each plan: a model loaded after it is set runs the torch fallback; the hot
    paths then read no environment, which cost ~1 us per product and fused op)."""
    global _KERNEL_OFF
    _KERNEL_OFF = os.environ.get("MOEYARD_KERNEL", "") == "torch"


def native(build: bool = True):
    """The compiled kernel module, built on first use (torch.utils.cpp_extension, -O3 -march=native) into
    ``build_dir()``; None when it cannot be built (then the torch fallback runs) or ``MOEYARD_KERNEL=torch`` (as read
    by the last ``check_kernel``)."""
    global _native, _native_error
    if _KERNEL_OFF:
        return None
    if _native is not None or _native_error is not None:
        return _native
    with _lock:
        if _native is not None or _native_error is not None:
            return _native
        d = build_dir()
        so = os.path.join(d, "moeyard_wmm.so")
        if not build and not os.path.isfile(so):
            return None
        try:
            from torch.utils.cpp_extension import load
            os.makedirs(d, exist_ok=True)
            if not os.path.isfile(so):
                log.warning("building the native weight-only kernel (moe/csrc/wmm.cpp) once, into %s", d)
            _native = load("moeyard_wmm", _SRCS, build_directory=d, verbose=False,
                           extra_cflags=["-O3", "-march=native", "-std=c++17"], extra_ldflags=[])
        except Exception as e:  # noqa: BLE001 — no compiler, headers, ninja: fall back to torch
            _native_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("native kernel unavailable (%s); using the torch fallback", _native_error)
        return _native


def fused(x: torch.Tensor):
    """The native module when a fused op of ``moe/csrc/ops.cpp`` may replace torch ops on ``x``: float32 on the CPU,
    no autograd (training keeps torch's ops), the kernel built; else None."""
    if x.dtype is not torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    return native(build=False)


def native_status() -> str:
    check_kernel()
    m = native()
    return f"native ({m.isa()})" if m is not None else f"torch fallback ({_native_error or 'disabled'})"


# -- CPU features -----------------------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def isa_summary(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
            "amx_bf16", "amx_int8")
    return " ".join(f for f in keep if f in flags) or "none of avx2/avx512"


# -- packed weights ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packed:
    """One weight matrix [N, K] as stored by a plan: ``kind`` bf16 | int8 | int4 | float32."""
    kind: str
    data: torch.Tensor               # bf16 [N, K] | int8 [N, K] | uint8 [N, K/2] | float32 [N, K]
    scale: torch.Tensor | None       # int8: float32 [N]; int4: float16 [N, K/G]
    shape: tuple[int, int]
    bias: torch.Tensor | None = None
    layout: str = "rows"             # "rows": row after row; "x8" (int4): groups of 8 rows interleaved (interleave8)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.bias) if t is not None)

    def rows(self) -> "Packed":
        """This matrix in the row-after-row layout (itself unless x8: the layout checkpoints and slots hold)."""
        if self.layout == "rows":
            return self
        N, K = self.shape
        nb = K // 32
        data = self.data.view(N // 8, nb, 4, 8, 4).permute(0, 3, 1, 2, 4).reshape(N, K // 2)
        scale = self.scale.view(N // 8, nb, 8).permute(0, 2, 1).reshape(N, nb)
        return Packed(self.kind, data, scale, self.shape, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix this packed weight stands for (the reference the kernels are tested against)."""
        if self.layout != "rows":
            return self.rows().dequantize()
        N, K = self.shape
        if self.kind in ("float32", "bf16"):
            return self.data.float()
        if self.kind == "int8":
            return self.data.float() * self.scale[:, None]
        q = unpack_int4(self.data, K)
        s = self.scale.float()
        G = K // s.shape[1]
        return torch.addcmul(-8.0 * s.repeat_interleave(G, 1), q.float(), s.repeat_interleave(G, 1))


def interleave8(p: Packed) -> Packed:
    """An int4 matrix of N (a multiple of 8) rows in the x8 layout that ``mm_int4x8`` (moe/csrc/wmm.cpp) reads:
    per group of 8 rows and block of 32 values, the rows' 16 nibble bytes as 4 chunks of (4 bytes of row 0, ..., of
    row 7), and the 8 rows' block scales side by side (one per 32 values). The same bytes, reordered at load: a
    batch-1 product reads one stream for 8 rows and sums each row in its own vector lane (1.1-1.5x the row
    layout's rate at one activation row, 1.5-1.75x at four, on the AVX-512 host). Other matrices stay as they are;
    so do checkpoints and offload slots, which hold rows."""
    N, K = p.shape
    if p.kind != "int4" or p.layout != "rows" or N % 8 or K % 32 or p.scale is None:
        return p
    nb = K // 32
    scale = p.scale if p.scale.shape[1] == nb else p.scale.repeat_interleave(nb // p.scale.shape[1], 1)
    data = p.data.reshape(N // 8, 8, nb, 4, 4).permute(0, 2, 3, 1, 4).contiguous().view(N, K // 2)
    return Packed(p.kind, data, scale.reshape(N // 8, 8, nb).permute(0, 2, 1).contiguous().view(N, nb), p.shape,
                  p.bias, "x8")


def unpack_int4(data: torch.Tensor, K: int) -> torch.Tensor:
    N = data.shape[0]
    b = data.view(N, K // 32, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(N, K)


def pack(w: torch.Tensor, kind: str, name: str, bias: torch.Tensor | None = None) -> Packed:
    """Pack a float matrix [N, K]; a shape the kind cannot hold fails naming ``name`` (at load)."""
    if w.dim() != 2:
        raise ModelError(f"{name}: weight-only {kind} needs a 2-D weight, got shape {list(w.shape)}")
    N, K = (int(s) for s in w.shape)
    b = None if bias is None else bias.float().contiguous()
    if kind == "float32":
        return Packed(kind, w.float().contiguous(), None, (N, K), b)
    if kind == "bf16":
        return Packed(kind, w.to(torch.bfloat16).contiguous(), None, (N, K), b)
    if N > 512:     # in row blocks, so the float32 temporaries stay small (peak RSS at load)
        parts = [pack(w[i:i + 512], kind, name) for i in range(0, N, 512)]
        return Packed(kind, torch.cat([q.data for q in parts]), torch.cat([q.scale for q in parts]), (N, K), b)
    wf = w.float()
    if kind == "int8":
        s = wf.abs().amax(1) / 127.0
        q = torch.where(s[:, None] > 0, torch.round(wf / torch.where(s > 0, s, 1.0)[:, None]), 0.0)
        return Packed(kind, q.clamp(-127, 127).to(torch.int8).contiguous(), s.contiguous(), (N, K), b)
    if kind == "int4":
        G = INT4_GROUP
        if K % G:
            raise ModelError(f"{name}: int4 needs the input size to be a multiple of the group size {G}, got "
                             f"shape {[N, K]}; use quantization='int8' for this model")
        g = wf.view(N, K // G, G)
        idx = g.abs().argmax(-1, keepdim=True)
        d = (g.gather(-1, idx) / -8.0).squeeze(-1).to(torch.float16)    # Q4_0: the signed max maps to -8
        df = d.float()
        inv = torch.where(df != 0, 1.0 / torch.where(df != 0, df, 1.0), 0.0)
        q = (torch.round(g * inv[..., None]) + 8).clamp(0, 15).to(torch.uint8).view(N, K // 32, 32)
        data = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2).contiguous()
        return Packed(kind, data, d.contiguous(), (N, K), b)
    raise ModelError(f"unknown weight kind {kind!r}")


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] (K a multiple of 32) as the kernels quantize them: (int8 values as float32 [M, K],
    float32 scales [M, K / 32]); value * scale approximates x, blocks of 32, round half to even."""
    M, K = x.shape
    b = x.float().reshape(M, K // 32, 32)
    amax = b.abs().amax(-1)
    inv = torch.where(amax != 0, torch.tensor(127.0) / torch.where(amax != 0, amax, 1.0), 0.0)
    q = torch.round(b * inv[..., None])
    return q.reshape(M, K), amax / 127.0


def reference_q8(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """What the int8-activation kernels compute, in float64 (tests): per block of 32, the exact integer sum of the
    quantized activations times the integer weights, times the activation scale (and, int4, the block's scale);
    int8: times the row's scale."""
    p = p.rows()
    N, K = p.shape
    q, d = quantize_q8(x.reshape(-1, K))
    if p.kind == "int8":
        w = p.data.double()
    else:
        w = unpack_int4(p.data, K).double() - 8.0
    dots = torch.einsum("mbk,nbk->mnb", q.double().view(-1, K // 32, 32), w.view(N, K // 32, 32))
    if p.kind == "int8":
        y = (dots * d.double()[:, None, :]).sum(-1) * p.scale.double()
    else:
        s = p.scale.double().repeat_interleave(K // 32 // p.scale.shape[1], 1)     # [N, K / 32]
        y = (dots * d.double()[:, None, :] * s[None]).sum(-1)
    y = y.float()
    return y if p.bias is None else y + p.bias


def matmul(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x [..., K] (float32) times the packed [N, K] weight transposed: [..., N] float32."""
    two_d = x.dim() == 2
    lead = x.shape[:-1]
    x2 = x if two_d else x.reshape(-1, x.shape[-1])
    m = native() if p.kind != "float32" else None
    if m is not None and x2.shape[0] <= KERNEL_MAX_ROWS and x2.device.type == "cpu" and \
            (p.layout == "rows" or act_q8()):
        if p.layout == "x8":
            y = m.mm_int4x8(x2, p.data, p.scale)
        elif p.kind == "bf16":
            y = m.mm_bf16(x2, p.data)
        elif p.kind == "int8":
            y = m.mm_int8(x2, p.data, p.scale, act_q8())
        else:
            y = m.mm_int4(x2, p.data, p.scale, INT4_GROUP, act_q8())
        if p.bias is not None:
            y = y + p.bias
    elif p.kind == "float32":
        y = F.linear(x2.float(), p.data, p.bias)
    else:
        y = F.linear(x2.float(), p.dequantize(), p.bias)
    return y if two_d else y.reshape(*lead, p.shape[0])


class PackedLinear(torch.nn.Module):
    """Drop-in for an ``nn.Linear`` whose weight is packed (dense layers: attention projections, lm_head)."""

    def __init__(self, p: Packed):
        super().__init__()
        self.p = p
        self.in_features, self.out_features = p.shape[1], p.shape[0]

    @property
    def weight(self) -> torch.Tensor:   # readers that want the matrix (e.g. tensor-parallel slicing) get float32
        return self.p.dequantize()

    @property
    def bias(self):
        return self.p.bias

    def forward(self, x):
        return matmul(x, self.p).to(x.dtype)


# -- the plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComputePlan:
    experts: str          # storage of routed experts: float32 | bf16 | int8 | int4 (| the model dtype on GPU)
    dense: str            # storage of attention projections and dense MLPs
    lm_head: str
    kernel: str           # "native (avx512)" | "torch fallback (...)" | "torch"
    isa: str
    reason: str

    @property
    def packs(self) -> bool:
        return self.experts in ("bf16", "int8", "int4") and self.kernel != "torch"

    @property
    def activations(self) -> str:
        """What the int8 / int4 kernels multiply the weights by (decode rows; prefill dequantizes, float32)."""
        q8 = self.experts in QUANTIZATIONS and self.kernel.startswith("native") and act_q8()
        return "int8 (blocks of 32)" if q8 else "float32"

    def stats(self) -> dict:
        return {"compute_experts": self.experts, "compute_dense": self.dense, "compute_lm_head": self.lm_head,
                "compute_kernel": self.kernel, "compute_isa": self.isa, "compute_activations": self.activations}

    def describe(self) -> str:
        return (f"compute plan: experts {self.experts}, dense {self.dense}, lm_head {self.lm_head}; activations "
                f"{self.activations}; kernel {self.kernel}; CPU {self.isa} ({self.reason})")


def plan_for(ckpt_dtype: str | None, compute_dtype: torch.dtype, device: torch.device,
             quantization: str | None = None) -> ComputePlan:
    q = check_quantization(quantization)
    if device.type != "cpu":
        if q is not None:
            raise ModelError(f"quantization={q!r} runs on CPU only in this version; the device is {device.type}")
        name = str(compute_dtype).replace("torch.", "")
        return ComputePlan(name, name, name, "torch", device.type, "the device's own kernels")
    isa = isa_summary()
    if compute_dtype != torch.float32:
        if q is not None:
            raise ModelError(f"quantization={q!r} needs float32 activations (dtype=None or 'float32'), got "
                             f"{compute_dtype}")
        name = str(compute_dtype).replace("torch.", "")
        return ComputePlan(name, name, name, "torch", isa, f"dtype {name} asked for")
    status = native_status()
    if q is not None:
        check_activations()      # at load, never mid-generation
        return ComputePlan(q, q, "int8", status, isa, f"quantization={q}")
    if ckpt_dtype in ("bfloat16", "bf16") and native() is not None and native().isa() in VECTOR_ISAS:
        return ComputePlan("bf16", "bf16", "bf16", status, isa,
                           "bf16 checkpoint: stored as bf16, float32 arithmetic (exact conversion)")
    return ComputePlan("float32", "float32", "float32", "torch", isa,
                       "float32 weights" + ("" if native() is not None else f"; {status}"))


class PackedEmbedding(torch.nn.Module):
    """An embedding table stored in bf16 (exact for a bf16 checkpoint); looked-up rows are float32."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.table = weight.to(torch.bfloat16).contiguous()
        self.num_embeddings, self.embedding_dim = self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table.float()

    def forward(self, ids):
        return F.embedding(ids, self.table).float()


def fixed_mmap_threshold(nbytes: int = 256 << 10):
    """Have glibc serve allocations of ``nbytes`` or more by mmap, and give them back on free, for the rest of the
    process. Packing at load frees many expert-sized float temporaries; by default glibc raises its mmap threshold
    after such frees and serves the next ones from a heap it cannot shrink (measured: 58 MB kept after packing 8
    experts of 11 MB, 16 MB with this)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(nbytes))        # M_MMAP_THRESHOLD (a fixed value also stops its dynamic growth)
        libc.mallopt(-1, 1 << 20)            # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


HUGE_PAGE = 2 << 20


def huge_pages() -> bool:
    """Transparent huge pages can be asked for (``madvise`` or ``always`` mode), and MOEYARD_HUGE_PAGES is not 0."""
    if os.environ.get("MOEYARD_HUGE_PAGES", "1") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class Arena:
    """Packed weights copied into one anonymous mapping advised for transparent huge pages (2 MiB; CPU only). A
    decode step streams each matrix once; with 4 KiB pages every page boundary costs a TLB miss and stops the
    hardware prefetcher (measured per matrix on the Zen 4 host: 1.0-1.16x the 4 KiB rate). Tensors placed here are
    views of the mapping, which lives as long as one of them does; up to one huge page at the end is slack."""

    def __init__(self, nbytes: int):
        import mmap
        self._map = mmap.mmap(-1, int(nbytes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._buf = torch.frombuffer(self._map, dtype=torch.uint8)
        self._off = (-self._buf.data_ptr()) % HUGE_PAGE       # start on a huge-page boundary
        self._end = self._off + int(nbytes)

    @staticmethod
    def size(t: torch.Tensor | None) -> int:
        return 0 if t is None else (t.numel() * t.element_size() + 63) // 64 * 64

    @staticmethod
    def packed_size(p: Packed) -> int:
        """Bytes ``packed`` takes for ``p``."""
        return Arena.size(p.data) + Arena.size(p.scale)

    def place(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A copy of the contiguous CPU tensor ``t`` in the arena (None stays None)."""
        if t is None:
            return None
        n = t.numel() * t.element_size()
        if self._off + n > self._end:
            raise RuntimeError(f"arena full: {n} bytes asked, {self._end - self._off} left")
        v = self._buf[self._off:self._off + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        self._off += self.size(t)
        return v

    def packed(self, p: Packed) -> Packed:
        return dataclasses.replace(p, data=self.place(p.data), scale=self.place(p.scale))


def pack_module(model: torch.nn.Module, full: str, plan: ComputePlan) -> bool:
    """Replace the loaded module ``full`` of ``model`` by its packed form when the plan packs it: an ``nn.Linear``
    (attention projections, dense MLPs, shared experts, lm_head) in the plan's storage, the embedding in bf16.
    Routers and tiny gates stay as they are (they choose experts)."""
    if not plan.packs:
        return False
    parent_name, _, cname = full.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    child = getattr(parent, cname)
    tied = getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)
    if any(p.device.type == "meta" for p in child.parameters(recurse=False)):
        return False
    if isinstance(child, torch.nn.Embedding):
        if tied or full != "model.embed_tokens":
            return False
        setattr(parent, cname, PackedEmbedding(child.weight.data))
        return True
    if not isinstance(child, torch.nn.Linear):
        return False
    if cname in ("gate", "shared_expert_gate") or child.out_features < 16 or (full == "lm_head" and tied):
        return False
    kind = plan.lm_head if full == "lm_head" else plan.dense
    if kind == "int4" and child.in_features % INT4_GROUP:
        kind = "int8"      # dense layers of odd width: int8 (routed experts are checked strictly)
    setattr(parent, cname, PackedLinear(interleave8(pack(child.weight.data, kind, full + ".weight",
                                                         None if child.bias is None else child.bias.data))))
    return True


def pack_dense(model: torch.nn.Module, plan: ComputePlan):
    """Pack every eligible loaded module of ``model`` (see ``pack_module``)."""
    if not plan.packs:
        return
    for name, mod in list(model.named_modules()):
        if name and isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            pack_module(model, name, plan)
    finish_dense(model)


def finish_dense(model: torch.nn.Module) -> None:
    """After the dense layers are packed: ``fuse_qkv`` on every attention module of ``model``, then, where huge
    pages are available on the CPU, every packed dense matrix copied into one huge-page ``Arena`` (as resident
    experts are): attention, dense MLPs, shared experts and lm_head stream from 2 MiB pages too."""
    from .layers import Attention
    attns = [m for m in model.modules() if isinstance(m, Attention) and fuse_qkv(m)]
    if not huge_pages():
        return
    parts = {id(l) for a in attns for l in (a.q_proj, a.k_proj, a.v_proj)}
    lins = [m for m in model.modules() if isinstance(m, PackedLinear) and id(m) not in parts and
            m.p.data.device.type == "cpu"]
    total = sum(Arena.packed_size(m.p) for m in lins) + sum(Arena.packed_size(a.qkv) for a in attns)
    if not total:
        return
    arena = Arena(total)
    for m in lins:
        m.p = arena.packed(m.p)
    for a in attns:
        a.qkv = arena.packed(a.qkv)
        view_rows(a)


def view_rows(attn) -> None:
    """Point q_proj, k_proj and v_proj of ``attn`` at their rows of ``attn.qkv``."""
    f, r0 = attn.qkv, 0
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        rows = slice(r0, r0 + lin.p.shape[0])
        lin.p = dataclasses.replace(lin.p, data=f.data[rows], scale=None if f.scale is None else f.scale[rows],
                                    bias=None if f.bias is None else f.bias[rows])
        r0 = rows.stop


def fuse_qkv(attn) -> bool:
    """Pack an attention module's q, k and v projections as one matrix (``attn.qkv``) when all three are packed
    alike: a decode step then runs one product and quantizes its input once, not three times. q_proj, k_proj and
    v_proj become views of the fused matrix's rows (no extra memory; the same values, so the same outputs)."""
    lins = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(l, PackedLinear) for l in lins):
        return False
    ps = [l.p for l in lins]
    if len({(p.kind, p.layout) for p in ps}) != 1 or len({p.shape[1] for p in ps}) != 1 or \
            len({p.bias is None for p in ps}) != 1 or len({None if p.scale is None else p.scale.dim() for p in ps}) != 1:
        return False
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)       # noqa: E731
    attn.qkv = Packed(ps[0].kind, cat([p.data for p in ps]), cat([p.scale for p in ps]),
                      (sum(p.shape[0] for p in ps), ps[0].shape[1]), cat([p.bias for p in ps]), ps[0].layout)
    view_rows(attn)
    return True


if __name__ == "__main__":     # `python -m moeyard.moe.compute --build`: the setup step of `make demo` / `make test`
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"weight-only kernel: {native_status()}; CPU: {cpu_model()} ({isa_summary()})")
