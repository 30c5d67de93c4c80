"""SGLang's file formats: the expert location it starts from, and its expert-distribution recorder dumps.

Glossary (SGLang's words)
  logical expert   an expert of the model (our expert id)
  physical expert  a slot holding one copy of a logical expert; GPU g holds slots g*S .. g*S+S-1 with
                   S = P / ep_size, so GPU = our worker, and P - E copies are "redundant experts" (replicas)
  physical_to_logical_map  [num_layers][P] logical expert of every slot, one row per decoder layer (dense
                   layers included; SGLang ignores their rows)

Expert location (``--init-expert-location FILE``): SGLang reads ``.json`` (or ``.pt``) as a dict and passes
its entries as keyword arguments to ``ExpertLocationMetadata.init_by_mapping``, so the file must hold exactly
one key, ``physical_to_logical_map``; the server also needs ``--ep-num-redundant-experts P - E``.

Recorder dumps (``--expert-distribution-recorder-mode``, ``/dump_expert_distribution_record``; files
``expert_distribution_recorder_*.pt`` written with ``torch.save``):
  per_token   {"records": [{"topk_ids_of_layer": [num_layers, T, 8] physical ids, -1 where a layer routed
              nothing (dense layers, slots beyond top-k), "input_ids": [T], ...}, ...],
              "last_physical_to_logical_map": [num_layers, P]}; one file per rank
  per_pass    the same without ``topk_ids_of_layer``: per forward pass only ``global_physical_count``
              [num_layers, P]; counts only
  stat        {"logical_count": [passes, num_layers, E] (older versions [num_layers, E]), ...}; counts only,
  stat_approx summed over ranks, written by rank 0
Only per_token dumps say which experts one token visited in consecutive layers; the count modes give expert
loads and nothing about transitions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import PlacementError
from .layout import ModelLayout
from .placement import Placement
from .trace import Trace

KEY = "physical_to_logical_map"


# -- expert location ---------------------------------------------------------------------------------------

def sglang_location(placement: Placement, layout: ModelLayout) -> dict:
    """``{"physical_to_logical_map": [num_layers][P]}`` for ``placement`` (one row per MoE layer of ``layout``).

    Worker g's experts fill slots g*S .. g*S+S-1 in increasing expert id; dense layers get the trivial row
    (slot p holds expert p mod E). Raises PlacementError unless every layer has the same P copies and every
    worker S = P / G of them, as SGLang requires.
    """
    layout.check_moe_shape(placement.num_layers, placement.num_experts, "placement")
    m_LEG = placement.membership_LEG()
    E, G = placement.num_experts, placement.num_workers
    per_LG = m_LEG.sum(1)
    P_L = per_LG.sum(1)
    P = int(P_L[0])
    if (P_L != P).any():
        l = int(np.flatnonzero(P_L != P)[0])
        raise PlacementError(f"cannot export for SGLang: MoE layer {l} has {int(P_L[l])} physical experts, layer 0 "
                             f"has {P}; SGLang uses one count for every layer")
    if P % G:
        raise PlacementError(f"cannot export for SGLang: {G} workers do not divide the {P} physical experts per "
                             f"layer ({E} experts + {P - E} replicas); SGLang gives every GPU the same number")
    S = P // G
    if (per_LG != S).any():
        l, g = (int(v) for v in np.argwhere(per_LG != S)[0])
        raise PlacementError(f"cannot export for SGLang: worker {g} holds {int(per_LG[l, g])} experts of MoE layer "
                             f"{l}; SGLang needs {S} on each of the {G} workers")
    row_of = {d: i for i, d in enumerate(layout.moe_layers)}
    trivial = (np.arange(P) % E).tolist()
    rows = []
    for d in range(layout.num_layers):
        if d not in row_of:
            rows.append(trivial)
            continue
        m_EG = m_LEG[row_of[d]]
        rows.append([int(e) for g in range(G) for e in np.flatnonzero(m_EG[:, g])])
    return {KEY: rows}


def write_sglang_location(placement: Placement, layout: ModelLayout, path: str | os.PathLike) -> int:
    """Write the expert-location JSON; returns the redundant experts per layer SGLang must be started with."""
    d = sglang_location(placement, layout)
    with open(path, "w") as f:
        json.dump(d, f)
        f.write("\n")
    return len(d[KEY][0]) - placement.num_experts


def read_sglang_location(source: str | os.PathLike | dict, num_workers: int, layout: ModelLayout) -> Placement:
    """Placement from an SGLang expert-location file (or its parsed dict) for ``num_workers`` GPUs (ep size)."""
    where = "expert location" if isinstance(source, dict) else os.fspath(source)
    d = source if isinstance(source, dict) else _load_location(where)
    if KEY not in d:
        hint = (" (a logical_count file: SGLang computes its own placement from it at start-up)"
                if "logical_count" in d else "")
        raise PlacementError(f"{where}: no '{KEY}' entry (found {sorted(d)}){hint}")
    try:
        map_DP = np.asarray(_to_numpy(d[KEY]), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise PlacementError(f"{where}: '{KEY}' is not a rectangular integer table ({exc})") from None
    if map_DP.ndim != 2:
        raise PlacementError(f"{where}: '{KEY}' must be [layers, physical experts], got shape {map_DP.shape}")
    D, P = map_DP.shape
    E, G = layout.num_experts, int(num_workers)
    if D != layout.num_layers:
        raise PlacementError(f"{where}: {D} layers, but {layout.describe()}")
    if G < 1 or P % G:
        raise PlacementError(f"{where}: {G} workers do not divide the {P} physical experts per layer")
    moe_DP = map_DP[list(layout.moe_layers)]
    if moe_DP.min() < 0 or moe_DP.max() >= E:
        raise PlacementError(f"{where}: logical expert ids must lie in [0, {E}), found {int(moe_DP.max())} "
                             f"(or a negative id); {layout.describe()}")
    S = P // G
    L = layout.num_moe_layers
    copies_LEG = np.zeros((L, E, G), dtype=np.int64)
    np.add.at(copies_LEG, (np.arange(L)[:, None], moe_DP, (np.arange(P) // S)[None, :]), 1)
    if (copies_LEG > 1).any():
        l, e, g = (int(v) for v in np.argwhere(copies_LEG > 1)[0])
        raise PlacementError(f"{where}: expert {e} of MoE layer {l} sits twice on GPU {g}; a worker holds one copy")
    if (copies_LEG.sum(-1) == 0).any():
        l, e = (int(v) for v in np.argwhere(copies_LEG.sum(-1) == 0)[0])
        raise PlacementError(f"{where}: expert {e} of MoE layer {l} has no physical slot")
    return Placement.from_membership(copies_LEG > 0, solver={"policy": "sglang", "source": where})


def _load_location(path: str) -> dict:
    if not os.path.exists(path):
        raise PlacementError(f"expert location file not found: {path}")
    if path.endswith(".pt"):
        d = _torch_load(path)
    else:
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlacementError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise PlacementError(f"{path}: expected a dict with '{KEY}', got {type(d).__name__}")
    return d


# -- recorder dumps ----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ImportedCounts:
    """Expert loads from a count-only dump: counts_LE [L, E] routed (token, slot) pairs per MoE layer."""

    counts_LE: np.ndarray
    top_k: int
    mode: str


def import_sglang_dump(paths, layout: ModelLayout) -> Trace | ImportedCounts:
    """Trace (per_token dumps) or expert loads (per_pass / stat dumps) from recorder files of one recording.

    Several per_token files (ranks under data-parallel attention) are concatenated; count files are summed.
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise PlacementError("no SGLang dump files given")
    parts, counts, modes = [], None, set()
    for path in paths:
        d = _torch_load(path)
        if not isinstance(d, dict) or not ({"records", "logical_count"} & set(d)):
            found = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise PlacementError(f"{path}: not an SGLang expert-distribution dump (no 'records' or "
                                 f"'logical_count'; found {found})")
        if "logical_count" in d:
            modes.add("stat")
            c = _stat_counts(path, d, layout)
        elif d["records"] and "topk_ids_of_layer" in d["records"][0]:
            modes.add("per_token")
            parts.append(_per_token(path, d, layout))
            continue
        else:
            modes.add("per_pass")
            c = _per_pass_counts(path, d, layout)
        counts = c if counts is None else counts + c
    if len(modes) > 1:
        raise PlacementError(f"SGLang dumps of different recorder modes given together: {sorted(modes)}")
    if counts is not None:
        return ImportedCounts(counts, layout.top_k, modes.pop())
    ex = [p[0] for p in parts if len(p[0])]
    if not ex:
        raise PlacementError(f"{', '.join(paths)}: the dump holds no routed tokens")
    ids = [p[1] for p in parts if len(p[0])]
    return Trace(np.concatenate(ex), layout.num_experts, None, np.concatenate(ids))


