"""The placement record: which worker(s) hold each (layer, expert).

Glossary
  L layers, E experts per layer, G workers
  assignment[l][e]  worker id (int) or, for a replicated expert, a tuple of distinct worker ids
  local experts     experts of one layer held by one worker
  replica           an extra copy of an expert on another worker (EPLB "redundant expert")

Serialised as ``placement.json``::

  {"num_workers": G, "num_layers": L, "num_experts": E,
   "assignment": [[w or [w, ...], ...], ...], "objective": ..., "bound": ..., "solver": {...}}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
import numpy as np

from .errors import PlacementError

def _norm_cell(c) -> int | tuple[int, ...]:
    if isinstance(c, (list, tuple, np.ndarray)):
        ws = tuple(int(x) for x in c)
        return ws[0] if len(ws) == 1 else ws
    return int(c)


@dataclass(frozen=True)
class Placement:
    """Immutable expert placement. ``assignment[l][e]`` is a worker id or a tuple of worker ids."""

    assignment: tuple
    num_workers: int
    objective: float | None = None
    bound: float | None = None
    solver: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        rows = tuple(tuple(_norm_cell(c) for c in row) for row in self.assignment)
        object.__setattr__(self, "assignment", rows)
        if not rows or not rows[0]:
            raise PlacementError("placement assignment is empty")
        E = len(rows[0])
        for l, row in enumerate(rows):
            if len(row) != E:
                raise PlacementError(f"placement layer {l} has {len(row)} experts, layer 0 has {E}")
            for e, c in enumerate(row):
                ws = c if isinstance(c, tuple) else (c,)
                if len(set(ws)) != len(ws) or not ws:
                    raise PlacementError(f"placement layer {l} expert {e}: replicas {ws} must be distinct")
                if min(ws) < 0 or max(ws) >= self.num_workers:
                    raise PlacementError(f"placement layer {l} expert {e}: worker ids {ws} "
                                         f"outside [0, {self.num_workers})")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.assignment)

    @property
    def num_experts(self) -> int:
        return len(self.assignment[0])

    @property
    def replicated(self) -> bool:
        return any(isinstance(c, tuple) for row in self.assignment for c in row)

    # -- queries -------------------------------------------------------------------------------
    def workers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        """Workers holding ``expert`` of ``layer`` (one entry unless replicated)."""
        c = self.assignment[layer][expert]
        return c if isinstance(c, tuple) else (c,)

    def local_experts(self, worker: int) -> list[list[int]]:
        """Per layer, the experts held by ``worker``."""
        return [[e for e, c in enumerate(row) if worker in (c if isinstance(c, tuple) else (c,))]
                for row in self.assignment]

    def membership_LEG(self) -> np.ndarray:
        """[L, E, G] bool: does worker g hold expert e of layer l."""
        m = np.zeros((self.num_layers, self.num_experts, self.num_workers), dtype=bool)
        for l, row in enumerate(self.assignment):
            for e, c in enumerate(row):
                m[l, e, list(c) if isinstance(c, tuple) else c] = True
        return m

    def validate_for(self, num_layers: int, num_experts: int, num_workers: int) -> None:
        """Raise PlacementError if this placement was made for a different model or cluster."""
        got = (self.num_layers, self.num_experts, self.num_workers)
        want = (num_layers, num_experts, num_workers)
        if got != want:
            names = ("layers", "experts", "workers")
            diff = ", ".join(f"{n}: placement has {g}, expected {w}" for n, g, w in zip(names, got, want) if g != w)
            raise PlacementError(f"placement does not match this deployment ({diff}); re-run `moeyard place`")

    # -- construction / io ---------------------------------------------------------------------
    @classmethod
    def from_array(cls, worker_LE: np.ndarray, num_workers: int, **kw) -> "Placement":
        """From a [L, E] integer array of worker ids (no replication)."""
        return cls(tuple(tuple(int(w) for w in row) for row in np.asarray(worker_LE)), num_workers, **kw)

    @classmethod
    def from_membership(cls, member_LEG: np.ndarray, **kw) -> "Placement":
        """From a [L, E, G] bool membership array (replicas allowed)."""
        rows = tuple(tuple(tuple(int(g) for g in np.flatnonzero(member_LEG[l, e]))
                           for e in range(member_LEG.shape[1])) for l in range(member_LEG.shape[0]))
        return cls(rows, int(member_LEG.shape[2]), **kw)

    def to_dict(self) -> dict:
        return {"num_workers": self.num_workers, "num_layers": self.num_layers,
                "num_experts": self.num_experts,
                "assignment": [[list(c) if isinstance(c, tuple) else c for c in row] for row in self.assignment],
                "objective": self.objective, "bound": self.bound, "solver": dict(self.solver)}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise (and write to ``path`` if given) as placement.json."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "Placement":
        """Read placement.json from a path, or parse a JSON string."""
        text = os.fspath(source)
        if not text.lstrip().startswith("{"):
            if not os.path.exists(text):
                raise PlacementError(f"placement file not found: {text}")
            with open(text) as f:
                text = f.read()
        try:
            d = json.loads(text)
            p = cls(d["assignment"], int(d["num_workers"]), d.get("objective"), d.get("bound"),
                    d.get("solver") or {})
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise PlacementError(f"malformed placement.json: {exc!r}") from exc
        if (p.num_layers, p.num_experts) != (d.get("num_layers", p.num_layers), d.get("num_experts", p.num_experts)):
            raise PlacementError("placement.json: num_layers/num_experts disagree with the assignment")
        return p

