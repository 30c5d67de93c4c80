"""Storage tier: one expert's bytes read straight from the checkpoint's safetensors files.

Every expert matrix (per-expert tensors or one expert's slice of a fused ``[E, ...]`` tensor) is a contiguous byte
range. ``DiskTier.read_into`` reads the three ranges with ``os.pread`` and drops them from the page cache
afterwards (``posix_fadvise(DONTNEED)``) so the OS cannot hide the storage cost; the bytes land in a host buffer
(pinned when CUDA is present) and are converted/copied into the caller's slot tensors.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from ..moe.checkpoint import CheckpointReader
from ..moe.config import MoEConfig
from ..moe.errors import CheckpointError
from ..moe.weights import expert_refs

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
    slab_shape: tuple[int, ...] | None = None  # gpt-oss: the expert's whole slab is read, then sliced
    cols: tuple[int, int, int] | None = None
    transpose: bool = False

    @property
    def direct(self) -> bool:
        return self.slab_shape is None

    def finish(self, t: torch.Tensor) -> torch.Tensor:
        """The matrix from the bytes read (a strided slice and transpose for slab reads)."""
        if self.direct:
            return t
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


class DiskTier:
    """Reads experts from disk; counts bytes and seconds (achieved read bandwidth)."""

    def __init__(self, cfg: MoEConfig, reader: CheckpointReader, drop_cache: bool = True):
        self.cfg = cfg
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        self.extents = {(l, e): expert_extents(cfg, reader, l, e)
                        for l in cfg.moe_layers for e in range(cfg.num_experts)}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.reads = 0

    def expert_nbytes(self) -> int:
        return sum(x.nbytes for x in next(iter(self.extents.values())))

    def read(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's matrices (and biases) in the checkpoint dtype, slab reads sliced to their final shape."""
        exts = self.extents[(layer, expert)]
        bufs = [torch.empty(x.slab_shape or x.shape, dtype=x.dtype) for x in exts]
        return [x.finish(t) for x, t in zip(exts, self.read_raw(layer, expert, bufs))]

    def read_raw(self, layer: int, expert: int, bufs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The three matrices in the checkpoint dtype (read into ``bufs`` when given, else fresh tensors)."""
        t0 = time.perf_counter()
        out, total, seen = [], 0, {}
        for i, x in enumerate(self.extents[(layer, expert)]):
            t = bufs[i] if bufs is not None else torch.empty(x.slab_shape or x.shape, dtype=x.dtype)
            if (x.file, x.offset, x.nbytes) in seen:      # the same slab twice (gpt-oss gate and up): read once
                t.view(torch.uint8).copy_(seen[(x.file, x.offset, x.nbytes)].view(torch.uint8))
                out.append(t)
                continue
            seen[(x.file, x.offset, x.nbytes)] = t
            mv = memoryview(t.view(torch.uint8).numpy()).cast("B")
            try:
                fd = os.open(x.file, os.O_RDONLY)
            except OSError as e:
                raise ExpertReadError(layer, expert, f"cannot read expert {expert} of layer {layer}: {x.file}: "
                                      f"{e.strerror}") from None
            try:
                got = 0
                while got < x.nbytes:
                    n = os.preadv(fd, [mv[got:x.nbytes]], x.offset + got)
                    if n <= 0:
                        raise ExpertReadError(
                            layer, expert, f"cannot read expert {expert} of layer {layer}: {x.file} is truncated "
                            f"(needs bytes {x.offset}..{x.offset + x.nbytes}, file has "
                            f"{os.fstat(fd).st_size})")
                    got += n
                if self.drop_cache:
                    os.posix_fadvise(fd, x.offset, x.nbytes, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                raise ExpertReadError(layer, expert, f"cannot read expert {expert} of layer {layer}: {x.file}: "
                                      f"{e.strerror}") from None
            finally:
                os.close(fd)
            total += x.nbytes
            out.append(t)
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