def _per_token(path, d, layout):
    """(experts [T, L, k] logical ids, input ids [T]) of one per_token dump; tokens missing a route are dropped."""
    map_DP = _map(path, d, layout)
    k, moe = layout.top_k, list(layout.moe_layers)
    ex, ids = [], []
    for r, rec in enumerate(d["records"]):
        top_DTc = np.asarray(_to_numpy(rec["topk_ids_of_layer"]), dtype=np.int64)
        if top_DTc.ndim != 3 or top_DTc.shape[0] != layout.num_layers:
            raise PlacementError(f"{path}: record {r} routes {top_DTc.shape[0] if top_DTc.ndim else 0} layers "
                                 f"(topk_ids_of_layer shape {top_DTc.shape}), but {layout.describe()}")
        if top_DTc.shape[1] == 0:
            continue
        if top_DTc.shape[2] < k or (top_DTc[moe, :, k:] >= 0).any():
            raise PlacementError(f"{path}: record {r} routes a different number of experts per token than the "
                                 f"top-{k} of the model; {layout.describe()}")
        phys_LTk = top_DTc[moe, :, :k]
        keep_T = (phys_LTk >= 0).all(axis=(0, 2))
        phys_LTk = phys_LTk[:, keep_T]
        if phys_LTk.size and phys_LTk.max() >= map_DP.shape[1]:
            raise PlacementError(f"{path}: record {r} names physical expert {int(phys_LTk.max())}, the map has "
                                 f"{map_DP.shape[1]}")
        logical_LTk = map_DP[moe][np.arange(len(moe))[:, None, None], phys_LTk]
        ex.append(logical_LTk.transpose(1, 0, 2))
        ids.append(np.asarray(rec.get("input_ids", np.full(len(keep_T), -1)), dtype=np.int64)[keep_T])
    if not ex:
        return np.zeros((0, len(moe), k), np.int64), np.zeros(0, np.int64)
    return np.concatenate(ex), np.concatenate(ids)


