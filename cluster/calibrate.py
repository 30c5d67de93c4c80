"""The one calibration routine: a short prefill on the workers recording every MoE layer's routing, for models
that ship no ``trace.npz`` (the trace of ``affinity`` / ``coactivation``, speculative shuffling's token table)."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.executor import StepItem
from .partition import partition

CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning was the word, and numbers "
                    "like 3.14159 and 2.71828 appear in science. def main(): return sum(range(10)) # code "
                    "Once upon a time there lived a king who had three daughters. Q: What is the capital of "
                    "France? A: Paris. The weather today is sunny with a chance of rain in the afternoon.")


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


def calibrate(step_plans, world: int, cfg, tokenizer, tokens: int, max_model_len: int, batch: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the calibration text, then a fixed permutation of the vocabulary (so every token id is seen),
    ``tokens`` in all, in sequences of up to 64 tokens, ``batch`` at a time through ``step_plans(plans, max_len,
    moves, capture)``; returns (token ids [T], routing [T, L_moe, K]) in plan order."""
    n, batch = max(2, min(64, max_model_len)), max(1, batch)
    ids = list(tokenizer.encode(CALIBRATION_TEXT)) if tokenizer is not None else []
    ids = (ids + np.random.default_rng(0).permutation(cfg.vocab_size).tolist())[:max(tokens, n)]
    seqs = [ids[i:i + n] for i in range(0, len(ids), n) if len(ids[i:i + n]) > 1]
    toks, routes = [], []
    for i in range(0, len(seqs), batch):
        plans, _, max_len = partition([StepItem(j, s, 0, True) for j, s in enumerate(seqs[i:i + batch])], world)
        tok, _, rt = plan_routing(plans, step_plans(plans, max_len, None, True)[1], len(cfg.moe_layers), cfg.top_k)
        toks.append(tok)
        routes.append(rt)
    return torch.cat(toks), torch.cat(routes)
