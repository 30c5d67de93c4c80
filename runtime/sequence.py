"""State of one request through its life: waiting → running (prefill, then decode) → finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SampleResult, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...] = ()
    arrival: int = 0
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleResult] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)   # per prompt position: None first, then SampleResult
    num_computed: int = 0            # tokens whose K/V are in the cache
    slot: int | None = None          # KV cache slot while running
    text: str = ""
    detok: object = None             # runtime.detok.IncrementalDetokenizer once the first token is out
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    last_scheduled: int = -1        # engine step that last ran this sequence (fairness)

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (the prompt remainder, or the last sampled token)."""
        return len(self) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
