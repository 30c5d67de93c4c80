"""``moeyard profile``: record the routing of real text as a trace (the placement solver's input).

Trace format (``trace.npz``): ``experts[T, L, k]`` int16, ``weights[T, L, k]`` float16, ``token_ids[T]`` int32,
``num_experts``, ``top_k``. L counts MoE layers only.
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


def cmd_profile(args):
    import os
    from ..moe.errors import MoeyardError
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
    p = sub.add_parser("profile", help="record the routing of a text file as trace.npz")
    p.add_argument("--model", default="default")
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_profile)
