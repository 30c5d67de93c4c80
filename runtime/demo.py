"""``moeyard demo``: continue one prompt per domain with the default model and summarise its routing."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

DOMAIN_PROMPTS = {
    "arxiv": "\\begin{theorem}\nLet $f$ be a continuous function on",
    "github": "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "wikipedia": "The city is located on the",
    "c4": "Our team is happy to help you find the",
}


def routing_summary(experts_TLK: np.ndarray, num_experts: int, top: int = 3) -> list[str]:
    """Expert load max/mean per layer and the strongest inter-layer transitions."""
    T, L, K = experts_TLK.shape
    lines = []
    for l in range(L):
        load = np.bincount(experts_TLK[:, l].ravel(), minlength=num_experts)
        lines.append(f"  layer {l}: load max/mean {load.max() / max(load.mean(), 1e-9):.2f}, "
                     f"busiest expert {int(load.argmax())}")
    pairs = []
    for l in range(L - 1):
        c = np.zeros((num_experts, num_experts))
        for a in range(K):
            for b in range(K):
                np.add.at(c, (experts_TLK[:, l, a], experts_TLK[:, l + 1, b]), 1)
        p = c / np.maximum(c.sum(1, keepdims=True), 1)
        i, j = np.unravel_index(np.argmax(p * (c.sum(1, keepdims=True) >= 4)), p.shape)
        pairs.append((p[i, j], l, i, j))
    pairs.sort(reverse=True)
    lines.append("  strongest inter-layer affinities P(j at l+1 | i at l):")
    for pr, l, i, j in pairs[:top]:
        lines.append(f"    layer {l} expert {i} -> layer {l + 1} expert {j}: {pr:.2f} (uniform {1 / num_experts:.3f})")
    return lines


def run_demo(args):
    from . import LLM, SamplingParams
    from .cli import mode_options
    llm = LLM(args.model, mode=args.mode, dtype=args.dtype, quantization=args.quantization, threads=args.threads,
              **mode_options(args.option))
    records = []

    def hook(layer, x, ids_NK, w_NK):
        records.append((layer, ids_NK.cpu().numpy()))

    ex = llm.engine.executor
    group = getattr(ex, "group", None)          # ray mode: the workers record the routing, not the driver
    if group is not None and getattr(ex, "scheme", None) == "standard":
        import ray
        ray.get([a.start_recording.remote() for a in group.actors], timeout=60)
    elif hasattr(ex, "route_hooks"):
        ex.route_hooks.append(hook)
    print(f"moeyard demo — model {os.path.basename(llm.path.rstrip('/'))} ({llm.cfg.model_type}, "
          f"{llm.cfg.num_layers} layers, {llm.cfg.num_experts} experts, top-{llm.cfg.top_k}), mode {args.mode}\n")
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate(list(DOMAIN_PROMPTS.values()), sp)
    dt = time.perf_counter() - t0
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")   # no ANSI codes into files/pipes
    for (dom, prompt), o in zip(DOMAIN_PROMPTS.items(), outs):
        print(f"--- {dom} ---\n{prompt}{bold}{o.text}{plain}\n")
    ntok = sum(len(o.token_ids) for o in outs)
    print(f"{ntok} tokens in {dt:.2f}s: {ntok / dt:.1f} tokens/s (batch of {len(outs)})")
    trace = None
    if group is not None and getattr(ex, "scheme", None) == "standard":
        import ray
        parts = [p for p in ray.get([a.take_trace.remote() for a in group.actors], timeout=60) if p is not None]
        trace = np.concatenate(parts) if parts else None
    elif records:
        moe_layers = sorted({l for l, _ in records})
        per_layer = {l: np.concatenate([r for ll, r in records if ll == l]) for l in moe_layers}
        T = min(len(v) for v in per_layer.values())
        trace = np.stack([per_layer[l][:T] for l in moe_layers], axis=1)
    if trace is not None and len(trace):
        print("\nrouting of the demo tokens:")
        print("\n".join(routing_summary(trace, llm.cfg.num_experts)))
    else:
        print(f"\n(no routing summary: mode {args.mode} with this scheme does not report routing to the driver)")
    llm.close()
