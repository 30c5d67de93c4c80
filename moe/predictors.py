"""Routing-path predictors: guess which experts the next MoE layers will route each token to.

Used by offload mode (prefetch, prediction-aware eviction, expert-grouping batch policy) and meant to be shared
with speculative expert shuffling. Protocol (``RoutePredictor``):

- ``begin(token_ids_N)``: optional, a new forward pass over these tokens starts;
- ``observe(layer, x_ND, topk_ids_NK)``: the actual routing of MoE layer ``layer`` (``x_ND`` is the MoE input);
- ``predict(layer, ahead) -> (ids_NP, scores_NP)``: for each token of the last observed batch, the ``P`` most likely
  experts of the MoE layer ``ahead`` MoE layers after ``layer`` (scores: larger = likelier, comparable per token).

Layers are *MoE layer indices in model numbering*; ``ahead`` counts MoE layers (dense layers are skipped).
Implementations: ``router`` (next layers' routers applied to the current hidden state), ``transition``
(inter-layer transition statistics profiled from a routing trace ``experts[T, L, k]``), ``token`` (token id →
experts table, from a trace with ``tokens[T]`` and/or learned online), ``combined`` (router + token table: a
weighted sum of their scores). ``scores_for(target, after)`` asks for one target layer from what is known after
layer ``after`` (None: at the start of a pass, when only the token table can answer).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class RoutePredictor(Protocol):
    def begin(self, token_ids_N: torch.Tensor | None) -> None: ...
    def observe(self, layer: int, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor) -> None: ...
    def predict(self, layer: int, ahead: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def _topk(scores_NE: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, i = torch.topk(scores_NE, min(p, scores_NE.shape[-1]), dim=-1)
    return i, s


class _Base:
    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, width: int | None = None):
        self.moe_layers = list(moe_layers)
        self._pos = {l: i for i, l in enumerate(self.moe_layers)}
        self.E, self.K = num_experts, top_k
        self.width = width or top_k          # experts predicted per token
        self.tokens = None
        self.last: dict[int, torch.Tensor] = {}

    def target(self, layer: int, ahead: int) -> int | None:
        i = self._pos[layer] + ahead
        return self.moe_layers[i] if 0 <= i < len(self.moe_layers) else None

    def begin(self, token_ids_N):
        self.tokens = token_ids_N
        self.last = {}

    def observe(self, layer, x_ND, topk_ids_NK):
        self.last[layer] = topk_ids_NK

    def scores(self, layer: int, ahead: int) -> torch.Tensor | None:
        """[N, E] float scores, normalised to sum to 1 per token (None: cannot predict)."""
        raise NotImplementedError

    def scores_for(self, target: int, after: int | None) -> torch.Tensor | None:
        """[N, E] scores for MoE layer ``target`` from what is known once MoE layer ``after`` was observed
        (``after=None``: at the start of a forward pass, only the token ids are known). None: cannot predict."""
        if after is None or after not in self._pos or target not in self._pos:
            return None
        ahead = self._pos[target] - self._pos[after]
        return self.scores(after, ahead) if ahead >= 1 else None

    def start_scores(self) -> torch.Tensor | None:
        """[N, L, E] scores of every MoE layer at the start of a pass (None: this predictor needs a layer first)."""
        return None

    def first_layer_scores(self, token_ids_N: torch.Tensor) -> torch.Tensor | None:
        """[N, E] scores of the first MoE layer for a pass over ``token_ids_N`` that has not started (used to
        prefetch for the next decode step from a guess of its tokens). None: cannot predict from token ids."""
        return None

    def predict(self, layer, ahead):
        s = self.scores(layer, ahead)
        if s is None:
            n = self.last[layer].shape[0] if layer in self.last else 0
            return torch.empty(n, 0, dtype=torch.long), torch.empty(n, 0)
        return _topk(s, self.width)


class RouterPredictor(_Base):
    """Baseline: apply the routers of the next layers to the current MoE input (the residual stream changes
    slowly, so layer l's normalised hidden state is a fair proxy for layer l+a's)."""

    def __init__(self, routers: dict[int, torch.Tensor], num_experts, top_k, width=None):
        super().__init__(sorted(routers), num_experts, top_k, width)
        self.routers = routers
        self._wT: dict = {}
        self.x = {}

    def begin(self, token_ids_N):
        super().begin(token_ids_N)
        self.x = {}

    def observe(self, layer, x_ND, topk_ids_NK):
        super().observe(layer, x_ND, topk_ids_NK)
        self.x = {layer: x_ND}

    def scores(self, layer, ahead):
        t = self.target(layer, ahead)
        if t is None or layer not in self.x:
            return None
        x = self.x[layer]
        w = self._wT.get((t, x.dtype))
        if w is None:
            w = self._wT[(t, x.dtype)] = self.routers[t].to(x.dtype).T.contiguous()
        return torch.softmax((x @ w).float(), dim=-1)


class TransitionPredictor(_Base):
    """Routing-path model: P(expert e at MoE layer l+a | the token's experts at layer l), counted on a trace.
    Optional online updates (``learn=True``) refine the counts with every observed batch."""

    def __init__(self, trace_experts: np.ndarray | None, moe_layers, num_experts, top_k, width=None,
                 max_ahead: int = 4, learn: bool = True, prior: float = 0.5):
        super().__init__(moe_layers, num_experts, top_k, width)
        L, E = len(self.moe_layers), num_experts
        self.max_ahead = max_ahead
        self.learn = learn
        self.T = torch.full((max_ahead + 1, L, E, E), prior, dtype=torch.float64)   # [a, l, e_from, e_to]
        self._path: dict[int, torch.Tensor] = {}
        if trace_experts is not None:
            self.fit(trace_experts)

    def fit(self, experts_TLK: np.ndarray):
        ex = torch.as_tensor(np.asarray(experts_TLK).astype(np.int64))
        T, L, K = ex.shape
        if L != len(self.moe_layers):
            raise ValueError(f"trace has {L} layers but the model has {len(self.moe_layers)} MoE layers")
        for a in range(1, self.max_ahead + 1):
            for l in range(L - a):
                src, dst = ex[:, l, :], ex[:, l + a, :]                        # [T,K]
                idx = (src[:, :, None] * self.E + dst[:, None, :]).reshape(-1)
                self.T[a, l].view(-1).index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))

    def begin(self, token_ids_N):
        super().begin(token_ids_N)
        self._path = {}

    def observe(self, layer, x_ND, topk_ids_NK):
        super().observe(layer, x_ND, topk_ids_NK)
        li = self._pos[layer]
        ids = topk_ids_NK.to(torch.long).cpu()
        if self.learn:
            for a in range(1, self.max_ahead + 1):
                src_l = li - a
                if src_l >= 0 and src_l in self._path:
                    src = self._path[src_l]
                    idx = (src[:, :, None] * self.E + ids[:, None, :]).reshape(-1)
                    self.T[a, src_l].view(-1).index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
        self._path[li] = ids

    def scores(self, layer, ahead):
        li = self._pos[layer]
        if ahead > self.max_ahead or li + ahead >= len(self.moe_layers) or li not in self._path:
            return None
        M = self.T[ahead, li]                                        # [E, E]
        P = M / M.sum(-1, keepdim=True)
        s = P[self._path[li]].sum(1)                                 # [N, E]
        return (s / s.sum(-1, keepdim=True)).float()


class TokenTablePredictor(_Base):
    """Token identity → expert frequencies per MoE layer (from a trace's ``tokens[T]`` and/or learned online)."""

    def __init__(self, vocab_size: int, moe_layers, num_experts, top_k, width=None, trace=None, learn=True):
        super().__init__(moe_layers, num_experts, top_k, width)
        self.learn = learn
        self._C = torch.zeros(vocab_size, len(self.moe_layers), num_experts, dtype=torch.float32)
        self._step = None
        self._pending: list = []
        if trace is not None and trace_tokens(trace) is not None:
            tok = torch.as_tensor(np.asarray(trace_tokens(trace)).astype(np.int64))
            ex = torch.as_tensor(np.asarray(trace["experts"]).astype(np.int64))
            T, L, K = ex.shape
            lid = torch.arange(L)[None, :, None].expand(T, L, K)
            flat = (tok[:, None, None] * L + lid) * num_experts + ex
            self._C.view(-1).index_add_(0, flat.reshape(-1), torch.ones(flat.numel()))

    def observe(self, layer, x_ND, topk_ids_NK):
        super().observe(layer, x_ND, topk_ids_NK)
        if self.learn and self.tokens is not None and self.tokens.shape[0] == topk_ids_NK.shape[0]:
            self._pending.append((self._pos[layer], topk_ids_NK))   # this pass's tokens; counted in one go (_learn)

    @property
    def C(self) -> torch.Tensor:
        """The [vocab, L, E] count table, every observed routing included."""
        self._learn()
        return self._C

    def _learn(self):
        """Add the routings observed in this pass (over ``self.tokens``; ``begin`` learns before it replaces them)
        to the table: one ``index_add`` for all its layers."""
        if not self._pending:
            return
        L, pend = len(self.moe_layers), self._pending
        self._pending = []
        li = torch.tensor([p[0] for p in pend])
        ids = torch.stack([p[1] for p in pend]).to(torch.long).cpu()                       # [L', N, K]
        tok = self.tokens.to(torch.long).cpu()
        flat = ((tok[None, :, None] * L + li[:, None, None]) * self.E + ids).reshape(-1)
        self._C.view(-1).index_add_(0, flat, torch.ones(flat.numel()))

    def scores(self, layer, ahead):
        t = self.target(layer, ahead)
        if t is None or self.tokens is None:
            return None
        return self._table(t)

    def scores_for(self, target, after):
        """Known from the token ids alone: every layer can be predicted at the start of the pass."""
        if self.tokens is None or target not in self._pos:
            return None
        return self._table(target)

    def begin(self, token_ids_N):
        self._learn()
        super().begin(token_ids_N)
        self._step = None

    def start_scores(self):
        if self.tokens is None:
            return None
        if self._step is None:        # every layer's row of this pass's tokens at once (counts before the pass)
            self._learn()
            c = self._C[self.tokens.to(torch.long).cpu()] + 1e-3          # [N, L, E]
            self._step = c / c.sum(-1, keepdim=True)
        return self._step

    def _table(self, t):
        return self.start_scores()[:, self._pos[t]]

    def first_layer_scores(self, token_ids_N):
        c = self._C[token_ids_N.to(torch.long).cpu(), 0] + 1e-3         # counts so far (pending learned at begin)
        return c / c.sum(-1, keepdim=True)


class CombinedPredictor(_Base):
    """Weighted sum of the members' normalised scores (members that cannot predict are skipped)."""

    def __init__(self, members: list[tuple[_Base, float]], moe_layers, num_experts, top_k, width=None):
        super().__init__(moe_layers, num_experts, top_k, width)
        self.members = members

    def begin(self, token_ids_N):
        super().begin(token_ids_N)
        for m, _ in self.members:
            m.begin(token_ids_N)

    def observe(self, layer, x_ND, topk_ids_NK):
        super().observe(layer, x_ND, topk_ids_NK)
        for m, _ in self.members:
            m.observe(layer, x_ND, topk_ids_NK)

    def scores(self, layer, ahead):
        return self._sum([m.scores(layer, ahead) for m, _ in self.members])

    def scores_for(self, target, after):
        return self._sum([m.scores_for(target, after) for m, _ in self.members])

    def start_scores(self):
        return self._sum([m.start_scores() for m, _ in self.members])

    def first_layer_scores(self, token_ids_N):
        return self._sum([m.first_layer_scores(token_ids_N) for m, _ in self.members])

    def _sum(self, scores):
        tot = None
        for s, (_, w) in zip(scores, self.members):
            if s is not None:
                if s.dtype != torch.float32 or s.device.type != "cpu":
                    s = s.float().cpu()
                if w != 1.0:
                    s = s * w
                tot = s if tot is None else tot + s
        return tot


def trace_tokens(trace: dict):
    """The token ids of a routing trace: ``tokens[T]`` or ``token_ids[T]`` (the default model's trace), or None."""
    for k in ("tokens", "token_ids"):
        if trace.get(k) is not None:
            return trace[k]
    return None


def token_table_problem(trace: dict | None, cfg) -> str | None:
    """Why ``trace`` cannot seed a token-identity table for ``cfg`` (None: it can)."""
    if trace is None:
        return "no routing trace"
    ex, tok = trace.get("experts"), trace_tokens(trace)
    if tok is None:
        return "the routing trace has no token ids (tokens/token_ids)"
    if ex is None or np.ndim(ex) != 3:
        return "the routing trace has no experts[T, L, k] array"
    L = len(cfg.moe_layers)
    if ex.shape[1] != L or ex.shape[0] != len(tok):
        return (f"the routing trace does not match the model (experts {tuple(ex.shape)}, {len(tok)} token ids; "
                f"the model has {L} MoE layers)")
    if ex.size and (int(ex.max()) >= cfg.num_experts or int(ex.min()) < 0):
        return f"the routing trace names experts outside [0, {cfg.num_experts})"
    if len(tok) and (int(np.max(tok)) >= cfg.vocab_size or int(np.min(tok)) < 0):
        return f"the routing trace names token ids outside the vocabulary ({cfg.vocab_size})"
    return None


def load_trace(path: str) -> dict:
    """A routing trace ``.npz``: ``experts[T, L, k]`` (int16, MoE layers in order), optional ``tokens[T]``."""
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    if "experts" not in d or d["experts"].ndim != 3:
        raise ValueError(f"{path}: a routing trace needs an 'experts' array of shape [T, L, k]")
    return d


def _routers(model) -> dict[int, torch.Tensor]:
    return {i: l.mlp.gate.weight.detach() for i, l in enumerate(model.model.layers) if l.is_moe}


PREDICTORS = ("router", "transition", "token", "combined")


def build_predictor(name: str, cfg, model=None, trace: dict | None = None, width: int | None = None,
                    max_ahead: int = 4) -> _Base:
    """Registry: ``name`` in PREDICTORS. ``model`` is needed by "router"/"combined"; ``trace`` is optional
    (transition/token tables start from it, and learn online either way)."""
    L, E, K = cfg.moe_layers, cfg.num_experts, cfg.top_k
    ex = trace["experts"] if trace is not None else None
    if ex is not None and ex.shape[1] != len(L):
        ex, trace = None, None   # trace from another model: ignore, learn online
    if name == "router":
        return RouterPredictor(_routers(model), E, K, width)
    if name == "transition":
        return TransitionPredictor(ex, L, E, K, width, max_ahead=max_ahead)
    if name == "token":
        return TokenTablePredictor(cfg.vocab_size, L, E, K, width, trace=trace)
    if name == "combined":
        # router (what the hidden state says, from one layer ahead) + token table (what this token did before, known
        # for every layer at the start of the pass); the transition model adds little on top of the two here and
        # its online update is the costliest per layer, so it is not a member
        mem = [(TokenTablePredictor(cfg.vocab_size, L, E, K, width, trace=trace), 1.0)]
        if model is not None:
            mem.insert(0, (RouterPredictor(_routers(model), E, K, width), 1.0))
        else:
            mem.append((TransitionPredictor(ex, L, E, K, width, max_ahead=max_ahead), 1.0))
        return CombinedPredictor(mem, L, E, K, width)
    raise ValueError(f"unknown predictor {name!r}; valid: {', '.join(PREDICTORS)}")


def precision_recall(pred_sets: list[set], true_sets: list[set]) -> tuple[float, float]:
    tp = sum(len(p & t) for p, t in zip(pred_sets, true_sets))
    npred = sum(len(p) for p in pred_sets)
    ntrue = sum(len(t) for t in true_sets)
    return (tp / npred if npred else 0.0), (tp / ntrue if ntrue else 0.0)
