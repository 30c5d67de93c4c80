"""Moving expert weights between expert-parallel workers over their process group, and pointing the schemes'
routing tables at a new placement (online rebalancing, ``cluster/rebalance.py``).

An expert travels as its tensors' raw bytes (whatever the worker stores: float tensors, or a compute plan's
packed matrices and scales), so the copy is bit-exact and the receiver rebuilds the same object around them.
Every worker calls ``send_experts`` for the same list of copies (one all-to-all of bytes); bytes to other workers
are counted.

Shapes: G workers; a copy is ``(layer, expert, src, dst)`` with ``layer`` a model layer index.
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib

import torch
import torch.distributed as dist

from .coherent import CoherentMoELayer
from .dispatch import A2ADispatcher, dest_table, hold_table
from .group import CollectiveError


def expert_tensors(obj) -> list[torch.Tensor]:
    """The tensors of an expert object (a dataclass of tensors, nested dataclasses, or None fields), in field
    order."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif dataclasses.is_dataclass(v):
            out.extend(expert_tensors(v))
    return out


def rebuild(template, tensors: list[torch.Tensor]):
    """``template`` with its tensors replaced, in ``expert_tensors`` order, by ``tensors``."""
    it = iter(tensors)

    def walk(obj):
        kw = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = next(it)
            elif dataclasses.is_dataclass(v):
                kw[f.name] = walk(v)
        return dataclasses.replace(obj, **kw)
    return walk(template)


def to_bytes(obj) -> torch.Tensor:
    """An expert's tensors as one uint8 vector (CPU)."""
    return torch.cat([t.detach().contiguous().cpu().view(-1).view(torch.uint8) for t in expert_tensors(obj)])


def from_bytes(template, buf: torch.Tensor, device):
    """An expert shaped like ``template`` whose tensors are read from ``buf`` (as ``to_bytes`` wrote them)."""
    like = expert_tensors(template)
    sizes = [t.numel() * t.element_size() for t in like]
    if sum(sizes) != buf.numel():
        raise ValueError(f"an expert of {buf.numel()} bytes does not match this worker's layout ({sum(sizes)} "
                         f"bytes)")
    parts = torch.split(buf, sizes)
    return rebuild(template, [p.clone().view(t.dtype).view(t.shape).to(device) for p, t in zip(parts, like)])


def checksum(buf: torch.Tensor) -> int:
    return zlib.crc32(buf.numpy())


def send_experts(pg, rank: int, world: int, copies: list[tuple], get, nbytes: int, timeout_s: float = 30.0
                 ) -> tuple[dict, dict]:
    """Copy experts along ``copies`` (``(layer, expert, src, dst)``, the same list on every worker; every expert
    is ``nbytes`` bytes). ``get(layer, expert)`` returns an expert this worker holds. Returns ({(layer, expert):
    uint8 buffer} received here, {(layer, expert): uint8 buffer} this worker sent to others)."""
    send = [[] for _ in range(world)]
    recv = [0] * world
    sent = {}
    for layer, e, src, dst in copies:
        if src == rank and dst != rank:
            if (layer, e) not in sent:
                sent[(layer, e)] = to_bytes(get(layer, e))
            send[dst].append(sent[(layer, e)])
        if dst == rank and src != rank:
            recv[src] += 1
    for bufs in send:
        for b in bufs:
            if b.numel() != nbytes:
                raise ValueError(f"expert of {b.numel()} bytes on rank {rank}, expected {nbytes}")
    flat = torch.cat([b for bufs in send for b in bufs]) if any(send) else torch.empty(0, dtype=torch.uint8)
    out = torch.empty(sum(recv) * nbytes, dtype=torch.uint8)
    try:
        work = pg.alltoall_base(out, flat, [c * nbytes for c in recv], [len(b) * nbytes for b in send],
                                dist.AllToAllOptions())
        work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 — gloo raises RuntimeError subclasses of several kinds
        raise CollectiveError(f"expert move between workers failed on rank {rank}: {exc}") from exc
    got, pos = {}, 0
    for src in range(world):                      # received blocks by source rank, each in the copies' order
        for layer, e, s, dst in copies:
            if s == src and dst == rank and src != rank:
                got[(layer, e)] = out[pos:pos + nbytes]
                pos += nbytes
    return got, sent


def set_placement(model, placement, rank: int, layer_index: dict[int, int], rows: list[int]):
    """Point the routing tables of the standard dispatcher and the coherent scheme's MoE layers at ``placement``
    for placement rows ``rows``."""
    disp = getattr(model, "dispatcher", None)
    if isinstance(disp, A2ADispatcher):
        fresh = dest_table(placement, rank)
        for r in rows:
            disp.dest[r] = fresh[r]
    holds, dests = hold_table(placement), dest_table(placement, rank)
    for i, layer in enumerate(model.model.layers):
        r = layer_index.get(i)
        if r is None or r not in rows:
            continue
        if isinstance(layer, CoherentMoELayer):
            layer.hold_EG, layer.dest_E = holds[r], dests[r]
