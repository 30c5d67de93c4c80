"""One expert-parallel worker: a shard of the experts, all dense weights, and the cache of its sequences.

A plain class (no Ray): the Ray actor in ``actor.py`` only forwards to it, and tests run several in threads over
a gloo group. All workers of a group call ``step`` for the same step (each with its own items, maybe none);
inside, they run the layers in lockstep and meet at the scheme's collectives (``moeyard.comm.schemes``).
The worker receives the frozen ``Placement`` (row i: the i-th MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.exchange import Exchanger
from ..comm.group import make_group
from ..comm.kv import move_sequences
from ..comm.schemes import get_scheme
from ..moe.checkpoint import CheckpointReader
from ..moe.config import MoEConfig
from ..moe.experts import ResidentExperts
from ..moe.compute import pack_dense
from ..moe.loader import build_dense, compute_plan, resolve_dtype
from ..runtime.executor import StepItem, build_batch
from ..runtime.kv_cache import KVCache
from ..runtime.modes import new_kv_cache


@dataclass(frozen=True)
class WorkItem:
    """A StepItem plus ``key``: global index of its first token in the step's flattened batch."""
    slot: int
    token_ids: list
    start: int
    sample: bool
    key: int


class EPWorker:
    def __init__(self, path: str, rank: int, world: int, placement, scheme: str = "standard", dtype=None,
                 device="cpu", max_num_seqs: int = 64, max_model_len: int = 2048, shuffle: bool = False,
                 shuffle_options: dict | None = None, quantization: str | None = None):
        self.rank, self.world, self.placement = rank, world, placement
        self.device = torch.device(device)
        self.cfg = cfg = MoEConfig.from_dir(path)
        self.scheme = get_scheme(scheme, cfg, world)
        if shuffle and self.scheme.spec_form != 2:
            raise ValueError("worker-side shuffling (form 2) needs ep_scheme='tp'")
        self.shuffle, self.shuffle_options = shuffle, dict(shuffle_options or {})
        self.moe_layers = list(cfg.moe_layers)
        if placement.num_layers != len(self.moe_layers):
            raise ValueError(f"placement has {placement.num_layers} layers, the model {len(self.moe_layers)} MoE "
                             f"layers")
        self.layer_index = {l: i for i, l in enumerate(self.moe_layers)}
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        reader = CheckpointReader(path)
        self.model = build_dense(cfg, reader, self.dtype, self.device, max_model_len)
        # weight-only quantization (moe/compute.py): routed experts always; dense layers unless heads are split
        # across workers (ep_scheme="tp" slices the projection matrices)
        self.plan = (compute_plan(cfg, self.dtype, self.device, quantization)
                     if quantization or cfg.quant.method == "moeyard" else None)
        if self.plan is not None and scheme != "tp":
            pack_dense(self.model, self.plan)
        self.local_experts = {l: placement.local_experts(rank)[i] for i, l in enumerate(self.moe_layers)}
        self.model.experts = ResidentExperts(cfg, reader, self.dtype, self.device, only=self.local_experts,
                                             pack=self.plan.experts if self.plan is not None else None)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.ex: Exchanger | None = None
        self.kv = None
        self.steps = 0

    # -- group ---------------------------------------------------------------------------------------------------
    def connect(self, init_method: str, backend: str | None = None, timeout_s: float = 30.0):
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        pg = make_group(init_method, self.rank, self.world, backend, timeout_s)
        self.ex = Exchanger(pg, self.rank, self.world, timeout_s, self.device)
        self.scheme.apply(self, self.shuffle, self.shuffle_options)
        hk, dk, hv, dv = self.scheme.kv_shape(self)
        if (hk, dk, hv, dv) == self.cfg.kv_shape:
            self.kv = new_kv_cache(self.cfg, self.max_num_seqs, self.max_model_len, self.dtype, self.device)
        else:
            self.kv = KVCache(self.cfg.num_layers, self.max_num_seqs, hk, dk, self.max_model_len, self.dtype,
                              self.device, v_heads=hv, v_dim=dv)
        return True

    def stats(self) -> dict:
        d = self.ex.stats() if self.ex else {}
        d["steps"] = self.steps
        d.update(self.scheme.stats())
        return d

    def expert_bytes(self) -> int:
        return self.model.experts.nbytes

    # -- one step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, items: list[WorkItem], max_len: int, moves: list | None = None, capture: bool = False):
        """Run one step for this worker's items (maybe none); returns (logits [B_sample, V] of the sampled items
        it answers for, its cumulative counters, with ``capture`` its tokens' routing — int16 [N, L_moe, K]
        (standard), per MoE layer (keys, ids [R, K]) of the tokens routed here (coherent) — else None).
        ``moves`` (speculative shuffling; the same list on every worker): sequences ``(slot, src, dst, T)`` whose
        first T cache entries move from worker src to dst before the step."""
        if self.ex is None:
            raise RuntimeError("EPWorker.step before connect()")
        self.kv.ensure(max_len)
        self.steps += 1
        if moves and not self.scheme.replicated_kv:
            move_sequences(self.ex, self.kv, moves)
        logits, routing = self.scheme.run(self, items, *flatten(items, self.rank), capture)
        return logits, self.stats(), routing

    def move_experts(self, op: str, *args):
        """Online rebalancing (``cluster/rebalance.py``): ``op`` is nbytes | stage | commit | abort."""
        from .rebalance import worker_moves
        return getattr(worker_moves(self), op)(*args)

    def batch(self, items: list[WorkItem]):
        """The model's ForwardBatch over ``items`` (this worker's cache)."""
        return build_batch([StepItem(it.slot, list(it.token_ids), it.start, it.sample) for it in items],
                           self.device, self.kv)[1]


def flatten(items: list[WorkItem], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N] and the token table [N, 5] (CPU, long): slot, pos, key, home (this worker), sample."""
    ids, slot, pos, key, samp = [], [], [], [], []
    for it in items:
        n = len(it.token_ids)
        ids.extend(it.token_ids)
        slot.extend([it.slot] * n)
        pos.extend(range(it.start, it.start + n))
        key.extend(range(it.key, it.key + n))
        samp.extend([False] * (n - 1) + [bool(it.sample)])
    T = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    tab = (torch.stack([T(slot), T(pos), T(key), torch.full((len(ids),), rank, dtype=torch.long), T(samp)], 1)
           if ids else torch.empty((0, 5), dtype=torch.long))
    return T(ids), tab
