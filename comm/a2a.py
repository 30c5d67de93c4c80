"""All-to-all token exchange between expert-parallel workers, and the dispatcher built on it.

Glossary
  G workers (ranks), rank this worker, N tokens here, K top-k, M = N*K routed (token, choice) rows, D hidden.
  exchange   send each row of some tensors to the rank named by ``dest`` (uneven splits); split sizes are
             exchanged first (one tiny all-to-all), then one ``all_to_all_single`` per tensor.
  reverse    send rows back along a previous exchange (split sizes known: no size exchange).

Every byte handed to a collective that crosses workers is counted (a worker's rows to itself are not), by kind:
``moe`` (token rows and their expert ids / gate weights), ``kv`` (KV-cache replication), ``hidden`` (residual
streams and final hidden states that move with a token), ``meta`` (split sizes, token bookkeeping), ``shuffle``
(KV caches of sequences moved between workers by speculative shuffling, with their slot/position rows; with
tensor-parallel attention, the head-output scatter and residual all-gather that replace the all-reduce), ``tp``
(tensor-parallel attention without shuffling: head-output and residual all-gathers).

Works with any c10d process group object (gloo on CPU, nccl on GPU); no default process group is needed, so
several workers can live in one process (threads) for tests.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..moe.dispatch import DispatchMeta, LocalDispatcher, Routed

KINDS = ("moe", "kv", "hidden", "meta", "shuffle", "tp")


class CollectiveError(RuntimeError):
    """A collective failed or timed out (usually: a peer worker died)."""


def make_group(init_method: str, rank: int, world: int, backend: str = "gloo", timeout_s: float = 30.0):
    """A process group of ``world`` ranks met at ``init_method`` ("tcp://host:port" with rank 0 listening, or
    "file:///path")."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method.startswith("tcp://"):
        host, port = init_method[len("tcp://"):].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
    elif init_method.startswith("file://"):
        store = dist.FileStore(init_method[len("file://"):], world)
        store.set_timeout(timeout)
    else:
        raise ValueError(f"init_method must be tcp://host:port or file:///path, got {init_method!r}")
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"backend must be gloo or nccl, got {backend!r}")


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
        self.local_assign = 0
        self.total_assign = 0

    def stats(self) -> dict:
        d = {f"{k}_bytes": v for k, v in self.bytes.items()}
        d.update(a2a_bytes=sum(self.bytes.values()), a2a_calls=self.calls, local_assignments=self.local_assign,
                 total_assignments=self.total_assign)
        return d

    # -- primitive ---------------------------------------------------------------------------------------------
    def a2a(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], kind: str) -> torch.Tensor:
        """Rows ``send[sum(send_counts[:j]) : ...]`` go to rank j; returns the rows received, by source rank."""
        back_to_cpu = self.device.type == "cuda" and send.device.type == "cpu"   # NCCL needs device tensors
        send = (send.to(self.device) if back_to_cpu else send).contiguous()
        row_shape = tuple(send.shape[1:])
        width = 1
        for s in row_shape:
            width *= s
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
        return out.cpu() if back_to_cpu else out

    def counts(self, send_counts: list[int]) -> list[int]:
        t = torch.tensor(send_counts, dtype=torch.int64)
        ones = [1] * self.world
        return self.a2a(t, ones, ones, "meta").tolist()

    # -- row exchange ------------------------------------------------------------------------------------------
    def exchange(self, dest_n: torch.Tensor, tensors: list[torch.Tensor], kinds: list[str]
                 ) -> tuple[list[torch.Tensor], Plan]:
        """Send row i of every tensor to rank ``dest_n[i]``. Received rows are ordered by source rank, and within
        a source in the sender's order."""
        dest_n = dest_n.to("cpu", torch.long)
        order = torch.argsort(dest_n, stable=True)
        send_counts = torch.bincount(dest_n, minlength=self.world).tolist()
        recv_counts = self.counts(send_counts)
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


def dest_table(holders: list[list[tuple[int, ...]]], rank: int, world: int) -> list[torch.Tensor]:
    """Per placement layer, [E] rank serving each expert for tokens on ``rank``: itself if it holds a copy, else
    the first holder."""
    out = []
    for row in holders:
        out.append(torch.tensor([rank if rank in ws else ws[0] for ws in row], dtype=torch.long))
    return out


class A2ADispatcher(LocalDispatcher):
    """Expert-parallel dispatcher: rows go to the worker holding their expert and come back for ``combine``.

    ``layer_index`` maps a model layer to its placement row (MoE layers only, in order)."""

    def __init__(self, ex: Exchanger, holders: list[list[tuple[int, ...]]], layer_index: dict[int, int]):
        self.ex = ex
        self.dest = dest_table(holders, ex.rank, ex.world)
        self.layer_index = layer_index

    def dispatch(self, layer: int, x_ND, topk_ids_NK, topk_w_NK) -> Routed:
        local = super().dispatch(layer, x_ND, topk_ids_NK, topk_w_NK)
        dev = x_ND.device
        e_M = torch.repeat_interleave(torch.tensor(local.expert_ids, dtype=torch.long),
                                      torch.tensor(local.counts, dtype=torch.long))
        dest_M = self.dest[self.layer_index[layer]][e_M]
        self.ex.local_assign += int((dest_M == self.ex.rank).sum())
        self.ex.total_assign += int(dest_M.numel())
        (x_R, e_R), plan = self.ex.exchange(dest_M, [local.x_MD, e_M.to(dev)], ["moe", "moe"])
        perm = torch.argsort(e_R, stable=True)
        ids, counts = torch.unique_consecutive(e_R[perm], return_counts=True)
        meta = DispatchMeta(local.meta.order_M, local.meta.token_M, local.meta.weight_M, local.meta.num_tokens,
                            extra=(plan, perm, local.meta))
        return Routed(x_R[perm], ids.tolist(), counts.tolist(), meta)

    def combine(self, y_MD, meta: DispatchMeta):
        plan, perm, local_meta = meta.extra
        y_R = torch.empty_like(y_MD)
        y_R[perm] = y_MD
        (y_M,) = self.ex.reverse(plan, [y_R], ["moe"])
        return super().combine(y_M, local_meta)
