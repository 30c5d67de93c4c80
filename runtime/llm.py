"""The public Python API: ``LLM(model, mode=...)``, ``generate``, ``stats``, ``close``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..moe.config import MoEConfig
from ..moe.loader import default_device, resolve_model_path
from ..moe.tokenizer import Tokenizer
from .engine import Engine
from .modes import ModeContext, check_options, get_builder
from .sampling import RequestError, SamplingParams

log = logging.getLogger("moeyard")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None           # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)   # with SamplingParams(prompt_logprobs=k): None, then one
                                                          # SampleResult per later prompt token


def context_length(cfg: MoEConfig, max_model_len: int | None) -> int:
    """Longest sequence served: the config's positions, capped by a sliding window (we keep full attention,
    which equals windowed attention only while sequences fit in the window)."""
    n = cfg.max_position_embeddings
    raw = cfg.raw
    sw = raw.get("sliding_window")
    if sw and raw.get("use_sliding_window", cfg.model_type == "mixtral"):
        n = min(n, int(sw))
    if max_model_len is not None:
        if max_model_len < 2 or max_model_len > n:
            raise RequestError(f"max_model_len must be between 2 and {n} for this model, got {max_model_len}")
        return max_model_len
    return min(n, 4096)


def _validate(path: str, cfg: MoEConfig):
    from ..moe.checkpoint import CheckpointReader
    from ..moe.validate import validate_checkpoint
    reader = CheckpointReader(path)
    try:
        validate_checkpoint(cfg, reader)
    finally:
        reader.close()


class LLM:
    """Generate with an MoE checkpoint in one of the modes of ``moeyard.runtime.modes.MODES``."""

    def __init__(self, model: str = "default", mode: str = "local", dtype=None, device=None,
                 max_num_seqs: int = 64, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 quantization: str | None = None, threads: int | None = None, **mode_options):
        from ..moe.compute import check_quantization
        from .threads import apply_threads
        builder = get_builder(mode)
        check_options(builder, mode, mode_options)
        quantization = check_quantization(quantization)
        self.threads, self.threads_reason = apply_threads(threads)
        self.path = resolve_model_path(model)
        self.mode = mode
        self.cfg = MoEConfig.from_dir(self.path)
        _validate(self.path, self.cfg)     # every mode: dtype and shape of every tensor, before building anything
        dev = torch.device(device) if device is not None else default_device()
        self._ctx = ModeContext(self.path, self.cfg, dtype, dev, max_num_seqs, context_length(self.cfg, max_model_len),
                                quantization, self.threads)
        self._builder, self._options = builder, mode_options
        self._max_batched = max_num_batched_tokens
        self._start()

    def _start(self):
        executor, tokenizer = self._builder(self._ctx, **self._options)
        self.tokenizer: Tokenizer | None = tokenizer
        eos = tuple(self.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos = eos + (tokenizer.eos_token_id,)
        self.engine = Engine(executor, tokenizer, eos, self.cfg.vocab_size, self._ctx.max_model_len,
                             self._ctx.max_num_seqs, self._max_batched)
        plan = getattr(getattr(executor, "model", None), "plan", None)
        log.info("moeyard %s mode: %d threads (%s)%s", self.mode, self.threads, self.threads_reason,
                 f"; {plan.describe()}" if plan is not None else "")
        for attr in ("max_decode_batch", "batch_policy"):   # optional executor hooks (offload token scheduling)
            if getattr(executor, attr, None) is not None:
                setattr(self.engine.scheduler, attr, getattr(executor, attr))

    @property
    def max_model_len(self) -> int:
        return self._ctx.max_model_len

    def restart(self):
        """Rebuild the executor (e.g. after a worker died); queued and running requests are failed first."""
        old = self.engine
        for seq in list(old.seqs.values()):
            if not seq.finished:
                old._fail(seq, "the engine was restarted")
        try:
            old.executor.close()
        except Exception:  # noqa: BLE001 — a dead executor may not close cleanly
            pass
        self._start()

    def generate(self, prompts: str | list[str] | None = None, sampling_params: SamplingParams | list | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and prompt_token_ids is None:
            raise RequestError("generate needs prompts or prompt_token_ids")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        if len(params) != n:
            raise RequestError(f"{len(params)} sampling params for {n} prompts")
        # Validate every request before admitting any, so a bad one does not leave others half-run.
        seqs = []
        try:
            for i in range(n):
                seqs.append(self.engine.add_request(
                    prompt=prompts[i] if prompts is not None else None,
                    prompt_token_ids=prompt_token_ids[i] if prompt_token_ids is not None else None,
                    params=params[i]))
        except Exception:
            for s in seqs:
                self.engine.abort(s.request_id)
                self.engine.pop(s.request_id)
            raise
        while any(not s.finished for s in seqs):
            self.engine.step()
        outs = [self._output(s) for s in seqs]
        for s in seqs:
            self.engine.pop(s.request_id)
        return outs

    @staticmethod
    def _output(s) -> RequestOutput:
        return RequestOutput(s.request_id, s.prompt, s.prompt_token_ids, list(s.output_ids), s.text,
                             s.finish_reason, s.error, list(s.logprobs), list(s.prompt_logprobs))

    def stats(self) -> dict:
        d = self.engine.stats()
        d.setdefault("threads", self.threads)
        d.setdefault("threads_reason", self.threads_reason)
        plan = getattr(getattr(self.engine.executor, "model", None), "plan", None)
        if plan is not None:
            for k, v in plan.stats().items():
                d.setdefault(k, v)
        return d

    def close(self):
        self.engine.executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