def _per_pass_counts(path, d, layout):
    map_DP = _map(path, d, layout)
    phys_DP = sum(np.asarray(_to_numpy(rec["global_physical_count"]), dtype=np.float64) for rec in d["records"])
    if np.ndim(phys_DP) != 2 or phys_DP.shape != map_DP.shape:
        raise PlacementError(f"{path}: global_physical_count shape {np.shape(phys_DP)} does not match the "
                             f"physical_to_logical_map {map_DP.shape}")
    moe = list(layout.moe_layers)
    counts_LE = np.zeros((len(moe), layout.num_experts))
    np.add.at(counts_LE, (np.arange(len(moe))[:, None], map_DP[moe]), phys_DP[moe])
    return counts_LE


def _stat_counts(path, d, layout):
    c = np.asarray(_to_numpy(d["logical_count"]), dtype=np.float64)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[1] != layout.num_layers or c.shape[2] != layout.num_experts:
        shape = c.shape[1:] if c.ndim == 3 else c.shape
        raise PlacementError(f"{path}: logical_count covers {shape} (layers, experts), but {layout.describe()}")
    return c.sum(0)[list(layout.moe_layers)]


def _map(path, d, layout):
    if "last_physical_to_logical_map" not in d:
        raise PlacementError(f"{path}: missing 'last_physical_to_logical_map' (found {sorted(d)})")
    map_DP = np.asarray(_to_numpy(d["last_physical_to_logical_map"]), dtype=np.int64)
    if map_DP.ndim != 2 or map_DP.shape[0] != layout.num_layers:
        raise PlacementError(f"{path}: physical_to_logical_map has shape {map_DP.shape} ({map_DP.shape[0]} layers), "
                             f"but {layout.describe()}")
    E_dump = int(map_DP[list(layout.moe_layers)].max()) + 1
    if E_dump != layout.num_experts:
        raise PlacementError(f"{path}: the dump's model has {E_dump} experts per layer, but {layout.describe()}")
    return map_DP


def _to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else x


def _torch_load(path: str):
    if not os.path.exists(path):
        raise PlacementError(f"SGLang file not found: {path}")
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # not a torch file, or pickled objects weights_only refuses
        raise PlacementError(f"{path}: cannot read as a torch.save file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
