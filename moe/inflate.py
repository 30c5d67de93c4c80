"""Inflate a checkpoint's experts to a realistic size with outputs unchanged (``moeyard inflate``).

    moeyard inflate SRC DST --expert-intermediate F

Every routed expert of DST is ``F`` wide instead of its own width: the extra gate/up rows are random (drawn with
the source rows' standard deviation), the matching down-projection columns zero, so every byte is read and
multiplied but contributes nothing (silu(g·x)·(u·x) times a zero column is exactly zero). DST routes exactly as
SRC — its routing is SRC's learned routing — while its experts have the megabytes of a real model, for I/O and
engine benchmarks. DeepSeek-V3's shared experts are sized by the same config field and are inflated the same way.
Other tensors and files (tokenizer, ``trace.npz``) are copied unchanged.

Shapes: D hidden, F the source's expert width, G = F' - F extra units, E experts of a fused layer.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .errors import ModelError
from .rewrite import ShardWriter, check_destination, finish_copy
from .weights import expert_refs

# config field holding the routed experts' width, per architecture
WIDTH_FIELD = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "gpt_oss": "intermediate_size",
               "qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size",
               "deepseek_v3": "moe_intermediate_size"}


def _extra_rows(t: torch.Tensor, dim: int, G: int, gen: torch.Generator) -> torch.Tensor:
    """``G`` random slices along ``dim`` with ``t``'s standard deviation, in ``t``'s dtype."""
    shape = list(t.shape)
    shape[dim] = G
    std = float(t.float().std()) if t.numel() > 1 else 0.02
    return (torch.randn(shape, generator=gen) * std).to(t.dtype)


def _zeros(t: torch.Tensor, dim: int, G: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = G
    return t.new_zeros(shape)


def _grow(t: torch.Tensor, dim: int, G: int, gen, zero: bool) -> torch.Tensor:
    return torch.cat((t, _zeros(t, dim, G) if zero else _extra_rows(t, dim, G, gen)), dim=dim)


def _interleaved(t: torch.Tensor, F: int, G: int, gen, zero: bool) -> torch.Tensor:
    """gpt-oss's ``[..., 2F]`` (gate at even, up at odd positions) grown to ``[..., 2(F+G)]``."""
    gate, up = t[..., 0::2], t[..., 1::2]
    gate, up = _grow(gate, -1, G, gen, zero), _grow(up, -1, G, gen, zero)
    return torch.stack((gate, up), dim=-1).flatten(-2)


def plan(cfg: MoEConfig, reader: CheckpointReader) -> dict[str, str]:
    """Tensor name -> how to grow it: "rows" (gate/up: dim -2 random), "cols" (down: dim -1 zero), "fused_gu"
    ([E, 2F, D]: gate rows then up rows), "oss_gu", "oss_gu_bias", "oss_down" ([E, F, D]: dim -2 zero)."""
    how: dict[str, str] = {}
    for layer in cfg.moe_layers:
        r = expert_refs(cfg, reader, layer, 0)
        if cfg.expert_act == "swiglu_oss":
            how.update({r.gate.name: "oss_gu", r.gate_bias.name: "oss_gu_bias", r.down.name: "oss_down"})
        elif r.gate.index is not None:
            how.update({r.gate.name: "fused_gu", r.down.name: "cols"})
        else:
            for e in range(cfg.num_experts):
                r = expert_refs(cfg, reader, layer, e)
                how.update({r.gate.name: "rows", r.up.name: "rows", r.down.name: "cols"})
        if cfg.model_type == "deepseek_v3" and cfg.num_shared_experts:
            p = f"model.layers.{layer}.mlp.shared_experts"
            how.update({f"{p}.gate_proj.weight": "rows", f"{p}.up_proj.weight": "rows",
                        f"{p}.down_proj.weight": "cols"})
    return how


