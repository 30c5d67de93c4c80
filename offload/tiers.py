"""Storage tier: one expert's bytes read straight from the checkpoint's safetensors files.

Every expert matrix (per-expert tensors or one expert's slice of a fused ``[E, ...]`` tensor) is a contiguous byte
range. A quantized checkpoint (fp8, MXFP4: ``moe/quant_formats.py``) keeps its small format here: the quantized
bytes and their scales (a second range per matrix) are what is read, and ``finish`` dequantizes them after the
read (on the compute device when it is a GPU). ``DiskTier.read_raw`` reads the ranges (adjacent ones with one ``os.preadv`` on a cached descriptor; with the
usual layout a whole expert is one range, ``read_flat``) and drops them from the page cache afterwards
(``posix_fadvise(DONTNEED)``) so the OS cannot hide the storage cost; the bytes land in a host buffer (pinned when
CUDA is present) and are converted/copied into the caller's slot tensors.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass

import torch

from ..moe.checkpoint import CheckpointReader
from ..moe.config import MoEConfig
from ..moe.errors import CheckpointError
from ..moe.quant_formats import (check_fp8, check_mxfp4, check_packed, dequant_fp8, dequant_mxfp4, fp8_scale_name,
                                 logical_shape, stored_as)
from ..moe.weights import expert_refs

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_RAW_DTYPES = {**_ST_DTYPES, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
               "F8_E8M0": torch.float8_e8m0fnu}


class ExpertReadError(CheckpointError):
    """Reading an expert from storage failed (file truncated, removed, unreadable)."""

    def __init__(self, layer: int, expert: int, msg: str):
        super().__init__(msg)
        self.layer, self.expert = layer, expert


@dataclass(frozen=True)
class Extent:
    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]                   # final shape of the matrix (or bias vector)
    slab_shape: tuple[int, ...] | None = None  # gpt-oss, quantized: the bytes read have this shape, then finish
    cols: tuple[int, int, int] | None = None
    transpose: bool = False
    fmt: str = "plain"                       # "plain" | "fp8" | "mxfp4" | "packed" (moeyard int8/int4: kept as is)
    scale: "Extent | None" = None            # the quantized matrix's scales
    block: tuple[int, int] | None = None     # fp8 weight_block_size
    rows: tuple[int, int] | None = None      # rows of the dequantized slab (fused fp8 gate/up)

    @property
    def direct(self) -> bool:
        return self.slab_shape is None

    def finish(self, t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix from the bytes read: dequantized (``scale``: the bytes of ``self.scale``), then a strided
        slice and transpose for slab reads."""
        if self.direct:
            return t
        if self.fmt == "fp8":
            t = dequant_fp8(t, scale, self.block)
        elif self.fmt == "mxfp4":
            t = dequant_mxfp4(t, scale).transpose(-1, -2)
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        if self.cols is not None:
            t = t[..., self.cols[0]:self.cols[1]:self.cols[2]]
        if self.transpose:
            t = t.transpose(-1, -2)
        return t


