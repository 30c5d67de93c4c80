"""Writing a modified copy of a checkpoint (``moeyard inflate``, ``moeyard quantize``): the destination check,
safetensors shards written as tensors come (so a checkpoint larger than memory can be written), and the rest of the
directory (config.json with changes, tokenizer and other files) copied."""

from __future__ import annotations

import json
import os
import shutil
import struct

import torch
from safetensors.torch import save_file

from .checkpoint import ST_DTYPE_OF
from .errors import ModelError


def check_destination(what: str, src: str, dst: str):
    """DST must not be SRC or inside it, and must not exist or be an empty directory."""
    src_r, dst_r = os.path.realpath(src), os.path.realpath(dst)
    if dst_r == src_r or dst_r.startswith(src_r + os.sep):
        raise ModelError(f"{what}: destination {dst} is inside the source {src}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ModelError(f"{what}: destination {dst} exists and is not an empty directory")


class ShardWriter:
    """Writes tensors into safetensors shards of about ``shard_bytes`` as they come; ``close()`` names the shards
    and writes the index when there is more than one."""

    def __init__(self, dst: str, shard_bytes: int):
        self.dst, self.shard_bytes = dst, shard_bytes
        self.cur: list[tuple[str, torch.Tensor]] = []
        self.size = 0
        self.names: list[list[str]] = []

    def add(self, name: str, t: torch.Tensor):
        self.add_group([(name, t)])

    def add_group(self, items: list[tuple[str, torch.Tensor]]):
        """Tensors that stay in one shard."""
        nb = sum(t.numel() * t.element_size() for _, t in items)
        if self.cur and self.size + nb > self.shard_bytes:
            self._flush()
        self.cur += [(n, t.contiguous()) for n, t in items]
        self.size += nb

    def _path(self) -> str:
        return os.path.join(self.dst, f".shard-{len(self.names)}.tmp")

    def _write(self, path: str):
        save_file(dict(self.cur), path, metadata={"format": "pt"})

    def _flush(self):
        self._write(self._path())
        self.names.append([n for n, _ in self.cur])
        self.cur, self.size = [], 0

    def close(self) -> int:
        """Total bytes written."""
        self._flush()
        n = len(self.names)
        files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, fn in enumerate(files):
            os.replace(os.path.join(self.dst, f".shard-{k}.tmp"), os.path.join(self.dst, fn))
        if n > 1:
            wm = {t: files[k] for k, names in enumerate(self.names) for t in names}
            with open(os.path.join(self.dst, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": wm}, f, indent=1)
        return sum(os.path.getsize(os.path.join(self.dst, fn)) for fn in files)


class OrderedShards(ShardWriter):
    """A ``ShardWriter`` whose tensors lie in the order they were added (not safetensors' dtype-then-name order),
    so a group (an expert's tensors) is one contiguous run in its file."""

    def _write(self, path: str):
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for name, t in self.cur:
            nb = t.numel() * t.element_size()
            header[name] = {"dtype": ST_DTYPE_OF[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + nb]}
            at += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, t in self.cur:
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def finish_copy(src: str, dst: str, config_changes: dict):
    """DST's config.json (SRC's with ``config_changes``) and every other non-weight file of SRC."""
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    d.update(config_changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors") or fn in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, fn)):
            shutil.copy(os.path.join(src, fn), os.path.join(dst, fn))
