"""Estimate all-to-all traffic and time per decode step for a placement.

Glossary
  message     one token's hidden state (hidden_size x bytes_per_elem bytes) sent to an expert's worker
              (dispatch) and back (combine): 2 messages per token per layer per top-k slot
  local       the expert sits on the worker the token already is on (no bytes move)
  rates       local / intra-node / inter-node fractions come from the placement scored on a trace
              (cross_rate, inter_node_rate), or from a measured local fraction, in which case remote
              traffic is assumed uniform over the other workers
  bandwidth   intra_gbps / inter_gbps are GB/s per worker; all workers send in parallel, and the intra-
              and inter-node phases are counted one after the other (no overlap; conservative)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PlacementError
from .evaluate import evaluate
from .placement import Placement
from .trace import Trace


@dataclass(frozen=True)
class SimResult:
    """Per decode step: bytes moved within / across nodes and the time they take (seconds)."""

    workers: int
    nodes: int
    local_fraction: float
    inter_node_fraction: float
    bytes_intra: float
    bytes_inter: float
    seconds_intra: float
    seconds_inter: float

    @property
    def bytes_total(self) -> float:
        return self.bytes_intra + self.bytes_inter

    @property
    def seconds(self) -> float:
        return self.seconds_intra + self.seconds_inter


def simulate(trace: Trace | None, placement: Placement | None, workers: int, nodes: int, intra_gbps: float,
             inter_gbps: float, hidden_size: int = 4096, bytes_per_elem: int = 2, tokens_per_step: int = 256,
             *, local_fraction: float | None = None, num_layers: int | None = None,
             top_k: int | None = None) -> SimResult:
    """All-to-all bytes and time per decode step.

    Either (trace, placement) to derive the rates, or ``local_fraction`` (measured) with
    ``num_layers`` and ``top_k`` (taken from the trace/placement when given).
    """
    if workers < 1 or nodes < 1 or workers % nodes:
        raise PlacementError(f"nodes ({nodes}) must divide workers ({workers})")
    if intra_gbps <= 0 or inter_gbps <= 0:
        raise PlacementError("bandwidths must be positive GB/s")
    if local_fraction is None:
        if trace is None or placement is None:
            raise PlacementError("simulate needs a trace and a placement, or a measured local_fraction")
        if placement.num_workers != workers:
            raise PlacementError(f"placement is for {placement.num_workers} workers, simulate asked for {workers}; "
                                 "pass a measured local_fraction to extrapolate to other sizes")
        m = evaluate(placement, trace, nodes=nodes)
        local, inter = 1.0 - m.cross_rate, m.inter_node_rate
        num_layers, top_k = trace.num_layers, trace.top_k
    else:
        if not 0.0 <= local_fraction <= 1.0:
            raise PlacementError(f"local_fraction must be in [0, 1], got {local_fraction}")
        if trace is not None:
            num_layers, top_k = trace.num_layers, trace.top_k
        if num_layers is None or top_k is None:
            raise PlacementError("with a measured local_fraction give num_layers and top_k (or a trace)")
        local = local_fraction
        other_nodes = (workers - workers // nodes) / max(1, workers - 1)
        inter = (1.0 - local) * other_nodes
    msg = float(hidden_size) * bytes_per_elem
    messages = 2.0 * tokens_per_step * num_layers * top_k
    b_inter = messages * inter * msg
    b_intra = messages * max(0.0, 1.0 - local - inter) * msg
    return SimResult(workers, nodes, local, inter, b_intra, b_inter,
                     b_intra / (workers * intra_gbps * 1e9), b_inter / (workers * inter_gbps * 1e9))
