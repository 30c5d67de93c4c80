"""Multi-head latent attention (DeepSeek-V2/V3) over a compressed KV cache.

Per token the cache holds ``c_kv`` (``kv_lora_rank``, after ``kv_a_layernorm``) and the roped shared key ``k_pe``
(``qk_rope_head_dim``), concatenated as the "key" of one head (see ``MoEConfig.kv_shape``; the value part is
empty). Keys and values are expanded with ``kv_b_proj`` when attending, exactly as transformers does, so results
agree with it (``core``); the cache is ``(kv_lora_rank + qk_rope_head_dim)`` numbers per token and layer instead of
``H * (qk_nope + qk_rope + v_head_dim)``.

Shapes: N tokens, H heads, r = kv_lora_rank, dr = qk_rope_head_dim, dn = qk_nope_head_dim, dv = v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig
from .attention import attention
from .layers import RMSNorm, Rotary, head_rows, linear_rows, module_copy
from .rope import apply_interleaved, rope_params, yarn_get_mscale


class MLAttention(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        D, H = cfg.hidden_size, cfg.num_heads
        self.H, self.r, self.dr, self.dn, self.dv = (H, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                                                     cfg.v_head_dim)
        self.dq = self.dn + self.dr
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.r + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, 1e-6)
        self.kv_b_proj = nn.Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=cfg.attention_bias)
        self.interleave = cfg.rope_interleave
        scale = self.dq ** -0.5
        if cfg.rope_type != "default":
            p = rope_params(cfg)
            if p.get("mscale_all_dim"):
                m = yarn_get_mscale(p["factor"], p["mscale_all_dim"])
                scale = scale * m * m
        self.scale = scale

    # ---- projections -----------------------------------------------------------------------------------------
    def _rope(self, rotary: Rotary, x, pos):
        return apply_interleaved(rotary, x, pos) if self.interleave else rotary(x, pos)

    def project_latent(self, x_ND, pos_N, rotary: Rotary):
        """(q [N, H, dn+dr], latent [N, 1, r+dr]: normed c_kv then roped k_pe — what the cache stores)."""
        N = x_ND.shape[0]
        q = self.q_proj(x_ND) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_ND)))
        q = q.view(N, self.H, self.dq)
        q_pass, q_rot = q.split([self.dn, self.dr], dim=-1)
        ckv = self.kv_a_proj_with_mqa(x_ND)
        c, k_rot = ckv.split([self.r, self.dr], dim=-1)
        c = self.kv_a_layernorm(c)
        q_rot = self._rope(rotary, q_rot, pos_N)
        k_rot = self._rope(rotary, k_rot.view(N, 1, self.dr), pos_N)
        return torch.cat((q_pass, q_rot), dim=-1), torch.cat((c.view(N, 1, self.r), k_rot), dim=-1)

    def expand(self, lat_T1L):
        """Keys [.., T, H, dn+dr] and values [.., T, H, dv] from cached latents [.., T, 1, r+dr]."""
        c, k_rot = lat_T1L[..., 0, :self.r], lat_T1L[..., :, self.r:]
        kv = self.kv_b_proj(c).view(*c.shape[:-1], self.H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(*k_nope.shape[:-1], self.dr)), dim=-1)
        return k, v

    # ---- attention (driven by ``attention.attend``) ---------------------------------------------------------
    def project(self, x_ND, pos_N, rotary: Rotary):
        """(q [N, H, dn+dr], latent [N, 1, r+dr] as the cached key, an empty value [N, 1, 0])."""
        q, lat = self.project_latent(x_ND, pos_N, rotary)
        return q, lat, lat[..., :0]

    def core(self, q_BHQD, lat_BT1L, v_unused=None, mask=None, causal=False, qpos_BQ=None):
        k, v = self.expand(lat_BT1L)                                     # [B, T, H, *]
        return F.scaled_dot_product_attention(q_BHQD, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              is_causal=causal, scale=self.scale)

    def forward(self, x_ND, batch, rotary: Rotary) -> torch.Tensor:
        return attention(self, x_ND, batch, rotary)

    def kv_shape(self) -> tuple[int, int, int, int]:
        return (1, self.r + self.dr, 1, 0)

    def select_heads(self, q0: int, q1: int) -> "MLAttention":
        """Query heads [q0, q1): their rows of the query and ``kv_b_proj`` up-projections; the latent (shared by
        every head) is computed whole."""
        sub = module_copy(self)
        sub.H = q1 - q0
        if self.q_lora_rank is None:
            sub.q_proj = linear_rows(self.q_proj, head_rows(range(q0, q1), self.dq))
        else:
            sub.q_b_proj = linear_rows(self.q_b_proj, head_rows(range(q0, q1), self.dq))
        sub.kv_b_proj = linear_rows(self.kv_b_proj, head_rows(range(q0, q1), self.dn + self.dv))
        return sub
