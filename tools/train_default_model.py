"""Train the embedded default model: a small Mixtral-architecture MoE LM, with the project's own model code.

    .venv/bin/python tools/train_default_model.py --run-dir runs/default_model --time-budget-minutes 60

Resumes from ``<run-dir>/ckpt.pt`` when present. Stops at ``--steps`` or when the time budget runs out (the cosine
schedule follows whichever is nearer, so the learning rate has decayed either way), then writes the final
Hugging Face-format checkpoint (bf16) to ``<run-dir>/final`` together with the tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import DOMAINS, EOT, encode_stream  # noqa: E402

from moeyard.moe.config import MoEConfig  # noqa: E402
from moeyard.moe.experts import ParamExperts  # noqa: E402
from moeyard.moe.model import ForwardBatch, MoEForCausalLM  # noqa: E402
from moeyard.moe.save import mixtral_config_dict, save_mixtral  # noqa: E402


def log(msg, f=None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights(model: MoEForCausalLM, cfg: MoEConfig, std: float = 0.02):
    """GPT-2-style init: normal(0, std), residual output projections scaled by 1/sqrt(2L), norms 1."""
    out_std = std / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.startswith("experts."):
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith("o_proj.weight"):
            torch.nn.init.normal_(p, 0.0, out_std)
        else:
            torch.nn.init.normal_(p, 0.0, std)
    with torch.no_grad():
        for p in (*model.experts.gate, *model.experts.up):
            p.normal_(0.0, std)
        for p in model.experts.down:
            p.normal_(0.0, out_std)


def load_balance_loss(router_logits: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e (mean over layers), and the router z-loss."""
    lb, z = 0.0, 0.0
    for lg in router_logits:
        E = lg.shape[-1]
        probs = torch.softmax(lg.float(), dim=-1)
        top = torch.topk(probs, k, dim=-1).indices
        f = torch.zeros(E, device=lg.device).scatter_add_(0, top.reshape(-1), torch.ones(top.numel(), device=lg.device)) / top.numel()
        lb = lb + E * (f * probs.mean(0)).sum()
        z = z + torch.logsumexp(lg.float(), dim=-1).pow(2).mean()
    n = len(router_logits)
    return lb / n, z / n


