"""The cache of a hybrid model (Qwen3-Next): KV entries for its full-attention layers, and beside them a recurrent
state per sequence slot for each linear-attention (Gated-DeltaNet) layer.

A slot's state is the convolution's last W inputs [C, W] and the delta rule's matrix [Hv, dk, dv] (float32, as
transformers keeps it) after the sequence's first ``ctx`` tokens. Unlike KV entries, a state update is not
idempotent: running the same tokens twice would fold them in twice. A step that fails for some of its requests
(an expert read error in offload mode) is run again for the others, so every slot keeps two buffers: a layer
reads the buffer that holds the state at its chunk's ``ctx`` and writes the other one, recording which token
count each holds. A rerun of the step finds its input state untouched; a new sequence in a slot (``ctx == 0``)
starts from zeros and forgets both. Chunked prefill is a chain of such steps; an abort just frees the slot.
Memory: 2 x (conv + state) per slot and linear layer, allocated up front like the slot pool.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class HybridCache(KVCache):
    def __init__(self, cfg, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        full = [l for l in range(cfg.num_layers) if not cfg.is_linear_layer(l)]
        self.kv_index = {l: i for i, l in enumerate(full)}
        super().__init__(len(full), num_slots, cfg.num_kv_heads, cfg.head_dim, max_len, dtype, device)
        lin = [l for l in range(cfg.num_layers) if cfg.is_linear_layer(l)]
        self.lin_index = {l: i for i, l in enumerate(lin)}
        Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, W = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        C = 2 * Hk * dk + Hv * dv
        self.conv = [torch.zeros((2, num_slots, C, W), dtype=dtype, device=device) for _ in lin]
        self.ssm = [torch.zeros((2, num_slots, Hv, dk, dv), dtype=torch.float32, device=device) for _ in lin]
        self.held = [[[-1, -1] for _ in range(num_slots)] for _ in lin]   # token count each buffer holds

    # -- KV entries of the full-attention layers ----------------------------------------------------------------
    def write(self, layer, slots_N, pos_N, k_NHD, v_NHD):
        super().write(self.kv_index[layer], slots_N, pos_N, k_NHD, v_NHD)

    def write_one(self, layer, slot, start, k_NHD, v_NHD):
        super().write_one(self.kv_index[layer], slot, start, k_NHD, v_NHD)

    def read(self, layer, slots_B, T):
        return super().read(self.kv_index[layer], slots_B, T)

    def read_one(self, layer, slot, T):
        return super().read_one(self.kv_index[layer], slot, T)

    def export(self, slot, T):
        raise NotImplementedError("moving a sequence between workers is not supported for hybrid (linear-attention) "
                                  "models")

    import_ = export

    def bytes_per_token(self) -> int:
        return super().bytes_per_token() if self.L else 0

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    # -- recurrent state of the linear-attention layers ---------------------------------------------------------
    def _source(self, i: int, slot: int, ctx: int) -> int | None:
        if ctx == 0:
            return None
        held = self.held[i][slot]
        if ctx not in held:
            raise RuntimeError(f"no recurrent state of slot {slot} after {ctx} tokens (layer {i}): it holds "
                               f"{held}")
        return held.index(ctx)

    def states(self, layer: int, slots: list[int], ctxs: list[int]):
        """(conv [B, C, W], state [B, Hv, dk, dv]) of each slot after ``ctxs[b]`` tokens (every ctx > 0)."""
        i = self.lin_index[layer]
        buf = torch.tensor([self._source(i, s, c) for s, c in zip(slots, ctxs)], device=self.device)
        sl = torch.tensor(slots, device=self.device)
        return self.conv[i][buf, sl], self.ssm[i][buf, sl]

    def state(self, layer: int, slot: int, ctx: int):
        """(conv [1, C, W], state [1, Hv, dk, dv]) after ``ctx`` tokens; (None, None) at a sequence start."""
        i = self.lin_index[layer]
        b = self._source(i, slot, ctx)
        if b is None:
            return None, None
        return self.conv[i][b, slot:slot + 1], self.ssm[i][b, slot:slot + 1]

    def set_states(self, layer: int, slots: list[int], ctxs: list[int], ns: list[int], conv_BCW, ssm_BHKV):
        """Store each slot's state after ``ctxs[b] + ns[b]`` tokens in the buffer that does not hold its input."""
        i = self.lin_index[layer]
        dst = []
        for s, c, n in zip(slots, ctxs, ns):
            b = self._source(i, s, c)
            d = 0 if b is None else 1 - b
            self.held[i][s] = [c + n, -1] if b is None else [c if d else c + n, c + n if d else c]
            dst.append(d)
        buf, sl = torch.tensor(dst, device=self.device), torch.tensor(slots, device=self.device)
        self.conv[i][buf, sl] = conv_BCW.to(self.conv[i].dtype)
        self.ssm[i][buf, sl] = ssm_BHKV.to(torch.float32)
