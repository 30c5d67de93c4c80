"""The one calibration routine: a short prefill on the workers (standard scheme) recording every MoE layer's
routing. Used when a model ships no ``trace.npz``: for ``placement="affinity"`` / ``"coactivation"`` (the trace
to solve on) and for speculative shuffling (the token-identity table).
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.executor import StepItem
from .partition import partition

CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning was the word, and numbers "
                    "like 3.14159 and 2.71828 appear in science. def main(): return sum(range(10)) # code "
                    "Once upon a time there lived a king who had three daughters. Q: What is the capital of "
                    "France? A: Paris. The weather today is sunny with a chance of rain in the afternoon.")


def calibration_sequences(tokenizer, vocab_size: int, tokens: int, max_model_len: int) -> list[list[int]]:
    """The calibration text, then a fixed permutation of the vocabulary (so every token id is seen), in
    sequences of up to 64 tokens, ``tokens`` in all."""
    n = max(2, min(64, max_model_len))
    ids = list(tokenizer.encode(CALIBRATION_TEXT)) if tokenizer is not None else []
    ids += np.random.default_rng(0).permutation(vocab_size).tolist()
    ids = ids[:max(tokens, n)]
    return [ids[i:i + n] for i in range(0, len(ids), n) if len(ids[i:i + n]) > 1]


def plan_routing(plans, routing, num_layers: int, top_k: int):
    """(token ids [T], (slot, worker) per token, routing [T, L_moe, K]) of a step's plans, in plan order."""
    tok, slot_worker, rt = [], [], []
    for g, (plan, r) in enumerate(zip(plans, routing)):
        if r is None or not plan:
            continue
        rt.append(torch.as_tensor(r).long())
        for it in plan:
            tok.extend(it.token_ids)
            slot_worker.extend([(it.slot, g)] * len(it.token_ids))
    rt = torch.cat(rt) if rt else torch.empty((0, num_layers, top_k), dtype=torch.long)
    return torch.tensor(tok, dtype=torch.long), slot_worker, rt


def record_routing(step_plans, world: int, seqs: list[list[int]], batch: int, num_layers: int, top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``seqs`` ``batch`` at a time through ``step_plans(plans, max_len, moves, capture)`` (which returns
    per-worker logits and routing); returns (token ids [T], routing [T, L_moe, K]) in plan order."""
    toks, routes = [], []
    for i in range(0, len(seqs), max(1, batch)):
        items = [StepItem(j, s, 0, True) for j, s in enumerate(seqs[i:i + max(1, batch)])]
        plans, _, max_len = partition(items, world)
        tok, _, rt = plan_routing(plans, step_plans(plans, max_len, None, True)[1], num_layers, top_k)
        toks.append(tok)
        routes.append(rt)
    return torch.cat(toks), torch.cat(routes)
