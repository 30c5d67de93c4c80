"""Expert-parallel schemes: a small protocol and a registry (``SCHEMES``), checked against ``ep_scheme``.

A scheme is applied to a worker's built model (gpt-fast's ``apply_tp``): it swaps in its dispatcher and wraps the
model's own attention and MoE blocks, so the model in ``moe/`` stays the only forward pass (docs/CLUSTER.md).
"""

from __future__ import annotations

import torch

from ..moe.errors import MoeyardError, check_options, lookup
from ..moe.experts import run_experts
from .coherent import apply_coherent, coherent_hidden
from .dispatch import A2ADispatcher
from .tp import apply_tp, head_range


def refuse_hybrid(cfg, what: str, instead: str):
    """MoeyardError naming ``what`` and the model when it has linear-attention layers (a recurrent state per
    sequence that is neither replicated, split nor moved between workers)."""
    if any(cfg.is_linear_layer(l) for l in range(cfg.num_layers)):
        raise MoeyardError(f"{what}; {cfg.model_type}'s linear-attention layers keep a recurrent state that is "
                           f"neither replicated, split nor moved: use {instead}")


class Scheme:
    """``check(cfg, world)`` raises MoeyardError naming the scheme and the model it cannot serve; ``apply`` wraps
    the model; ``run(worker, items, ids_N, tab, capture) -> (logits, routing)`` is one step. ``all_tokens``:
    every worker runs every token (the driver sends each worker the whole step); ``spec_form``: the
    speculative-shuffling form it supports (form 2 runs in the workers, taking ``shuffle_options``; form 1 in the
    driver's planner); ``replicated_kv``: every worker holds every cache."""
    name = ""
    all_tokens = False
    spec_form = 1
    shuffle_options: tuple = ()
    replicated_kv = False

    def check(self, cfg, world: int):
        pass

    def apply(self, worker, shuffle: bool, options: dict):
        worker.model.dispatcher = A2ADispatcher(worker.ex, worker.placement, worker.layer_index)

    def kv_shape(self, worker) -> tuple:
        return worker.cfg.kv_shape

    def stats(self) -> dict:
        return {}


class Standard(Scheme):
    name = "standard"

    def run(self, worker, items, ids_N, tab, capture: bool = False):
        m, cfg = worker.model, worker.cfg
        L, K = len(worker.moe_layers), cfg.top_k
        if not items:                       # no tokens here: still meet the others at every MoE layer
            x = torch.empty((0, cfg.hidden_size), dtype=worker.dtype, device=worker.device)
            ids = torch.empty((0, K), dtype=torch.long, device=worker.device)
            for l in worker.moe_layers:
                r = m.dispatcher.dispatch(l, x, ids, x.new_empty((0, K)))
                m.dispatcher.combine(run_experts(l, r.x_MD, r.expert_ids, r.counts, m.experts), r.meta)
            return torch.empty((0, cfg.vocab_size)), torch.empty((0, L, K), dtype=torch.int16) if capture else None
        batch, cap = worker.batch(items), {}
        if capture:
            batch.route_hooks = [lambda layer, x, ids, w: cap.__setitem__(layer, ids.cpu())]
        logits = m(ids_N.to(worker.device), batch).cpu()
        routing = torch.stack([cap[l] for l in worker.moe_layers], 1).to(torch.int16) if capture else None
        return logits, routing


class Coherent(Scheme):
    name = "coherent"
    replicated_kv = True       # every worker holds every sequence's cache: moving a sequence moves no bytes

    def check(self, cfg, world: int):
        refuse_hybrid(cfg, "ep_scheme='coherent' replicates cache entries", "ep_scheme='standard'")

    def apply(self, worker, shuffle: bool, options: dict):
        super().apply(worker, shuffle, options)
        apply_coherent(worker.model, worker.ex, worker.placement, worker.layer_index)

    def run(self, worker, items, ids_N, tab, capture: bool = False):
        """Routing (``capture``) is logged by key wherever the tokens are: per MoE layer (keys, ids [R, K])."""
        log = {} if capture else None
        h = coherent_hidden(worker.model, ids_N, tab, worker.kv, worker.ex, routing_log=log)
        return worker.model.lm_head(h).float().cpu(), [log[l] for l in worker.moe_layers] if capture else None


class TensorParallel(Scheme):
    name = "tp"
    all_tokens = True
    spec_form = 2
    shuffle_options = ("slack",)

    def check(self, cfg, world: int):
        refuse_hybrid(cfg, "ep_scheme='tp' splits attention heads", "ep_scheme='standard'")
        head_range(cfg.num_heads, 0, world)

    def apply(self, worker, shuffle: bool, options: dict):
        super().apply(worker, shuffle, options)
        check_options(options, self.shuffle_options, "shuffle_options: ep_scheme='tp'")
        self.counters, self.heads = apply_tp(worker.model, worker.ex, worker.placement, worker.layer_index,
                                             shuffle, **options)

    def kv_shape(self, worker) -> tuple:
        return self.heads.kv_shape()

    def run(self, worker, items, ids_N, tab, capture: bool = False):
        """Every worker runs every item; sampled row i's logits come from worker i % G."""
        batch = worker.batch(items)
        h = worker.model.hidden(ids_N.to(worker.device), batch)
        rows = batch.logits_idx[worker.rank::worker.world]
        return worker.model.lm_head(h[rows]).float().cpu(), None

    def stats(self) -> dict:
        return {f"tp_{k}": list(v) for k, v in self.counters.items()}


SCHEMES = {s.name: s for s in (Standard, Coherent, TensorParallel)}


def get_scheme(name: str, cfg=None, world: int | None = None) -> Scheme:
    """A fresh scheme object, checked against the model and worker count when given."""
    s = lookup(SCHEMES, name, "ep_scheme")()
    if cfg is not None:
        s.check(cfg, world or 1)
    return s
