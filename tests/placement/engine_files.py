"""Writers of the files SGLang and vLLM produce, reimplemented from their source for tests (neither engine
installs without a GPU here), plus SGLang's reading of an expert-location file.

SGLang 0.5 (python/sglang/srt/eplb/expert_distribution.py, expert_location.py); vLLM
(vllm/model_executor/layers/fused_moe/routed_experts_capturer.py, CompletionOutput.routed_experts).
"""
from __future__ import annotations

import numpy as np
import torch

TOP_K_SLOTS = 8   # SGLang's per_token gatherer keeps 8 columns (DeepSeek-V3's top-k), -1 beyond the model's k


def sglang_map(num_layers: int, num_experts: int, redundant: int, seed: int = 0) -> np.ndarray:
    """A physical_to_logical_map [num_layers, E + redundant]: every expert once, redundant ones again."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.r_[np.arange(num_experts), rng.choice(num_experts, redundant, replace=False)])
            for _ in range(num_layers)]
    return np.stack(rows)


def sglang_per_token_dump(path, experts_TLk, token_ids_T, moe_layers, num_layers, map_DP, passes=3, seed=0):
    """What _DetailAccumulator.dump writes in per_token mode: logical ids become physical (any replica)."""
    rng = np.random.default_rng(seed)
    T, L, k = experts_TLk.shape
    records = []
    for p, idx in enumerate(np.array_split(np.arange(T), passes)):
        top = np.full((num_layers, len(idx), TOP_K_SLOTS), -1, dtype=np.int32)
        for i, d in enumerate(moe_layers):
            for t_i, t in enumerate(idx):
                for s in range(k):
                    slots = np.flatnonzero(map_DP[d] == experts_TLk[t, i, s])
                    top[d, t_i, s] = rng.choice(slots)
        top_t = torch.from_numpy(top)
        count = torch.zeros((num_layers, map_DP.shape[1]), dtype=torch.int32)
        ids = top_t.reshape(num_layers, -1).long()
        count.scatter_add_(1, ids.clamp(min=0), (ids >= 0).int())
        records.append(dict(forward_pass_id=p, rank=0, gatherer_key="primary", input_ids=token_ids_T[idx].tolist(),
                            positions=list(range(len(idx))), extend_seq_lens=[len(idx)], forward_mode=1,
                            topk_ids_of_layer=top_t, misc_objects=[], global_physical_count=count))
    torch.save(dict(records=records, last_physical_to_logical_map=torch.from_numpy(map_DP)), path)


def sglang_per_pass_dump(path, records_phys_count, map_DP):
    """per_pass mode: only global_physical_count [num_layers, P] per forward pass."""
    records = [dict(forward_pass_id=i, rank=0, gatherer_key="primary", global_physical_count=torch.from_numpy(c))
               for i, c in enumerate(records_phys_count)]
    torch.save(dict(records=records, last_physical_to_logical_map=torch.from_numpy(map_DP)), path)


def sglang_stat_dump(path, logical_count_BDE):
    """stat mode: logical_count [buffered passes, num_layers, E], written by rank 0."""
    torch.save(dict(rank=0, logical_count=torch.from_numpy(logical_count_BDE),
                    average_utilization_rate_over_window=None), path)


def vllm_routed_experts(experts_TLk, moe_layers, num_layers, lengths):
    """Per-request arrays [T_r, num_hidden_layers, k] int32 as CompletionOutput.routed_experts (dense
    layers' columns stay 0, as in the capturer's zeroed buffer)."""
    T, L, k = experts_TLk.shape
    full = np.zeros((T, num_layers, k), dtype=np.int32)
    full[:, list(moe_layers)] = experts_TLk
    cuts = np.cumsum(lengths)[:-1]
    return np.split(full, cuts)


def sglang_parse_location(d: dict, num_layers: int, num_logical: int, ep_size: int):
    """SGLang's start-up reading of --init-expert-location: ``init_by_mapping(**d)`` (so only the map key is
    allowed), ``_init_common``'s divisibility assert, and ``_compute_logical_to_all_physical_map``.
    Returns logical_to_all_physical [layers][E] lists and the redundant-expert count the server needs."""
    assert set(d) == {"physical_to_logical_map"}, f"init_by_mapping() got unexpected keys {set(d)}"
    m = torch.tensor(d["physical_to_logical_map"])
    assert m.dim() == 2 and m.shape[0] == num_layers
    P = m.shape[1]
    assert P % ep_size == 0
    out = [[[] for _ in range(num_logical)] for _ in range(num_layers)]
    for layer in range(num_layers):
        for p in range(P):
            out[layer][m[layer, p].item()].append(p)
    assert all(len(x) > 0 for row in out for x in row), "a logical expert without a physical slot"
    return out, P - num_logical