class Data:
    """Random windows of T+1 tokens from the concatenated training streams."""

    def __init__(self, tok, seed: int):
        self.streams = {d: encode_stream(tok, d, "train") for d in DOMAINS}
        self.val = {d: encode_stream(tok, d, "val") for d in DOMAINS}
        self.train = np.concatenate([self.streams[d] for d in DOMAINS])
        self.rng = np.random.default_rng(seed)

    def batch(self, B: int, T: int) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.train) - T - 1, size=B)
        return torch.from_numpy(np.stack([self.train[s:s + T + 1] for s in starts]).astype(np.int64))

    def val_batches(self, T: int, per_domain: int):
        """Fixed, evenly spaced validation windows per domain."""
        out = {}
        for d, s in self.val.items():
            n = min(per_domain, (len(s) - 1) // T)
            starts = np.linspace(0, len(s) - T - 1, n).astype(int)
            out[d] = torch.from_numpy(np.stack([s[i:i + T + 1] for i in starts]).astype(np.int64))
        return out


def lm_loss(model, x_BT1: torch.Tensor) -> torch.Tensor:
    B, T1 = x_BT1.shape
    T = T1 - 1
    inp, tgt = x_BT1[:, :-1], x_BT1[:, 1:]
    logits = model(inp.reshape(-1), ForwardBatch.blocks(B, T, "cpu"))
    return F.cross_entropy(logits, tgt.reshape(-1))


@torch.no_grad()
def evaluate(model, vb: dict, B: int = 8) -> dict:
    model.eval()
    res = {}
    for d, x in vb.items():
        tot, n = 0.0, 0
        for i in range(0, len(x), B):
            xb = x[i:i + B]
            tot += float(lm_loss(model, xb)) * len(xb)
            n += len(xb)
        res[d] = tot / n
    model.train()
    return res


def lr_at(progress: float, step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(max(progress, 0.0), 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/default_model")
    ap.add_argument("--tokenizer-dir", default=None, help="default: <run-dir>/tokenizer")
    ap.add_argument("--time-budget-minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=224)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--bench-steps", type=int, default=0, help="run this many steps, report tokens/s, exit")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    seed_all(a.seed)
    from tokenizers import Tokenizer
    tok_dir = a.tokenizer_dir or os.path.join(a.run_dir, "tokenizer")
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    V = tok.get_vocab_size()
    eos = tok.token_to_id(EOT)

    cfg_dict = mixtral_config_dict(vocab_size=V, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                                   num_kv_heads=a.kv_heads, num_experts=a.experts, top_k=a.top_k,
                                   intermediate_size=a.ffn, max_position_embeddings=1024, eos_token_id=eos,
                                   bos_token_id=None)
    cfg_dict["router_aux_loss_coef"] = a.aux_coef
    cfg = MoEConfig.from_dict(cfg_dict)
    model = MoEForCausalLM(cfg, max_positions=1024)
    model.experts = ParamExperts(cfg)
    init_weights(model, cfg)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"config: {json.dumps({k: cfg_dict[k] for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'num_local_experts', 'num_experts_per_tok', 'intermediate_size')})}")
    log(f"params {nparams / 1e6:.2f}M ({nparams * 2 / 2**20:.1f} MiB in bf16)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    data = Data(tok, a.seed)
    log(f"train tokens {len(data.train):,}; val tokens " + ", ".join(f"{d} {len(s):,}" for d, s in data.val.items()))
    vb = data.val_batches(a.seq_len, per_domain=6)

    os.makedirs(a.run_dir, exist_ok=True)
    ck_path = os.path.join(a.run_dir, "ckpt.pt")
    step, elapsed_prev, tokens = 0, 0.0, 0
    if os.path.isfile(ck_path) and not a.bench_steps:
        ck = torch.load(ck_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed_prev, tokens = ck["step"], ck["elapsed"], ck["tokens"]
        data.rng = ck["data_rng"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed from step {step} ({elapsed_prev / 60:.1f} min, {tokens:,} tokens)")

    def save_ckpt():
        tmp = ck_path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed_prev + time.time() - t0, "tokens": tokens, "data_rng": data.rng,
                    "torch_rng": torch.get_rng_state(), "args": vars(a)}, tmp)
        os.replace(tmp, ck_path)

    budget = a.time_budget_minutes * 60
    t0 = time.time()
    last_ck = t0
    tl = time.time()
    acc = {"loss": 0.0, "aux": 0.0, "z": 0.0, "n": 0}
    while step < a.steps:
        elapsed = elapsed_prev + time.time() - t0
        if elapsed >= budget:
            log("time budget reached")
            break
        progress = max(step / a.steps, elapsed / budget)
        lr = lr_at(progress, step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        x = data.batch(a.batch_size, a.seq_len)
        loss = lm_loss(model, x)
        aux, z = load_balance_loss(model.router_logits(), cfg.top_k)
        total = loss + a.aux_coef * aux + a.z_coef * z
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        step += 1
        tokens += x.shape[0] * a.seq_len
        acc["loss"] += loss.item(); acc["aux"] += aux.item(); acc["z"] += z.item(); acc["n"] += 1
        if step % a.log_every == 0 or step == a.bench_steps:
            dt = time.time() - tl
            n = acc["n"]
            log(f"step {step} loss {acc['loss'] / n:.4f} aux {acc['aux'] / n:.4f} z {acc['z'] / n:.2f} "
                f"gnorm {float(gn):.2f} lr {lr:.2e} tok/s {n * x.shape[0] * a.seq_len / dt:.0f} "
                f"tokens {tokens:,} elapsed {(elapsed_prev + time.time() - t0) / 60:.1f}m")
            acc = {"loss": 0.0, "aux": 0.0, "z": 0.0, "n": 0}
            tl = time.time()
        if a.bench_steps and step >= a.bench_steps:
            return
        if step % a.eval_every == 0:
            ev = evaluate(model, vb)
            log("val " + " ".join(f"{d} {v:.3f}" for d, v in ev.items()) + f" mean {np.mean(list(ev.values())):.3f}")
        if time.time() - last_ck > a.ckpt_minutes * 60:
            save_ckpt()
            last_ck = time.time()
    save_ckpt()
    ev = evaluate(model, vb)
    log("final val " + " ".join(f"{d} {v:.3f}" for d, v in ev.items()) + f" mean {np.mean(list(ev.values())):.3f}")
    final = os.path.join(a.run_dir, "final")
    save_mixtral(model.state_dict(), model.experts, cfg, cfg_dict, final, dtype=torch.bfloat16)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, fn), os.path.join(final, fn))
    with open(os.path.join(final, "training.json"), "w") as f:
        json.dump({"steps": step, "tokens": tokens, "minutes": (elapsed_prev + time.time() - t0) / 60,
                   "val_loss": ev, "args": vars(a)}, f, indent=2)
    log(f"saved {final}: {step} steps, {tokens:,} tokens")


if __name__ == "__main__":
    main()
