"""Executors run one model step for a list of scheduled sequences and return logits; one per mode.

The local executor holds the whole model in this process. Offload and Ray executors keep the same contract:
``execute(items) -> logits [B, V]`` for the items whose step completes their known tokens, ``free(slot)``,
``stats()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe.model import ForwardBatch, MoEForCausalLM
from .kv_cache import KVCache


@dataclass(frozen=True)
class StepItem:
    """One sequence's part of a step: ``token_ids`` start at position ``start`` in slot ``slot``."""
    slot: int
    token_ids: list[int]
    start: int
    sample: bool           # logits wanted for the last token
    request_id: str = ""
    all_logits: bool = False   # logits of every token of the chunk (prompt logprobs; executors with
                               # ``prompt_logits = True`` only): rows in order, the last one sampled when ``sample``


class RequestFailed(Exception):
    """Raised by an executor when some requests of a step cannot proceed; the engine fails only those."""

    def __init__(self, request_ids: list[str], message: str):
        super().__init__(message)
        self.request_ids = request_ids


def build_batch(items: list[StepItem], device, kv) -> tuple[torch.Tensor, ForwardBatch]:
    ids, pos, chunks, start, logit_rows = [], [], [], 0, []
    for it in items:
        n = len(it.token_ids)
        ids.extend(it.token_ids)
        pos.extend(range(it.start, it.start + n))
        chunks.append((start, n, it.start))
        start += n
        if it.all_logits:
            logit_rows.extend(range(start - n, start))
        elif it.sample:
            logit_rows.append(start - 1)
    ids_N = torch.tensor(ids, dtype=torch.long, device=device)
    batch = ForwardBatch(torch.tensor(pos, dtype=torch.long, device=device), chunks, [it.slot for it in items], kv,
                         logits_idx=torch.tensor(logit_rows, dtype=torch.long, device=device))
    return ids_N, batch


class LocalExecutor:
    prompt_logits = True       # honours StepItem.all_logits (so does offload, a subclass)

    def __init__(self, model: MoEForCausalLM, kv: KVCache, device):
        self.model, self.kv, self.device = model, kv, device
        self.route_hooks = []

    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> torch.Tensor:
        self.kv.ensure(max(it.start + len(it.token_ids) for it in items))
        ids_N, batch = build_batch(items, self.device, self.kv)
        batch.route_hooks = self.route_hooks
        return self.model(ids_N, batch)

    def free(self, slot: int):
        pass

    def stats(self) -> dict:
        return {}

    def close(self):
        pass
