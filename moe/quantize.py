"""Write a checkpoint whose routed experts are weight-only quantized (``moeyard quantize``).

    moeyard quantize SRC DST --quantization int8|int4

Every routed expert matrix [N, K] of SRC becomes what ``moe/compute.py``'s ``pack`` makes of it — int8 per output
channel (``<m>.weight`` int8 [N, K], ``<m>.weight_scale`` float32 [N]) or int4 in groups of 32 along K with float16
scales (``<m>.weight`` uint8 [N, K/2], ``<m>.weight_scale`` float16 [N, K/32]) — a layout that does not depend on
the CPU. ``config.json`` gets ``quantization_config = {"quant_method": "moeyard", "weights": KIND}``. Dense weights,
the tokenizer and other files are copied unchanged. ``LLM`` loads DST in local, offload and Ray modes without
quantizing again: local mode gives the tokens of SRC with ``quantization=KIND`` (the same bytes), and offload mode
reads each expert's few bytes straight into its slot.

File layout: tensors are written in the order given (not safetensors' dtype-then-name order), each expert as one
contiguous run — its three scales (gate, up, down), then its three matrices — so an expert is one read and its slot
holds gate and up as one [2F, K] matrix. Experts are written one tensor per matrix whatever SRC's layout (fused
``gate_up_proj`` sources get ``experts.{e}.gate_proj/up_proj/down_proj``).
"""

from __future__ import annotations

import os

from .checkpoint import CheckpointReader
from .compute import QUANTIZATIONS, check_quantization, pack
from .config import MoEConfig
from .errors import ModelError
from .experts import read_expert
from .quant_formats import packed_scale_name
from .rewrite import OrderedShards, check_destination, finish_copy
from .weights import expert_refs, moe_prefix


def _expert_names(cfg: MoEConfig, reader: CheckpointReader, layer: int, expert: int) -> tuple[str, str, str]:
    """Names of the expert's gate, up and down matrices in DST (one tensor per matrix)."""
    r = expert_refs(cfg, reader, layer, expert)
    if r.gate.index is None:
        return r.gate.name, r.up.name, r.down.name
    e = f"{moe_prefix(cfg, reader, layer)}.experts.{expert}"
    return f"{e}.gate_proj.weight", f"{e}.up_proj.weight", f"{e}.down_proj.weight"


def quantize_checkpoint(src: str, dst: str, kind: str, shard_bytes: int = 1 << 30) -> dict:
    """Write DST, SRC with its routed experts packed as ``kind`` (int8 | int4). Returns a summary."""
    kind = check_quantization(kind)
    if kind is None:
        raise ModelError(f"quantize: --quantization must be one of {', '.join(QUANTIZATIONS)}")
    check_destination("quantize", src, dst)
    cfg = MoEConfig.from_dir(src)
    if cfg.quant.method != "none":
        raise ModelError(f"quantize: {src} is already a {cfg.quant.method} checkpoint; quantize works on unquantized "
                         "weights (bf16/fp16/fp32)")
    if cfg.expert_act != "swiglu" or cfg.model_type == "gpt_oss":
        raise ModelError(f"quantize: architecture {cfg.model_type!r} (experts with biases) is not supported")
    reader = CheckpointReader(src)
    from .validate import validate_checkpoint
    validate_checkpoint(cfg, reader)
    expert_tensors = set()
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            r = expert_refs(cfg, reader, layer, e)
            expert_tensors.update((r.gate.name, r.up.name, r.down.name))
    os.makedirs(dst, exist_ok=True)
    out = OrderedShards(dst, shard_bytes)
    for name in reader.names():
        if name not in expert_tensors:
            out.add_group([(name, reader.get(name))])
    nbytes = 0
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            w = read_expert(cfg, reader, layer, e)
            names = _expert_names(cfg, reader, layer, e)
            ps = [pack(m, kind, n) for m, n in zip((w.gate, w.up, w.down), names)]
            out.add_group([(packed_scale_name(n), p.scale) for n, p in zip(names, ps)]
                          + [(n, p.data) for n, p in zip(names, ps)])
            nbytes = sum(p.nbytes for p in ps)
        reader.close()       # unmap what was read
    total = out.close()
    finish_copy(src, dst, {"quantization_config": {"quant_method": "moeyard", "weights": kind}})
    return {"src": src, "dst": dst, "kind": kind, "bytes": total, "files": len(out.names),
            "expert_mb": round(nbytes / 2**20, 3)}


def cmd_quantize(args):
    from .loader import resolve_model_path
    s = quantize_checkpoint(resolve_model_path(args.src), args.dst, args.quantization)
    print(f"wrote {s['dst']}: routed experts {s['kind']} ({s['expert_mb']} MB each), "
          f"{s['bytes'] / 2**30:.3f} GiB in {s['files']} file(s)")


def register(sub):
    p = sub.add_parser("quantize", help="copy a checkpoint with weight-only int8/int4 routed experts")
    p.add_argument("src", help="checkpoint directory or an embedded model name")
    p.add_argument("dst", help="new directory (must not exist or be empty; not inside SRC)")
    p.add_argument("--quantization", required=True, choices=QUANTIZATIONS, help="int8 | int4")
    p.set_defaults(func=cmd_quantize)
