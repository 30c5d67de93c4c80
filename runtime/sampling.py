"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seed).

Shapes: B sequences in the batch, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..moe.errors import MoeyardError


class RequestError(MoeyardError):
    """A request's parameters or prompt cannot be served; ``param`` names the parameter when one is at fault."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None    # number of top alternatives to return per token (0: only the chosen one)
    include_stop_str_in_output: bool = False
    # OpenAI's penalties: logit -= presence * (count > 0) + frequency * count, over the tokens generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] | dict | None = None   # token id -> added to its logit, [-100, 100]
    prompt_logprobs: int | None = None   # logprobs of the prompt's tokens too (top alternatives per position)

    def __post_init__(self):
        def bad(msg):
            raise RequestError(msg, param=msg.split(" ", 1)[0])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if isinstance(self.seed, bool) or (self.seed is not None and (not isinstance(self.seed, int) or
                                                                     not -(2 ** 63) <= self.seed < 2 ** 63)):
            bad(f"seed must be an integer in [-2^63, 2^63), got {self.seed!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer between 0 and 20, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be a number between -2 and 2, got {v!r}")
        lb = self.logit_bias
        if lb is not None:
            items = list(lb.items()) if isinstance(lb, dict) else list(lb)
            out = []
            for k, v in items:
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    bad(f"logit_bias keys must be token ids, got {k!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    bad(f"logit_bias values must be numbers between -100 and 100, got {v!r} for token {k}")
                out.append((tid, float(v)))
            object.__setattr__(self, "logit_bias", tuple(out) or None)
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or
                                                 not 0 <= self.prompt_logprobs <= 20):
            bad(f"prompt_logprobs must be an integer between 0 and 20, got {self.prompt_logprobs!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            bad("stop must be a string or a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def apply_penalties(logits_BV: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """Presence/frequency penalties over each row's generated tokens and the logit bias (OpenAI's definitions),
    applied to the rows that ask for them; returns float32 logits (a copy when any row changes)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits_BV
    out = logits_BV.float().clone()
    V = out.shape[-1]
    for i in rows:
        p = params[i]
        if (p.presence_penalty or p.frequency_penalty) and outputs[i]:
            ids = torch.tensor(outputs[i], dtype=torch.long, device=out.device)
            counts = torch.bincount(ids, minlength=V)[:V].to(out.dtype)
            out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
        for tid, b in p.logit_bias or ():
            if 0 <= tid < V:
                out[i, tid] += b
    return out


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list) -> list[SampleResult]:
    """One token per row. Greedy rows take the argmax; others sample from the filtered distribution."""
    logits_BV = logits_BV.float()
    out: list[SampleResult] = []
    greedy_ids = torch.argmax(logits_BV, dim=-1).tolist()
    need_lp = any(p.logprobs is not None for p in params)
    logp_BV = torch.log_softmax(logits_BV, dim=-1) if need_lp else None
    for i, p in enumerate(params):
        if p.greedy:
            tok = greedy_ids[i]
        else:
            row = logits_BV[i] / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_l, idx = torch.sort(row, descending=True)
                cum = torch.softmax(sorted_l, -1).cumsum(-1)
                drop = cum - torch.softmax(sorted_l, -1) >= p.top_p   # keep the smallest prefix reaching top_p
                row = row.clone()
                row[idx[drop]] = float("-inf")
            probs = torch.softmax(row, -1)
            tok = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        r = SampleResult(tok)
        if p.logprobs is not None:
            r.logprob = float(logp_BV[i, tok])
            if p.logprobs:
                v, ix = torch.topk(logp_BV[i], p.logprobs)
                r.top = list(zip(ix.tolist(), v.tolist()))
        out.append(r)
    return out
