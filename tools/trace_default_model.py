"""Record the routing trace of a checkpoint on the validation split of every corpus domain.

    .venv/bin/python tools/trace_default_model.py --model runs/default_model/final --out moe/default_model/trace.npz

Fields: ``experts[T, L, K]`` int16, ``weights[T, L, K]`` float16 (normalised top-k gate weights),
``token_ids[T]`` int32, ``domain[T]`` int8 indexing ``domains``, ``position[T]`` int16 (position in its window),
``num_experts``, ``top_k``, ``seq_len``. Tokens are the first ``--tokens-per-domain`` validation tokens of each
domain, run as independent windows of ``--seq-len`` tokens (no KV cache).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import DOMAINS, encode_stream  # noqa: E402

from moeyard.moe.loader import load_model  # noqa: E402
from moeyard.moe.model import ForwardBatch  # noqa: E402


@torch.no_grad()
def trace(lm, ids: np.ndarray, seq_len: int, batch: int = 8):
    """(experts [T, L, K], weights [T, L, K]) for ``ids`` cut into windows of ``seq_len`` (tail dropped)."""
    n = len(ids) // seq_len
    L = len(lm.cfg.moe_layers)
    ex, wt = [], []
    for i in range(0, n, batch):
        B = min(batch, n - i)
        x = torch.from_numpy(ids[i * seq_len:(i + B) * seq_len].astype(np.int64))
        rec: dict[int, tuple] = {}
        fb = ForwardBatch.blocks(B, seq_len, "cpu")
        fb.route_hooks.append(lambda layer, x_ND, ids_NK, w_NK: rec.__setitem__(layer, (ids_NK, w_NK)))
        lm.model.hidden(x, fb)
        ex.append(torch.stack([rec[l][0] for l in lm.cfg.moe_layers], 1).to(torch.int16))
        wt.append(torch.stack([rec[l][1].float() for l in lm.cfg.moe_layers], 1).to(torch.float16))
    assert ex and ex[0].shape[1] == L
    return torch.cat(ex).numpy(), torch.cat(wt).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens-per-domain", type=int, default=12288)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_model(a.model, dtype="float32", device="cpu")
    tok = lm.tokenizer._tok
    E, K = lm.cfg.num_experts, lm.cfg.top_k
    parts = {k: [] for k in ("experts", "weights", "token_ids", "domain", "position")}
    for d_i, d in enumerate(DOMAINS):
        ids = encode_stream(tok, d, "val")[:a.tokens_per_domain]
        ids = ids[:len(ids) // a.seq_len * a.seq_len]
        ex, wt = trace(lm, ids, a.seq_len)
        parts["experts"].append(ex)
        parts["weights"].append(wt)
        parts["token_ids"].append(ids.astype(np.int32))
        parts["domain"].append(np.full(len(ids), d_i, dtype=np.int8))
        parts["position"].append(np.tile(np.arange(a.seq_len, dtype=np.int16), len(ids) // a.seq_len))
        print(f"{d}: {len(ids)} tokens", flush=True)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out.update(num_experts=np.int32(E), top_k=np.int32(K), seq_len=np.int32(a.seq_len),
               domains=np.array(DOMAINS))
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **out)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: T={len(out['token_ids'])}, L={out['experts'].shape[1]}, E={E}, K={K}")


if __name__ == "__main__":
    main()