def expert_groups(cfg: MoEConfig, reader: CheckpointReader) -> dict[str, tuple[str, ...]]:
    """Tensor name -> the names of its routed expert's matrices (per-expert tensors only), in checkpoint order."""
    order = {n: i for i, n in enumerate(reader.names())}
    groups: dict[str, tuple[str, ...]] = {}
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            r = expert_refs(cfg, reader, layer, e)
            if r.gate.index is not None:
                break
            names = tuple(sorted({r.gate.name, r.up.name, r.down.name}, key=order.__getitem__))
            groups.update({n: names for n in names})
    return groups


def grow_tensor(t: torch.Tensor, how: str, F: int, G: int, gen: torch.Generator) -> torch.Tensor:
    if how == "rows":
        return _grow(t, -2, G * t.shape[-2] // F, gen, zero=False)   # shared experts: n_shared * F rows
    if how == "cols":
        return _grow(t, -1, G * t.shape[-1] // F, gen, zero=True)
    if how == "fused_gu":
        gate, up = t[:, :F], t[:, F:]
        return torch.cat((_grow(gate, -2, G, gen, False), _grow(up, -2, G, gen, False)), dim=-2)
    if how == "oss_gu":
        return _interleaved(t, F, G, gen, zero=False)
    if how == "oss_gu_bias":
        return _interleaved(t, F, G, gen, zero=True)
    if how == "oss_down":
        return _grow(t, -2, G, gen, zero=True)
    raise AssertionError(how)


def inflate(src: str, dst: str, width: int, seed: int = 0, shard_bytes: int = 1 << 30) -> dict:
    """Write DST, a copy of SRC whose routed experts are ``width`` wide. Returns a summary."""
    check_destination("inflate", src, dst)
    cfg = MoEConfig.from_dir(src)
    if cfg.model_type not in WIDTH_FIELD:
        raise ModelError(f"inflate: architecture {cfg.model_type!r} is not supported; supported: "
                         f"{', '.join(WIDTH_FIELD)}")
    if cfg.quant.method != "none":
        raise ModelError(f"inflate: {src} is a {cfg.quant.method} checkpoint; inflate works on unquantized weights "
                         "(bf16/fp16/fp32)")
    F = cfg.expert_intermediate_size
    if width < F:
        raise ModelError(f"inflate: --expert-intermediate {width} is smaller than the source's expert width {F}")
    G = width - F
    reader = CheckpointReader(src)
    how = plan(cfg, reader)
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(dst, exist_ok=True)
    out = ShardWriter(dst, shard_bytes)
    elem = 2
    groups = expert_groups(cfg, reader)
    done: set[str] = set()
    for name in reader.names():
        if name in done:
            continue
        items = []
        for n in groups.get(name, (name,)):     # an expert's matrices stay in one shard (one run for offload)
            t = reader.get(n)
            if n in how:
                t = grow_tensor(t, how[n], F, G, gen).contiguous()
                elem = t.element_size()
            items.append((n, t))
            done.add(n)
        out.add_group(items)
    total = out.close()
    finish_copy(src, dst, {WIDTH_FIELD[cfg.model_type]: width})
    return {"src": src, "dst": dst, "expert_width": [F, width], "bytes": total, "files": len(out.names),
            "expert_mb": round(3 * cfg.hidden_size * width * elem / 2**20, 2)}


def cmd_inflate(args):
    from .loader import resolve_model_path
    s = inflate(resolve_model_path(args.src), args.dst, args.expert_intermediate, seed=args.seed)
    print(f"wrote {s['dst']}: experts {s['expert_width'][0]} -> {s['expert_width'][1]} wide "
          f"({s['expert_mb']} MB each), {s['bytes'] / 2**30:.2f} GiB in {s['files']} file(s)")


def register(sub):
    p = sub.add_parser("inflate", help="copy a checkpoint with wider experts and identical outputs (benchmarks)")
    p.add_argument("src", help="checkpoint directory or an embedded model name")
    p.add_argument("dst", help="new directory (must not exist or be empty; not inside SRC)")
    p.add_argument("--expert-intermediate", type=int, required=True, metavar="F",
                   help="width of every routed expert in DST (>= the source's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the extra random rows")
    p.set_defaults(func=cmd_inflate)
