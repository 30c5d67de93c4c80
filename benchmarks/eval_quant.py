"""Accuracy of the weight-only quantized modes (issue 18): perplexity on held-out text and greedy agreement.

    .venv/bin/python benchmarks/eval_quant.py [--models default,deepseek-mini] [--tokens 16384] [--record]

1. Perplexity on the validation split of the shared corpus (last 5% of each domain, ``tools/corpus.py``), windows
   of 256 tokens, the first ``--tokens`` tokens of each domain, for the unquantized plan and int8 / int4, every
   product in the arithmetic of decode (the native kernel at any row count, ``compute.KERNEL_MAX_ROWS`` lifted:
   int8 / int4 weights meet int8 activations in blocks of 32; ``--prefill-arithmetic`` keeps the engine's prefill
   path, which dequantizes above 16 rows);
2. greedy agreement with the unquantized model over the first 32 generated tokens of 64 prompts (16 tokens of
   held-out text each, 16 per domain): the fraction of positions equal, and of sequences equal throughout.
An embedded model that is not there yet (deepseek-mini before it is trained) is reported as missing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tools"))


def perplexity(lm, streams: dict, seq_len: int) -> float:
    from eval_model import val_loss
    tot = cnt = 0
    for ids in streams.values():
        loss, n, _ = val_loss(lm, ids, seq_len)
        tot += loss * n
        cnt += n
    return math.exp(tot / cnt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,deepseek-mini")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens per domain for perplexity")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-arithmetic", action="store_true",
                    help="perplexity through the engine's prefill path (dequantize above 16 rows) instead of decode's")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from corpus import DOMAINS, encode_stream
    from tokenizers import Tokenizer
    from common import record, table
    from moeyard.moe import compute
    from moeyard.moe.errors import ModelError
    from moeyard.moe.loader import load_model, resolve_model_path
    from moeyard.runtime import LLM, SamplingParams
    rows, notes = [], []
    t0 = time.time()
    for name in a.models.split(","):
        try:
            path = resolve_model_path(name)
        except ModelError as e:
            notes.append(f"`{name}`: not measured ({e})")
            continue
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        streams = {d: encode_stream(tok, d, "val")[:a.tokens + 1] for d in DOMAINS}
        per = max(1, a.prompts // len(DOMAINS))
        prompts = [streams[d][i * 97:(i * 97) + 16].tolist() for d in DOMAINS for i in range(per)][:a.prompts]
        sp = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)
        ref = None
        for q in (None, "int8", "int4"):
            lm = load_model(path, quantization=q)
            rows_max = compute.KERNEL_MAX_ROWS
            if not a.prefill_arithmetic:
                compute.KERNEL_MAX_ROWS = 1 << 30
            try:
                ppl = perplexity(lm, streams, 256)
            finally:
                compute.KERNEL_MAX_ROWS = rows_max
            del lm
            llm = LLM(path, quantization=q, threads=a.threads, max_num_seqs=16, max_model_len=256)
            outs = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
            plan = llm.stats()["compute_experts"]
            llm.close()
            if q is None:
                ref, ppl0 = outs, ppl
                rows.append([name, f"unquantized ({plan})", f"{ppl:.3f}", "—", "—", "—"])
                continue
            pos = sum(x == y for o, r in zip(outs, ref) for x, y in zip(o, r)) / sum(len(r) for r in ref)
            prefix = np.mean([next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), len(r))
                              for o, r in zip(outs, ref)])
            seqs = sum(o == r for o, r in zip(outs, ref)) / len(ref)
            rows.append([name, q, f"{ppl:.3f}", f"{100 * (ppl / ppl0 - 1):+.2f}%", f"{100 * pos:.1f}% ({prefix:.1f} tok)",
                         f"{100 * seqs:.0f}%"])
            print(rows[-1], flush=True)
    body = (f"Perplexity: validation split of the shared corpus (`tools/corpus.py`, last 5% of each of "
            f"{', '.join(DOMAINS)}), first {a.tokens} tokens per domain, windows of 256 tokens, "
            f"{'the engine prefill path (dequantize above 16 rows)' if a.prefill_arithmetic else 'every product in decode arithmetic (native kernel at any row count; activations ' + compute.plan_for(None, torch.float32, torch.device('cpu'), 'int8').activations + ' for int8 / int4)'}. Greedy agreement: "
            f"{a.prompts} prompts of 16 held-out tokens ({a.prompts // len(DOMAINS)} per domain), first "
            f"{a.new_tokens} generated tokens compared position by position with the unquantized plan "
            f"(mean length of the identical prefix in brackets), and whole sequences.\n\n"
            + table(["model", "weights", "perplexity", "vs unquantized", "tokens agreeing", "sequences identical"],
                    rows)
            + ("\n\n" + "\n".join(notes) if notes else "") + f"\n\n({time.time() - t0:.0f} s)")
    print(body)
    if a.record:
        record("Engine speed: quantized accuracy", "python benchmarks/eval_quant.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
