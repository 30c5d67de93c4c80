"""Train an embedded model with the project's own model code: the Mixtral-architecture default model
(``--arch mixtral``) or the fine-grained DeepSeek-V3-architecture one (``--arch deepseek_v3``).

    .venv/bin/python tools/train_model.py --run-dir runs/default_model --time-budget-minutes 60
    .venv/bin/python tools/train_model.py --arch deepseek_v3 --run-dir runs/deepseek_mini \
        --tokenizer-dir moe/default_model --time-budget-minutes 150

Experts are stacked per layer and run as grouped matmuls (``ParamExperts``). Mixtral balances with the Switch
auxiliary loss and a router z-loss; DeepSeek-V3 the way DeepSeek-V3 does: an auxiliary-loss-free bias
(``e_score_correction_bias``, moved by ``--bias-rate`` toward the mean load after every step; it changes which
experts are chosen, not their weights) plus a small sequence-wise balance loss (``--seq-aux-coef``).

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
from corpus import DOMAINS, EOT, encode_stream, python_source_ids  # noqa: E402
from routing_stats import affinity, load_imbalance  # noqa: E402

from moeyard.moe.config import MoEConfig  # noqa: E402
from moeyard.moe.experts import ParamExperts  # noqa: E402
from moeyard.moe.model import ForwardBatch, MoEForCausalLM  # noqa: E402
from moeyard.moe.save import deepseek_v3_config_dict, mixtral_config_dict, save_checkpoint  # noqa: E402


def log(msg, f=None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights(model: MoEForCausalLM, cfg: MoEConfig, std: float = 0.02):
    """GPT-2-style init: normal(0, std), residual output projections scaled by 1/sqrt(2L), norms 1, router
    biases 0."""
    out_std = std / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.startswith("experts."):
            continue
        if name.endswith("e_score_correction_bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
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


def sequence_balance_loss(router_logits: list[torch.Tensor], router_ids: list[torch.Tensor], B: int,
                          k: int, threshold: float = 0.0) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_e f_e * P_e per sequence (mean over sequences and layers):
    f_e = E / (K T) * (choices of e in the sequence), P_e = mean over the sequence of e's normalised sigmoid score.
    1.0 when every sequence is balanced. With ``threshold`` t > 0 only the excess load counts, max(0, f_e - t): a
    balanced sequence adds nothing, so the loss pushes only on an expert that takes over a sequence and does not
    flatten the scores of sequences that are already balanced (the plain loss lowers the chosen experts' scores in
    every sequence, which makes routing less decisive)."""
    tot = 0.0
    for lg, ids in zip(router_logits, router_ids):
        N, E = lg.shape
        T = N // B
        s = lg.float().sigmoid()
        P = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        f = torch.zeros(B, E, device=lg.device).scatter_add_(1, ids.reshape(B, T * k),
                                                             torch.ones(B, T * k, device=lg.device)) * (E / (k * T))
        if threshold > 0:
            f = (f - threshold).clamp(min=0.0)
        tot = tot + (f * P).sum(-1).mean()
    return tot / len(router_logits)


@torch.no_grad()
def update_router_bias(model, rate: float) -> float:
    """Aux-loss-free balancing: move every expert's bias by ``rate`` toward the batch's mean load (sign of the
    error, as DeepSeek-V3). Returns the worst max/mean load of the batch over layers."""
    worst = 0.0
    for layer in model.model.layers:
        if not layer.is_moe:
            continue
        gate = layer.mlp.gate
        load = torch.bincount(layer.mlp.last_router_ids.reshape(-1), minlength=gate.E).float()
        gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        worst = max(worst, float(load.max() / load.mean()))
    return worst


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


def lm_loss(model, x_BT1: torch.Tensor, hooks=()) -> torch.Tensor:
    B, T1 = x_BT1.shape
    T = T1 - 1
    inp, tgt = x_BT1[:, :-1], x_BT1[:, 1:]
    batch = ForwardBatch.blocks(B, T, x_BT1.device)
    batch.route_hooks.extend(hooks)
    logits = model(inp.reshape(-1), batch)
    return F.cross_entropy(logits, tgt.reshape(-1))


