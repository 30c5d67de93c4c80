"""KV cache: a pool of sequence slots, each a contiguous run of positions, grown on demand.

Per layer: ``k[l], v[l]`` of shape [S, C, Hkv, Dh] (S slots, C positions of capacity, doubled up to the model
length when a sequence needs more). A slot belongs to one running sequence and is freed when it finishes.
Keys and values may have different head counts and dims (``v_heads``/``v_dim``; value dim 0 allowed): multi-head
latent attention caches one compressed "key" per token (kv_lora_rank + qk_rope_head_dim) and no value.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, initial: int = 256, v_heads: int | None = None,
                 v_dim: int | None = None):
        self.L, self.S, self.Hkv, self.Dh, self.max_len = num_layers, num_slots, num_kv_heads, head_dim, max_len
        self.Hv = num_kv_heads if v_heads is None else v_heads
        self.Dv = head_dim if v_dim is None else v_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self._grow(min(initial, max_len))

    def _grow(self, cap: int):
        shape = (self.S, cap, self.Hkv, self.Dh)
        vshape = (self.S, cap, self.Hv, self.Dv)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.L)]
        new_v = [torch.zeros(vshape, dtype=self.dtype, device=self.device) for _ in range(self.L)]
        for l in range(len(self.k)):
            new_k[l][:, :self.capacity] = self.k[l]
            new_v[l][:, :self.capacity] = self.v[l]
        self.k, self.v, self.capacity = new_k, new_v, cap

    def ensure(self, length: int):
        if length > self.capacity:
            self._grow(min(self.max_len, max(length, 2 * self.capacity)))

    @property
    def nbytes(self) -> int:
        return self.S * self.capacity * self.bytes_per_token()

    def bytes_per_token(self) -> int:
        return self.L * (self.Hkv * self.Dh + self.Hv * self.Dv) * self.k[0].element_size()

    def allocate(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def free(self, slot: int):
        self.free_slots.append(slot)

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    # -- used by attention --------------------------------------------------------------------------------------
    def write(self, layer: int, slots_N: torch.Tensor, pos_N: torch.Tensor, k_NHD, v_NHD):
        self.k[layer][slots_N, pos_N] = k_NHD
        self.v[layer][slots_N, pos_N] = v_NHD

    def write_one(self, layer: int, slot: int, start: int, k_NHD, v_NHD):
        """The entries of one sequence at positions start, start + 1, ..."""
        self.k[layer][slot, start:start + k_NHD.shape[0]] = k_NHD
        self.v[layer][slot, start:start + v_NHD.shape[0]] = v_NHD

    def read(self, layer: int, slots_B: torch.Tensor, T: int):
        return self.k[layer][slots_B, :T], self.v[layer][slots_B, :T]

    def read_one(self, layer: int, slot: int, T: int):
        return self.k[layer][slot, :T], self.v[layer][slot, :T]

    # -- moving a sequence between workers (speculative shuffling) ----------------------------------------------
    def export(self, slot: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([k[slot, :T] for k in self.k]), torch.stack([v[slot, :T] for v in self.v]))

    def import_(self, slot: int, k_LTHD: torch.Tensor, v_LTHD: torch.Tensor):
        T = k_LTHD.shape[1]
        self.ensure(T)
        for l in range(self.L):
            self.k[l][slot, :T] = k_LTHD[l]
            self.v[l][slot, :T] = v_LTHD[l]
