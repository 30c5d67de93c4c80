"""Row exchanges between expert-parallel workers over a process group passed in, with byte counters.

Glossary
  G workers (ranks), rank this worker, N rows here.
  exchange    send each row of some tensors to the rank named by ``dest`` (uneven splits); split sizes are
              exchanged first (one tiny all-to-all, shared by the exchanges of ``exchange_many``; none when the
              receiver knows them), then one ``all_to_all_single`` per tensor.
  reverse     send rows back along a previous exchange (split sizes known: no size exchange).
  all-gather  every worker's rows to every other worker (``all_gather_rows``), as uneven exchanges.

Every byte handed to a collective that crosses workers is counted (a worker's rows to itself are not), by kind:
``moe`` (token rows and their expert ids / gate weights), ``kv`` (KV-cache replication), ``hidden`` (residual
streams and final hidden states that move with a token), ``meta`` (split sizes, token bookkeeping), ``shuffle``
(KV caches of sequences moved between workers by speculative shuffling, with their slot/position rows; with
tensor-parallel attention, the head-output scatter and residual all-gather that replace the all-reduce), ``tp``
(tensor-parallel attention without shuffling: head-output and residual all-gathers).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .group import CollectiveError

KINDS = ("moe", "kv", "hidden", "meta", "shuffle", "tp")
INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
INT_BYTES = 4          # an integer on the wire (int32)


@dataclass(frozen=True)
class Plan:
    """How rows were exchanged: ``order`` sorted the sender's rows by destination."""
    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]


class Exchanger:
    def __init__(self, pg, rank: int, world: int, timeout_s: float = 30.0, device=None):
        self.pg, self.rank, self.world = pg, rank, world
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.bytes = {k: 0 for k in KINDS}
        self.calls = 0
        self.local_assign = 0     # (token, expert) pairs served on the token's worker
        self.total_assign = 0

    def count_pairs(self, local: int, total: int):
        self.local_assign += local
        self.total_assign += total

    def stats(self) -> dict:
        d = {f"{k}_bytes": v for k, v in self.bytes.items()}
        d.update(a2a_bytes=sum(self.bytes.values()), a2a_calls=self.calls, local_assignments=self.local_assign,
                 total_assignments=self.total_assign)
        return d

    # -- primitive ---------------------------------------------------------------------------------------------
    def a2a(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], kind: str) -> torch.Tensor:
        """Rows ``send[sum(send_counts[:j]) : ...]`` go to rank j; returns the rows received, by source rank.
        Integer payloads (ids, slots, positions, keys, split sizes) travel as int32 and come back as int64."""
        wide = send.dtype == torch.int64
        if wide:
            if send.numel() and not (INT32_MIN <= int(send.min()) and int(send.max()) <= INT32_MAX):
                raise ValueError(f"exchange of {kind!r} rows: integer payload outside int32 "
                                 f"[{int(send.min())}, {int(send.max())}]")
            send = send.to(torch.int32)
        back_to_cpu = self.device.type == "cuda" and send.device.type == "cpu"   # NCCL needs device tensors
        send = (send.to(self.device) if back_to_cpu else send).contiguous()
        row_shape = tuple(send.shape[1:])
        width = math.prod(row_shape)
        out = send.new_empty((sum(recv_counts),) + row_shape)
        self.bytes[kind] += (sum(send_counts) - send_counts[self.rank]) * width * send.element_size()
        self.calls += 1
        try:
            work = self.pg.alltoall_base(out.view(-1), send.view(-1), [c * width for c in recv_counts],
                                         [c * width for c in send_counts], dist.AllToAllOptions())
            work.wait(self.timeout)
        except Exception as exc:  # noqa: BLE001 — gloo raises RuntimeError subclasses of several kinds
            raise CollectiveError(f"all-to-all between expert-parallel workers failed on rank {self.rank} "
                                  f"(a peer worker may have died): {exc}") from exc
        out = out.cpu() if back_to_cpu else out
        return out.long() if wide else out

    # -- row exchange ------------------------------------------------------------------------------------------
    def exchange_many(self, groups: list[tuple[torch.Tensor, list[torch.Tensor], list[str]]]
                      ) -> list[tuple[list[torch.Tensor], Plan]]:
        """Several exchanges ``(dest_n, tensors, kinds)`` at once: their split sizes travel in one message."""
        dests = [d.to("cpu", torch.long) for d, _, _ in groups]
        sends = [torch.bincount(d, minlength=self.world) for d in dests]
        ones = [1] * self.world
        recv = self.a2a(torch.stack(sends, 1), ones, ones, "meta")                # [G, groups]: sizes by source
        return [self._send(d, ts, ks, s.tolist(), recv[:, i].tolist())
                for i, (d, (_, ts, ks), s) in enumerate(zip(dests, groups, sends))]

    def exchange(self, dest_n: torch.Tensor, tensors: list[torch.Tensor], kinds: list[str],
                 recv_counts: list[int] | None = None) -> tuple[list[torch.Tensor], Plan]:
        """Send row i of every tensor to rank ``dest_n[i]``. Received rows are ordered by source rank, and within
        a source in the sender's order. ``recv_counts``: the rows coming from each rank, when the receiver knows
        them (no split-size message)."""
        if recv_counts is None:
            return self.exchange_many([(dest_n, tensors, kinds)])[0]
        dest_n = dest_n.to("cpu", torch.long)
        return self._send(dest_n, tensors, kinds, torch.bincount(dest_n, minlength=self.world).tolist(),
                          recv_counts)

    def _send(self, dest_n, tensors, kinds, send_counts, recv_counts):
        order = torch.argsort(dest_n, stable=True)
        out = [self.a2a(t[order.to(t.device)], send_counts, recv_counts, k) for t, k in zip(tensors, kinds)]
        return out, Plan(order, send_counts, recv_counts)

    def reverse(self, plan: Plan, tensors: list[torch.Tensor], kinds: list[str]) -> list[torch.Tensor]:
        """Send received rows back to where they came from, in the sender's original row order."""
        res = []
        for t, k in zip(tensors, kinds):
            back = self.a2a(t, plan.recv_counts, plan.send_counts, k)
            out = torch.empty_like(back)
            out[plan.order.to(back.device)] = back
            res.append(out)
        return res

    def all_gather_rows(self, tensors: list[torch.Tensor], kinds: list[str], counts: list[int] | None = None
                        ) -> tuple[list[torch.Tensor], Plan]:
        """Every worker's rows of ``tensors`` to every other worker. Returns, per tensor, the rows of every
        *other* worker by source rank (``plan.recv_counts`` rows each; nothing from this rank). ``counts``: every
        rank's row count, when every worker knows it."""
        n = tensors[0].shape[0] if tensors else 0
        others = [g for g in range(self.world) if g != self.rank]
        dest = torch.tensor(others, dtype=torch.long).repeat_interleave(n)
        recv = None if counts is None else [0 if g == self.rank else c for g, c in enumerate(counts)]
        return self.exchange(dest, [t.repeat(len(others), *([1] * (t.dim() - 1))) for t in tensors], kinds, recv)

    def all_gather_blocks(self, rows: torch.Tensor, kind: str, counts: list[int] | None = None
                          ) -> list[torch.Tensor]:
        """``all_gather_rows`` of one tensor as the list of blocks by rank, this worker's own block included."""
        (got,), plan = self.all_gather_rows([rows], [kind], counts)
        blocks = list(torch.split(got, plan.recv_counts))
        blocks[self.rank] = rows
        return blocks
