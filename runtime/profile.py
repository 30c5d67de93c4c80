"""``moeyard profile``: record the routing of real text as a trace (the placement solver's input).

Trace format (``trace.npz``): ``experts[T, L, k]`` int16, ``weights[T, L, k]`` float16, ``token_ids[T]`` int32,
``num_experts``, ``top_k``. L counts MoE layers only.

``moeyard profile --import FILE... --format sglang|vllm --model M --out trace.npz`` converts the routing other
engines record instead (``moeyard.placement.sglang_format`` / ``vllm_format``), checked against M's layers. A
count-only SGLang dump (recorder modes per_pass, stat) carries no per-token routing: it is written as expert
loads (``expert_counts``), which ``moeyard place`` can balance against but not keep tokens local with.
"""

from __future__ import annotations

import numpy as np
import torch


def record_trace(lm, token_ids: list[int], chunk: int = 256) -> dict:
    """Run ``token_ids`` through ``lm.model`` in causal chunks without a cache and record every MoE routing."""
    from ..moe.model import ForwardBatch
    cfg = lm.cfg
    moe_layers = cfg.moe_layers
    col = {l: i for i, l in enumerate(moe_layers)}
    ex_parts, w_parts = [], []
    with torch.inference_mode():
        for s in range(0, len(token_ids), chunk):
            ids = token_ids[s:s + chunk]
            T = len(ids)
            e = np.zeros((T, len(moe_layers), cfg.top_k), np.int16)
            w = np.zeros((T, len(moe_layers), cfg.top_k), np.float16)

            def hook(layer, x, ids_NK, w_NK, e=e, w=w):
                e[:, col[layer]] = ids_NK.cpu().numpy()
                w[:, col[layer]] = w_NK.float().cpu().numpy()

            b = ForwardBatch.blocks(1, T, lm.device)
            b.route_hooks = [hook]
            b.logits_idx = torch.tensor([T - 1], device=lm.device)
            lm.model(torch.tensor(ids, device=lm.device), b)
            ex_parts.append(e)
            w_parts.append(w)
    return {"experts": np.concatenate(ex_parts), "weights": np.concatenate(w_parts),
            "token_ids": np.asarray(token_ids, np.int32), "num_experts": np.int32(cfg.num_experts),
            "top_k": np.int32(cfg.top_k), "layers": np.asarray(moe_layers, np.int32)}


def cmd_import(args) -> None:
    from ..placement.affinity import save_load_counts
    from ..placement.cli import model_layout
    from ..placement.sglang_format import ImportedCounts, import_sglang_dump
    from ..placement.trace import save_trace
    from ..placement.vllm_format import import_vllm_routed
    layout = model_layout(args.model)
    reader = import_sglang_dump if args.format == "sglang" else import_vllm_routed
    got = reader(args.imports, layout)
    if isinstance(got, ImportedCounts):
        save_load_counts(args.out, got.counts_LE, got.top_k)
        print(f"wrote {args.out}: expert loads of {got.counts_LE.shape[0]} MoE layers from a count-only SGLang "
              f"dump (mode {got.mode}); it has no per-token routing, so no layer-to-layer transitions: record "
              f"with --expert-distribution-recorder-mode per_token for an affinity placement")
        return
    save_trace(got, args.out)
    print(f"wrote {args.out}: {got.num_tokens} tokens x {got.num_layers} MoE layers x top-{got.top_k} "
          f"from {args.format}")


def cmd_profile(args):
    import os
    from ..moe.errors import MoeyardError
    if args.imports:
        if args.text:
            raise MoeyardError("give --text (record with moeyard) or --import (convert an engine's file), not both")
        return cmd_import(args)
    if not args.text:
        raise MoeyardError("profile needs --text (a text file to record) or --import (an engine's routing file)")
    from ..moe.loader import load_model
    if not os.path.isfile(args.text):
        raise MoeyardError(f"text file not found: {args.text}")
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise MoeyardError(f"{lm.path} has no tokenizer.json: cannot tokenise {args.text}")
    with open(args.text, encoding="utf-8", errors="replace") as f:
        ids = lm.tokenizer.encode(f.read())[: args.tokens]
    if not ids:
        raise MoeyardError(f"{args.text} is empty")
    trace = record_trace(lm, ids, min(args.chunk, lm.cfg.max_position_embeddings))
    np.savez_compressed(args.out, **trace)
    print(f"wrote {args.out}: {len(ids)} tokens × {trace['experts'].shape[1]} MoE layers × top-{lm.cfg.top_k}")


def register(sub):
    p = sub.add_parser("profile", help="record the routing of a text file as trace.npz, or import an engine's")
    p.add_argument("--model", default="default", help="checkpoint directory, or 'default' for the embedded model")
    p.add_argument("--text", default=None, help="UTF-8 text file whose tokens are run through the model")
    p.add_argument("--import", dest="imports", nargs="+", default=None, metavar="FILE",
                   help="routing recorded by another engine: SGLang recorder dumps (.pt) or vLLM routed experts")
    p.add_argument("--format", choices=["sglang", "vllm"], default="sglang", help="engine of the --import files")
    p.add_argument("--tokens", type=int, default=20000, help="at most this many tokens of --text (default 20000)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward pass (default 256; capped by the "
                   "model's context)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--out", required=True, help="where to write the trace (.npz: experts [T, L_moe, k])")
    p.set_defaults(func=cmd_profile)
