"""Continuous batching: pick the sequences of the next step, admit waiting requests as slots free up.

Pure Python (no tensors). Policy: prefill first (admit waiting requests and run their prompts, chunked to the
token budget), otherwise one decode step over every running sequence. A ``batch_policy`` may choose which
running sequences decode together when more run than fit in one decode batch (offload's expert grouping).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .sequence import Sequence, Status


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    num_tokens: int      # tokens of this sequence run in this step

    @property
    def completes(self) -> bool:
        """True when this step reaches the sequence's last known token, so its logits are sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_decode_batch: int | None = None,
                 allocate: Callable[[], int | None] = None, free: Callable[[int], None] = None):
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_decode_batch = max_decode_batch or max_num_seqs
        self.allocate, self.free = allocate, free
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.batch_policy = None   # callable(running: list[Sequence], limit: int) -> list[Sequence]

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        # 1. Admit waiting requests while slots are free.
        while self.waiting and len(self.running) < self.max_num_seqs:
            slot = self.allocate()
            if slot is None:
                break
            seq = self.waiting.popleft()
            seq.slot, seq.status = slot, Status.RUNNING
            self.running.append(seq)
        # 2. Prefill: sequences with prompt tokens still to run, within the token budget.
        budget, out = self.max_tokens, []
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                n = min(seq.num_pending, budget)
                out.append(Scheduled(seq, n))
                budget -= n
        if out:
            return out
        # 3. Decode: every running sequence (or the policy's pick when more run than one batch holds).
        runnable = [s for s in self.running if not s.finished]
        if len(runnable) > self.max_decode_batch:
            if self.batch_policy is not None:
                runnable = self.batch_policy(runnable, self.max_decode_batch)
            else:
                runnable = sorted(runnable, key=lambda s: s.last_scheduled)[:self.max_decode_batch]
        return [Scheduled(s, s.num_pending) for s in runnable]

    def finish(self, seq: Sequence):
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
            if seq.slot is not None:
                self.free(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None