def expert_extents(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> list[Extent]:
    """Byte ranges of (gate [F,D], up [F,D], down [D,F]) of one expert, then its biases [F], [F], [D] if any.

    Every extent is one contiguous byte range: one expert's slice of a fused ``[E, ...]`` tensor is contiguous;
    where the matrix is a strided part of that slice (gpt-oss), the whole slice is the extent and ``finish``
    slices it after the read.
    """
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    refs = expert_refs(cfg, reader, layer, expert)
    todo = [(refs.gate, (F, D)), (refs.up, (F, D)), (refs.down, (D, F))]
    if refs.gate_bias is not None:
        todo += [(refs.gate_bias, (F,)), (refs.up_bias, (F,)), (refs.down_bias, (D,))]
    out = []
    for ref, shape in todo:
        if stored_as(reader, ref.name) != "plain":
            out.append(_quant_extent(cfg, reader, ref, shape))
            continue
        fp, off, nb, dt = reader.data_location(ref.name)
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"tensor {ref.name!r}: dtype {dt} not supported by offload mode")
        bpe = torch.tensor([], dtype=_ST_DTYPES[dt]).element_size()
        full = reader.shape(ref.name)
        if ref.index is None:
            want = int(torch.Size(shape).numel()) * bpe
            if want != nb:
                raise CheckpointError(f"tensor {ref.name!r} has {nb} bytes but the config implies {want}")
            out.append(Extent(fp, off, want, _ST_DTYPES[dt], shape))
            continue
        per = nb // full[0]
        off += ref.index * per
        if ref.cols is not None or ref.transpose:
            out.append(Extent(fp, off, per, _ST_DTYPES[dt], shape, tuple(full[1:]), ref.cols, ref.transpose))
            continue
        if ref.rows is not None:
            off += ref.rows[0] * (per // full[1])
        out.append(Extent(fp, off, int(torch.Size(shape).numel()) * bpe, _ST_DTYPES[dt], shape))
    return out


def _range(reader, name: str, index: int | None, dtypes=_RAW_DTYPES) -> Extent:
    """The bytes of ``name`` (or of ``name[index]``) as an extent of their stored dtype and shape."""
    fp, off, nb, dt = reader.data_location(name)
    if dt not in dtypes:
        raise CheckpointError(f"tensor {name!r}: dtype {dt} not supported by offload mode")
    shape = tuple(reader.shape(name))
    if index is not None:
        nb //= shape[0]
        off, shape = off + index * nb, shape[1:]
    return Extent(fp, off, nb, dtypes[dt], shape)


def _quant_extent(cfg: MoEConfig, reader: CheckpointReader, ref, shape) -> Extent:
    """A quantized expert matrix: its (slab of) quantized bytes with its scales as a second range."""
    q, name = cfg.quant, ref.name
    if stored_as(reader, name) == "packed":        # the bytes the compute plan multiplies: no finishing step
        if ref.index is not None:
            raise CheckpointError(f"tensor {name!r}: packed experts must be one tensor per expert matrix")
        sn = check_packed(reader, q, name, tuple(shape))
        data, scale = _range(reader, name, None), _range(reader, sn, None)
        return Extent(data.file, data.offset, data.nbytes, data.dtype, data.shape, fmt="packed", scale=scale)
    full = logical_shape(reader, name)
    want = tuple(shape) if ref.index is None else full
    if stored_as(reader, name) == "fp8":
        check_fp8(reader, q, name, want)
        data, scale = _range(reader, name, ref.index), _range(reader, fp8_scale_name(name), ref.index)
        return Extent(data.file, data.offset, data.nbytes, data.dtype, tuple(shape), data.shape, ref.cols,
                      ref.transpose, "fp8", scale, q.block, ref.rows)
    check_mxfp4(reader, q, name, want)
    data, scale = _range(reader, f"{name}_blocks", ref.index), _range(reader, f"{name}_scales", ref.index)
    return Extent(data.file, data.offset, data.nbytes, data.dtype, tuple(shape), data.shape, ref.cols, ref.transpose,
                  "mxfp4", scale, None, ref.rows)


@dataclass(frozen=True)
class RawLayout:
    """One expert's bytes as one run: ``nbytes``, and per range of ``DiskTier.ranges`` (offset in the run, bytes,
    dtype, shape)."""
    nbytes: int
    parts: tuple[tuple[int, int, torch.dtype, tuple[int, ...]], ...]


class DiskTier:
    """Reads experts from disk; counts bytes and seconds (achieved read bandwidth)."""

    def __init__(self, cfg: MoEConfig, reader: CheckpointReader, drop_cache: bool = True, direct_io: bool = True):
        self.cfg = cfg
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        # O_DIRECT: whole-expert reads bypass the page cache (DMA into an aligned buffer: the reading thread sleeps
        # instead of copying pages, and nothing is left cached); falls back to pread + DONTNEED where unsupported
        self.direct_io = direct_io and drop_cache and hasattr(os, "O_DIRECT")
        self._dfds: dict[str, int] = {}
        self.extents = {(l, e): expert_extents(cfg, reader, l, e)
                        for l in cfg.moe_layers for e in range(cfg.num_experts)}
        # every byte range of an expert: its matrices, then the scales of the quantized ones
        self.ranges = {k: exts + [x.scale for x in exts if x.scale is not None] for k, exts in self.extents.items()}
        self.raw = self._raw_layout()
        self.flat = self._flat_layout()
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.reads = 0

    def _raw_layout(self) -> "RawLayout | None":
        """When every expert's byte ranges (``ranges``: matrices, then scales) form one contiguous run of one file,
        laid out the same way for every expert: the run's size and where each range lies in it, so a slot can hold
        the run's bytes as they are (bf16 or packed int8/int4 slots: no conversion) and view its matrices in place.
        Sets ``flat_runs`` (file, offset, bytes of each expert's run). None otherwise."""
        ref, runs = None, {}
        for k, rs in self.ranges.items():
            if any(not x.direct for x in rs) or len({x.file for x in rs}) != 1:
                return None
            lo, hi = min(x.offset for x in rs), max(x.offset + x.nbytes for x in rs)
            if hi - lo != sum(x.nbytes for x in rs):
                return None               # gaps, or one range read twice
            parts = tuple((x.offset - lo, x.nbytes, x.dtype, tuple(x.shape)) for x in rs)
            if ref is not None and parts != ref:
                return None
            ref, runs[k] = parts, (rs[0].file, lo, hi - lo)
        if ref is None:
            return None
        self.flat_runs = runs
        return RawLayout(runs[next(iter(runs))][2], ref)

    def _flat_layout(self):
        """When every expert is one contiguous run (``raw``) of unquantized matrices of one dtype (per-expert tensors
        written side by side, the usual layout): (order of the matrices in the file, dtype), so an expert is one read
        into one flat buffer and one conversion. None otherwise (fused slabs, gaps, scales, mixed dtypes)."""
        if self.raw is None or any(x.scale is not None for exts in self.extents.values() for x in exts):
            return None
        parts = self.raw.parts                     # the matrices, as ``ranges`` equals ``extents`` without scales
        if len({p[2] for p in parts}) != 1:
            return None
        return tuple(sorted(range(len(parts)), key=lambda i: parts[i][0])), parts[0][2]

    def read_flat(self, layer: int, expert: int, mv: memoryview, start: int = 0, length: int | None = None):
        """Bytes ``[start, start + length)`` of the expert (``flat`` layout; default all) into ``mv`` with one
        ``preadv`` and one ``posix_fadvise``."""
        t0 = time.perf_counter()
        f, off, nb = self.flat_runs[(layer, expert)]
        off, nb = off + start, (nb - start if length is None else length)
        self._read_run(layer, expert, f, off, nb, [mv[:nb]])
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += nb
            self.read_seconds += dt
            self.reads += 1

    ALIGN = 4096

    CHUNK = 32 << 20      # largest single read: bounds the staging buffer of each reading thread

    def stage_nbytes(self) -> int:
        """Size of a staging buffer for ``read_flat_into`` (one chunk plus alignment slack)."""
        return min(self.CHUNK, max(r[2] for r in self.flat_runs.values())) + 2 * self.ALIGN

    def read_flat_into(self, layer: int, expert: int, mv: memoryview, start: int = 0, length: int | None = None) -> int:
        """Bytes ``[start, start + length)`` of the expert (``flat`` layout; at most ``CHUNK``) into ``mv``
        (``ALIGN``-aligned, ``stage_nbytes`` long); returns where they start in ``mv``. With O_DIRECT the aligned
        superset of the range is read (and counted)."""
        if not self.direct_io:
            self.read_flat(layer, expert, mv, start, length)
            return 0
        t0 = time.perf_counter()
        f, off, nb = self.flat_runs[(layer, expert)]
        off, nb = off + start, (nb - start if length is None else length)
        a = off - off % self.ALIGN
        end = -(-(off + nb) // self.ALIGN) * self.ALIGN
        for attempt in (0, 1):
            try:
                fd = self._fd(f, reopen=bool(attempt), direct=True)
                got = os.preadv(fd, [mv[:end - a]], a)
            except OSError as e:
                if e.errno == errno.EINVAL:          # no O_DIRECT here (tmpfs, …): buffered reads from now on
                    self.direct_io = False
                    self.read_flat(layer, expert, mv, start, nb)
                    return 0
                if attempt:
                    raise ExpertReadError(layer, expert, f"cannot read expert {expert} of layer {layer}: {f}: "
                                          f"{e.strerror}") from None
                continue
            if got >= off + nb - a:
                break
            if attempt:
                raise ExpertReadError(
                    layer, expert, f"cannot read expert {expert} of layer {layer}: {f} is truncated "
                    f"(needs bytes {off}..{off + nb}, file has {os.fstat(fd).st_size})")
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += got
            self.read_seconds += dt
            self.reads += 1
        return off - a

    def expert_nbytes(self) -> int:
        """Bytes read for one expert (quantized bytes and scales for a quantized checkpoint)."""
        return sum(x.nbytes for x in next(iter(self.ranges.values())))

    def read(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's matrices (and biases): checkpoint dtype, or float32 when dequantized; final shapes."""
        bufs = [torch.empty(x.slab_shape or x.shape, dtype=x.dtype) for x in self.ranges[(layer, expert)]]
        return self.finish((layer, expert), self.read_raw(layer, expert, bufs))

    def finish(self, key: tuple[int, int], raws: list[torch.Tensor]) -> list[torch.Tensor]:
        """The matrices from the buffers of ``read_raw`` (in ``ranges`` order): dequantized, sliced, transposed."""
        exts = self.extents[key]
        scales = iter(raws[len(exts):])
        return [x.finish(t, next(scales) if x.scale is not None else None) for x, t in zip(exts, raws)]

    def _fd(self, file: str, reopen: bool = False, direct: bool = False) -> int:
        """A cached read-only descriptor of ``file`` (one ``open`` per file, not per read); ``direct``: opened with
        O_DIRECT (kept apart from the buffered ones)."""
        cache = self._dfds if direct else self._fds
        with self._lock:
            fd = cache.pop(file, None) if reopen else cache.get(file)
            if reopen and fd is not None:
                os.close(fd)
                fd = None
            if fd is None:
                fd = cache[file] = os.open(file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            return fd

    def close(self):
        with self._lock:
            for fd in list(self._fds.values()) + list(self._dfds.values()):
                os.close(fd)
            self._fds.clear()
            self._dfds.clear()

    def _read_run(self, layer, expert, file, offset, nbytes, mvs):
        """Read one contiguous byte range into the buffers ``mvs`` (in file order) with one ``preadv``; on a short
        read or an error the file is reopened once (it may have been replaced) before the read fails."""
        for attempt in (0, 1):
            try:
                fd = self._fd(file, reopen=attempt == 1)
            except OSError as e:
                raise ExpertReadError(layer, expert, f"cannot read expert {expert} of layer {layer}: {file}: "
                                      f"{e.strerror}") from None
            try:
                got = os.preadv(fd, mvs, offset)
                while 0 < got < nbytes:        # rare: finish a short read buffer by buffer
                    n = self._finish_short(fd, mvs, offset, got)
                    if n <= 0:
                        break
                    got += n
                if got == nbytes:
                    if self.drop_cache:
                        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
                    return
                size = os.fstat(fd).st_size
            except OSError as e:
                if attempt:
                    raise ExpertReadError(layer, expert, f"cannot read expert {expert} of layer {layer}: {file}: "
                                          f"{e.strerror}") from None
                continue
            if attempt:
                raise ExpertReadError(
                    layer, expert, f"cannot read expert {expert} of layer {layer}: {file} is truncated "
                    f"(needs bytes {offset}..{offset + nbytes}, file has {size})")

    @staticmethod
    def _finish_short(fd, mvs, offset, got):
        skip = got
        for mv in mvs:
            if skip >= len(mv):
                skip -= len(mv)
                continue
            return os.preadv(fd, [mv[skip:]], offset + got)
        return 0

    def read_raw(self, layer: int, expert: int, bufs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The bytes of every range of the expert (``ranges``: matrices, then scales), in their stored dtypes (read
        into ``bufs`` when given, else fresh tensors).

        Extents that are adjacent in the file (an expert's gate/up/down usually are) are read with one ``preadv``
        and dropped from the page cache with one ``posix_fadvise``: few system calls, so few GIL hand-offs."""
        t0 = time.perf_counter()
        exts = self.ranges[(layer, expert)]
        out, seen, total = [], {}, 0
        for i, x in enumerate(exts):
            out.append(bufs[i] if bufs is not None else torch.empty(x.slab_shape or x.shape, dtype=x.dtype))
        todo = []
        for i, x in enumerate(exts):
            k = (x.file, x.offset, x.nbytes)
            if k in seen:                 # the same slab twice (gpt-oss gate and up): read once, copied below
                continue
            seen[k] = i
            todo.append((x.file, x.offset, x.nbytes, memoryview(out[i].view(torch.uint8).numpy()).cast("B")))
        todo.sort(key=lambda r: (r[0], r[1]))
        run = None
        for f, off, nb, mv in todo:
            if run is not None and run[0] == f and run[1] + run[2] == off:
                run[2] += nb
                run[3].append(mv)
                continue
            if run is not None:
                self._read_run(layer, expert, *run)
            run = [f, off, nb, [mv]]
        if run is not None:
            self._read_run(layer, expert, *run)
        for i, x in enumerate(exts):
            j = seen[(x.file, x.offset, x.nbytes)]
            if j != i:
                out[i].view(torch.uint8).copy_(out[j].view(torch.uint8))
            else:
                total += x.nbytes
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += total
            self.read_seconds += dt
            self.reads += 1
        return out

    def gbps(self) -> float:
        """Bytes per second of wall time spent inside reads, summed over threads (per-thread throughput × threads
        when reads overlap, so this is a lower bound on aggregate bandwidth)."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0


def sequential_read_gbps(path: str, block: int = 8 << 20, limit: int | None = None) -> float:
    """The disk's own bandwidth: a plain sequential read of ``path`` with the page cache dropped before/after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if limit is None else min(limit, os.fstat(fd).st_size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(block)
        mv = memoryview(buf)
        t0 = time.perf_counter()
        off = 0
        while off < size:
            n = os.preadv(fd, [mv[:min(block, size - off)]], off)
            if n <= 0:
                break
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            off += n
        dt = time.perf_counter() - t0
        return off / dt / 1e9
    finally:
        os.close(fd)