@torch.no_grad()
def evaluate(model, vb: dict, B: int = 8) -> tuple[dict, dict]:
    """(validation loss per set, routing health per set: worst per-layer max/mean load, affinity x E)."""
    model.eval()
    res, routing = {}, {}
    for d, x in vb.items():
        tot, n = 0.0, 0
        seen: dict[int, list] = {}
        hook = lambda layer, x_ND, ids_NK, w_NK: seen.setdefault(layer, []).append(ids_NK)
        for i in range(0, len(x), B):
            xb = x[i:i + B]
            tot += float(lm_loss(model, xb, [hook])) * len(xb)
            n += len(xb)
        res[d] = tot / n
        E = model.cfg.num_experts
        ids_TLK = np.stack([torch.cat(v).numpy() for _, v in sorted(seen.items())], axis=1)
        aff, _ = affinity(ids_TLK, E)
        routing[d] = (float(load_imbalance(ids_TLK, E).max()), aff * E)
    model.train()
    return res, routing


def lr_at(progress: float, step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(max(progress, 0.0), 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build(a, V: int, eos: int) -> tuple[dict, MoEConfig]:
    if a.arch == "mixtral":
        d = mixtral_config_dict(vocab_size=V, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                                num_kv_heads=a.kv_heads, num_experts=a.experts, top_k=a.top_k,
                                intermediate_size=a.ffn, max_position_embeddings=1024, eos_token_id=eos,
                                bos_token_id=None)
        d["router_aux_loss_coef"] = a.aux_coef
    else:
        d = deepseek_v3_config_dict(vocab_size=V, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                                    num_experts=a.experts, top_k=a.top_k, moe_intermediate_size=a.ffn,
                                    dense_intermediate_size=a.dense_ffn, n_shared_experts=a.shared_experts,
                                    first_k_dense=a.dense_layers, kv_lora_rank=a.kv_lora_rank,
                                    qk_rope_head_dim=a.rope_dim, qk_nope_head_dim=a.nope_dim, v_head_dim=a.v_dim,
                                    routed_scaling_factor=a.routed_scale, max_position_embeddings=1024,
                                    eos_token_id=eos, bos_token_id=None)
    return d, MoEConfig.from_dict(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("mixtral", "deepseek_v3"), default="mixtral")
    ap.add_argument("--run-dir", default="runs/default_model")
    ap.add_argument("--tokenizer-dir", default=None, help="default: <run-dir>/tokenizer")
    ap.add_argument("--time-budget-minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2, help="mixtral only")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=224, help="routed expert intermediate size")
    ap.add_argument("--dense-ffn", type=int, default=512, help="deepseek_v3: dense layers' intermediate size")
    ap.add_argument("--dense-layers", type=int, default=1, help="deepseek_v3: first_k_dense_replace")
    ap.add_argument("--shared-experts", type=int, default=2, help="deepseek_v3: n_shared_experts")
    ap.add_argument("--kv-lora-rank", type=int, default=32, help="deepseek_v3")
    ap.add_argument("--rope-dim", type=int, default=16, help="deepseek_v3: qk_rope_head_dim")
    ap.add_argument("--nope-dim", type=int, default=32, help="deepseek_v3: qk_nope_head_dim")
    ap.add_argument("--v-dim", type=int, default=32, help="deepseek_v3: v_head_dim")
    ap.add_argument("--routed-scale", type=float, default=2.5, help="deepseek_v3: routed_scaling_factor")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="deepseek_v3: router bias update per step")
    ap.add_argument("--seq-aux-coef", type=float, default=1e-3, help="deepseek_v3: sequence-wise balance loss")
    ap.add_argument("--seq-aux-threshold", type=float, default=0.0,
                    help="deepseek_v3: count only an expert's load above this multiple of its fair share")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="mixtral: Switch load-balancing loss")
    ap.add_argument("--z-coef", type=float, default=1e-3, help="mixtral: router z-loss")
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

    cfg_dict, cfg = build(a, V, eos)
    ds = cfg.model_type == "deepseek_v3"
    model = MoEForCausalLM(cfg, max_positions=1024)
    model.experts = ParamExperts(cfg)
    init_weights(model, cfg)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    log("config: " + json.dumps({k: v for k, v in cfg_dict.items() if isinstance(v, (int, float)) and k not in
                                 ("bos_token_id", "eos_token_id")}))
    log(f"params {nparams / 1e6:.2f}M ({nparams * 2 / 2**20:.1f} MiB in bf16)")

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    data = Data(tok, a.seed)
    log(f"train tokens {len(data.train):,}; val tokens " + ", ".join(f"{d} {len(s):,}" for d, s in data.val.items()))
    vb = data.val_batches(a.seq_len, per_domain=6)
    py = python_source_ids(tok)
    if len(py) > a.seq_len * 6:
        starts = np.linspace(0, len(py) - a.seq_len - 1, 6).astype(int)
        vb["python (not in corpus)"] = torch.from_numpy(np.stack([py[i:i + a.seq_len + 1] for i in starts])
                                                        .astype(np.int64))

    def report(prefix: str):
        ev, rt = evaluate(model, vb)
        dom = {d: v for d, v in ev.items() if d in DOMAINS}
        log(f"{prefix} " + " ".join(f"{d} {v:.3f}" for d, v in ev.items()) + f" mean {np.mean(list(dom.values())):.3f}")
        log(f"{prefix} routing (worst max/mean load, affinity x E) " +
            " ".join(f"{d} {m:.2f}/{f:.2f}" for d, (m, f) in rt.items()))
        return ev

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
    acc = {"loss": 0.0, "aux": 0.0, "z": 0.0, "load": 0.0, "n": 0}
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
        if ds:
            aux = sequence_balance_loss(model.router_logits(), model.router_ids(), x.shape[0], cfg.top_k,
                                        a.seq_aux_threshold)
            z = torch.zeros(())
            total = loss + a.seq_aux_coef * aux
        else:
            aux, z = load_balance_loss(model.router_logits(), cfg.top_k)
            total = loss + a.aux_coef * aux + a.z_coef * z
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        if ds:
            acc["load"] += update_router_bias(model, a.bias_rate)
        step += 1
        tokens += x.shape[0] * a.seq_len
        acc["loss"] += loss.item(); acc["aux"] += aux.item(); acc["z"] += z.item(); acc["n"] += 1
        if step % a.log_every == 0 or step == a.bench_steps:
            dt = time.time() - tl
            n = acc["n"]
            log(f"step {step} loss {acc['loss'] / n:.4f} aux {acc['aux'] / n:.4f} z {acc['z'] / n:.2f} "
                + (f"batch-load {acc['load'] / n:.2f} " if ds else "")
                + f"gnorm {float(gn):.2f} lr {lr:.2e} tok/s {n * x.shape[0] * a.seq_len / dt:.0f} "
                f"tokens {tokens:,} elapsed {(elapsed_prev + time.time() - t0) / 60:.1f}m")
            acc = {k: 0.0 for k in acc}
            acc["n"] = 0
            tl = time.time()
        if a.bench_steps and step >= a.bench_steps:
            return
        if step % a.eval_every == 0:
            report("val")
        if time.time() - last_ck > a.ckpt_minutes * 60:
            save_ckpt()
            last_ck = time.time()
    save_ckpt()
    ev = report("final val")
    final = os.path.join(a.run_dir, "final")
    save_checkpoint(model.state_dict(), model.experts, cfg, cfg_dict, final, dtype=torch.bfloat16)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, fn), os.path.join(final, fn))
    with open(os.path.join(final, "training.json"), "w") as f:
        json.dump({"steps": step, "tokens": tokens, "minutes": (elapsed_prev + time.time() - t0) / 60,
                   "val_loss": ev, "args": vars(a)}, f, indent=2)
    log(f"saved {final}: {step} steps, {tokens:,} tokens")


if __name__ == "__main__":
    main()
