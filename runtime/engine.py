"""The engine: requests in, one model step at a time, tokens out. Mode-agnostic: an executor does the compute.

Failure isolation: an exception while running a step fails only the requests of that step (with the error
message as their ``finish_reason == "error"`` result); the engine keeps serving the others.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from .detok import IncrementalDetokenizer
from .executor import RequestFailed, StepItem
from .sampling import RequestError, SampleResult, SamplingParams, apply_penalties, sample
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("moeyard")


class Engine:
    def __init__(self, executor, tokenizer, eos_ids: tuple[int, ...], vocab_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int = 2048, max_decode_batch: int | None = None):
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, max_decode_batch,
                                   allocate=lambda: self._free_slots.pop() if self._free_slots else None,
                                   free=self._free_slot)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._step_no = 0
        # requests_finished counts every end (stop, length, abort, error); requests_aborted and requests_failed
        # say how many of those were aborts (e.g. a client that went away) and errors.
        self.counters = {"tokens_generated": 0, "prompt_tokens": 0, "steps": 0, "requests_finished": 0,
                         "requests_aborted": 0, "requests_failed": 0, "model_seconds": 0.0}

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("a request needs a prompt or prompt_token_ids", param="prompt")
            if not isinstance(prompt, str):
                raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json: pass prompt_token_ids instead of text")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("the prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context is {self.max_model_len} tokens "
                               "(prompt plus at least one generated token must fit)", param="prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"the context is {self.max_model_len} tokens, but the request asks for "
                               f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} in "
                               f"max_tokens); reduce max_tokens to at most {self.max_model_len - len(ids)}",
                               param="max_tokens")
        if params.prompt_logprobs is not None and not getattr(self.executor, "prompt_logits", False):
            raise RequestError("prompt logprobs (echo with logprobs) are not supported in this mode", param="echo")
        if params.logit_bias and any(not 0 <= t < self.vocab_size for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        eos = () if params.ignore_eos else self.eos_ids
        seq = Sequence(rid, prompt, ids, params, eos_ids=eos, arrival=self._step_no)
        self.seqs[rid] = seq
        if params.max_tokens == 0:
            seq.finish_reason = "length"
            seq.status = seq.status.FINISHED
        else:
            self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str):
        seq = self.seqs.get(request_id)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.counters["requests_aborted"] += 1
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def pop(self, request_id: str) -> Sequence | None:
        return self.seqs.pop(request_id, None)

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one model step; return the sequences that got a token or finished in it."""
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self._step_no += 1
        items = []
        for s in sched:
            seq = s.seq
            seq.last_scheduled = self._step_no
            toks = seq.all_ids[seq.num_computed:seq.num_computed + s.num_tokens]
            pl = seq.params.prompt_logprobs is not None and seq.num_computed < len(seq.prompt_token_ids)
            items.append(StepItem(seq.slot, toks, seq.num_computed, s.completes, seq.request_id, all_logits=pl))
        t0 = time.perf_counter()
        try:
            logits_BV = self.executor.execute(items)
        except RequestFailed as e:
            failed = set(e.request_ids)
            for s in sched:
                if s.seq.request_id in failed:
                    self._fail(s.seq, str(e))
            return [s.seq for s in sched if s.seq.request_id in failed]
        except Exception as e:  # noqa: BLE001 — isolate the failure to this step's requests
            log.exception("model step failed")
            for s in sched:
                self._fail(s.seq, f"{type(e).__name__}: {e}")
            return [s.seq for s in sched]
        self.counters["model_seconds"] += time.perf_counter() - t0
        self.counters["steps"] += 1
        done = [s.seq for s, it in zip(sched, items) if it.sample]
        for s in sched:
            if s.seq.in_prefill:
                self.counters["prompt_tokens"] += s.num_tokens
            s.seq.num_computed += s.num_tokens
        if any(it.all_logits for it in items):
            logits_BV = self._take_prompt_logprobs(sched, items, logits_BV)
        params = [q.params for q in done]
        logits_BV = apply_penalties(logits_BV, params, [q.output_ids for q in done])
        results = sample(logits_BV, params, [q.generator for q in done])
        for seq, r in zip(done, results):
            self._append(seq, r)
        return done

    def _take_prompt_logprobs(self, sched, items, logits_BV):
        """Record prompt logprobs from the all-token rows of prompt chunks; return the rows to sample."""
        rows, cur = [], 0
        for s, it in zip(sched, items):
            n = len(it.token_ids)
            if it.all_logits:
                seq, k = s.seq, s.seq.params.prompt_logprobs
                if it.start == 0:
                    seq.prompt_logprobs = [None]
                prompt = seq.prompt_token_ids
                targets = prompt[it.start + 1: it.start + n + 1]
                if targets:
                    lp = torch.log_softmax(logits_BV[cur:cur + len(targets)].float(), dim=-1)
                    tgt = torch.tensor(targets, dtype=torch.long, device=lp.device)
                    chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
                    tops = torch.topk(lp, k, dim=-1) if k else None
                    for j, t in enumerate(targets):
                        top = list(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if k else []
                        seq.prompt_logprobs.append(SampleResult(t, chosen[j], top))
                cur += n
                if it.sample:
                    rows.append(cur - 1)
            elif it.sample:
                rows.append(cur)
                cur += 1
        return logits_BV[rows]

    def _append(self, seq: Sequence, r):
        seq.output_ids.append(r.token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(r)
        self.counters["tokens_generated"] += 1
        p = seq.params
        old_len = len(seq.text)
        if self.tokenizer is not None:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer)
            seq.text = seq.detok.update(seq.output_ids)
        if r.token in seq.eos_ids or r.token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif p.stop and len(seq.text) > old_len and self._check_stop_strings(seq, old_len):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason:
            self._finish(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, old_len: int = 0) -> bool:
        """Earlier text held no stop string, so only matches ending in the new text are looked for."""
        hits = [(seq.text.find(s, max(0, old_len - len(s) + 1)), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.text = seq.text[: i + (len(s) if seq.params.include_stop_str_in_output else 0)]
        return True

    def _fail(self, seq: Sequence, msg: str):
        seq.finish_reason, seq.error = "error", msg
        self.counters["requests_failed"] += 1
        self._finish(seq)

    def _free_slot(self, slot: int):
        self.executor.free(slot)
        self._free_slots.append(slot)

    def _finish(self, seq: Sequence):
        self.scheduler.finish(seq)
        self.counters["requests_finished"] += 1

    def stats(self) -> dict:
        d = dict(self.counters)
        d["running"] = len(self.scheduler.running)
        d["waiting"] = len(self.scheduler.waiting)
        d.update(self.executor.stats())
        return d
