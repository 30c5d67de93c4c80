"""Lazy reading of a Hugging Face checkpoint directory.

A checkpoint is ``config.json`` plus one ``model.safetensors`` or many shards listed in
``model.safetensors.index.json``. Tensors are read on demand through safetensors' memory map, so asking for one
expert's weights touches only that expert's bytes on disk.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack

import torch
from safetensors import safe_open

from .errors import CheckpointError

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_BYTES = {k: t.itemsize for k, t in _TORCH_DTYPES.items()}
ST_DTYPE_OF = {t: k for k, t in _TORCH_DTYPES.items()}      # torch dtype -> safetensors' name (writers)


def _read_header(path: str) -> dict:
    """Parse and check a safetensors header without reading tensor data; raises CheckpointError naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    data_len = size - 8 - n
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} but only {data_len} data "
                "bytes are present")
    return header


def _inside(fn: str) -> bool:
    """``fn`` (a file name from the index) stays inside the model directory: relative, no ``..`` component."""
    if not fn or os.path.isabs(fn) or "\\" in fn or "\0" in fn:
        return False
    norm = os.path.normpath(fn)
    return not (norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm))


class CheckpointReader:
    """Tensor names → files of one checkpoint directory; ``get(name)`` reads one tensor lazily."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
            for name, fn in weight_map.items():
                if not _inside(fn):
                    raise CheckpointError(f"{index}: tensor {name!r} points to {fn!r}, outside the model directory "
                                          "(file names in the index must be relative, without '..')")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"no *.safetensors files in model directory {path}")
        self._meta: dict[str, tuple[str, dict]] = {}
        for fn in files:
            fp = os.path.join(path, fn)
            if not os.path.isfile(fp):
                raise CheckpointError(f"{fp}: listed in the index but missing")
            for name, info in _read_header(fp).items():
                self._meta[name] = (fp, info)
        if weight_map is not None:
            for name, fn in weight_map.items():
                if name not in self._meta:
                    raise CheckpointError(f"tensor {name!r} is listed in the index for {fn} but not stored there")
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def file_of(self, name: str) -> str:
        return self._meta[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name][1]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of ``name`` ("BF16", "F8_E4M3", "U8", …)."""
        return self._meta[name][1]["dtype"]

    def slice(self, name: str):
        """safetensors' lazy slice of ``name``: indexing it reads only the bytes asked for."""
        return self._handle(self.file_of(name)).get_slice(name)

    def nbytes(self, name: str) -> int:
        s, e = self._meta[name][1]["data_offsets"]
        return e - s

    def data_location(self, name: str) -> tuple[str, int, int, str]:
        """(file, absolute byte offset, nbytes, safetensors dtype) — used by tiers that read bytes directly."""
        fp, info = self._meta[name]
        hdr = self._header_len(fp)
        s, e = info["data_offsets"]
        return fp, 8 + hdr + s, e - s, info["dtype"]

    _hdr_cache: dict = {}

    def _header_len(self, fp: str) -> int:
        if fp not in self._hdr_cache:
            with open(fp, "rb") as f:
                self._hdr_cache[fp] = struct.unpack("<Q", f.read(8))[0]
        return self._hdr_cache[fp]

    def _handle(self, fp: str):
        h = self._handles.get(fp)
        if h is None:
            try:
                h = self._stack.enter_context(safe_open(fp, framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{fp}: cannot open safetensors file ({e})") from None
            self._handles[fp] = h
        return h

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor ``name``; check it has ``shape`` when given. Errors name the tensor, file and shapes."""
        if name not in self._meta:
            raise CheckpointError(f"tensor {name!r} not found in checkpoint {self.path}")
        got_shape = self.shape(name)
        if shape is not None and tuple(shape) != got_shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(got_shape)} but the config implies {list(shape)} "
                                  f"({self.file_of(name)})")
        # a plain read into a tensor of our own, not through safetensors' mmap, whose touched pages stay resident
        # (counted in the process's RSS) while the file is open: a bf16 checkpoint's peak RSS above the baseline
        # went from 1.92x to 1.20x the weights (benchmarks/bench_speed.py, AVX2 host)
        fp, off, n, dt = self.data_location(name)
        if dt not in _TORCH_DTYPES:
            raise CheckpointError(f"{fp}: tensor {name!r} has dtype {dt}, not one of {', '.join(_TORCH_DTYPES)}")
        out = torch.empty(n, dtype=torch.uint8)
        try:
            with open(fp, "rb", buffering=0) as f:
                f.seek(off)
                got = f.readinto(memoryview(out.numpy()))
        except OSError as e:
            raise CheckpointError(f"{fp}: cannot read tensor {name!r} ({e})") from None
        if got != n:
            raise CheckpointError(f"{fp}: tensor {name!r} is truncated ({got} of {n} bytes)")
        return out.view(_TORCH_DTYPES[dt]).reshape(got_shape)

    def close(self):
        self._stack.close()
        self._handles.clear()
