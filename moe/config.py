"""Model configuration: one frozen dataclass parsed from a checkpoint's ``config.json``.

Glossary
- D: hidden size; F: intermediate size of one routed expert; Fs: of the shared expert.
- E: routed experts per MoE layer; K: experts chosen per token (top-k).
- H / Hkv / Dh: attention heads, key-value heads, head dimension.
- dense layer: a layer whose feed-forward is an ordinary MLP (``mlp_only_layers`` / ``decoder_sparse_step``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from .errors import ModelError
from .quant_formats import QuantFormat, parse_quant

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "kimi_k2", "gpt_oss",
                         "glm4_moe", "minimax_m2", "qwen3_next")


@dataclass(frozen=True)
class MoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # bias on q/k/v projections (qwen2_moe)
    qk_norm: str = "none"             # "none" | "head" (qwen3: RMSNorm over Dh) | "full" (olmoe: over H*Dh)
    clip_qkv: float | None = None     # olmoe option
    shared_expert_intermediate_size: int = 0   # qwen2_moe shared expert, 0 = none
    dense_intermediate_size: int = 0  # MLP width of dense (non-MoE) layers
    dense_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # ---- rotary scaling (all archs may use it; the original four parse only "default") ---------------------
    rope_type: str = "default"        # "default" | "yarn"
    rope_scaling: tuple = ()          # the rope parameters as sorted (key, value) pairs
    rotary_dim: int = 0               # rotated width; 0 = head_dim
    # ---- DeepSeek-V3: multi-head latent attention, sigmoid group-limited routing, shared experts ------------
    # "mha" | "mla" (DeepSeek) | "sinks" (gpt-oss: learned sinks, sliding window) | "partial" (GLM-4.5, MiniMax-M2:
    # RoPE on the first rotary_dim of each head) | "gated" (Qwen3-Next: partial RoPE, sigmoid output gate)
    attention_kind: str = "mha"
    q_lora_rank: int | None = None    # None: plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # "softmax" | "sigmoid_group" (DeepSeek-V3, GLM-4.5) | "topk_softmax" (gpt-oss) | "sigmoid_bias" (MiniMax-M2)
    router_kind: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0       # DeepSeek: ungated shared MLP of width num_shared_experts * F
    # ---- gpt-oss ---------------------------------------------------------------------------------------------
    expert_act: str = "swiglu"        # "swiglu" | "swiglu_oss" (clamped, (up + 1) * glu, biases)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # per layer "full_attention" | "sliding_attention" (gpt-oss) | "linear_attention" (Qwen3-Next); empty: all full
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    o_proj_bias: bool = False
    # ---- Qwen3-Next: Gated-DeltaNet linear attention layers, (1 + weight) RMSNorms ---------------------------------
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    rmsnorm_offset: bool = False      # RMSNorm scales by (1 + weight) (Qwen3-Next)
    quant: QuantFormat = QuantFormat()   # quantization_config of the checkpoint (quant_formats.py)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        checks = [
            (self.num_experts >= 1, "num_experts must be >= 1"),
            (1 <= self.top_k <= self.num_experts,
             f"experts per token ({self.top_k}) must be between 1 and the number of experts ({self.num_experts})"),
            (self.num_heads % max(self.num_kv_heads, 1) == 0,
             f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"),
            (self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')"),
            (self.qk_norm in ("none", "head", "full"), f"bad qk_norm {self.qk_norm!r}"),
            (self.vocab_size > 0 and self.hidden_size > 0 and self.num_layers > 0, "sizes must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ModelError(f"config.json: {msg}")

    def is_linear_layer(self, layer: int) -> bool:
        """A Gated-DeltaNet layer (Qwen3-Next): recurrent state instead of KV entries."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    def is_sliding_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention" and bool(self.sliding_window)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """Per-token KV cache shape ``(key heads, key dim, value heads, value dim)`` of every layer.

        MLA caches the compressed latent (kv_lora_rank, after kv_a_layernorm) and the roped shared key
        (qk_rope_head_dim) as one "key" of one head, and no value."""
        if self.attention_kind == "mla":
            return (1, self.kv_lora_rank + self.qk_rope_head_dim, 1, 0)
        return (self.num_kv_heads, self.head_dim, self.num_kv_heads, self.head_dim)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def expert_bytes(self, bytes_per_elem: int) -> int:
        """Bytes of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size * bytes_per_elem

    # ---- parsing -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        from .validate import check_config_types
        check_config_types(d)
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"config.json: unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            return replace(_PARSERS[mt](d), quant=parse_quant(d))
        except KeyError as e:
            raise ModelError(f"config.json: missing field {e.args[0]!r} for model_type {mt!r}") from None
        except ModelError:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"config.json: a field has the wrong type or value for model_type {mt!r} ({e})") from None

    @classmethod
    def from_dir(cls, path: str) -> "MoEConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ModelError(f"model directory not found: {path}")
        if not os.path.isfile(cfg_path):
            raise ModelError(f"no config.json in model directory {path}")
        try:
            with open(cfg_path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls.from_dict(d)


def _rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(rp, dict) and rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        raise ModelError(f"config.json: rope type {rp.get('rope_type', rp.get('type'))!r} is not supported")
    return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))


def _eos(d: dict) -> tuple[int, ...]:
    e = d.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, list) else (int(e),)


def _common(d: dict) -> dict:
    H = d["num_attention_heads"]
    D = d["hidden_size"]
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    return dict(
        model_type=d["model_type"], vocab_size=d["vocab_size"], hidden_size=D,
        num_layers=d["num_hidden_layers"], num_heads=H,
        num_kv_heads=d.get("num_key_value_heads") or H,
        head_dim=d.get("head_dim") or D // H,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(d),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"), bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos(d), torch_dtype=str(dtype).replace("torch.", ""), raw=d,
    )


def _num_experts(d: dict) -> int:
    n = d.get("num_experts", d.get("num_local_experts"))
    if n is None:
        raise KeyError("num_experts")
    return int(n)


def _sparse_layers(d: dict) -> tuple[int, ...]:
    """Qwen-style: a layer is dense when listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = d.get("decoder_sparse_step", 1) or 1
    only = set(d.get("mlp_only_layers") or [])
    n = d["num_hidden_layers"]
    dense = [i for i in range(n) if i in only or not (_num_experts(d) > 0 and (i + 1) % step == 0)]
    return tuple(dense)


def _mixtral(d):
    return MoEConfig(**_common(d), num_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                     expert_intermediate_size=d["intermediate_size"], norm_topk_prob=True)


def _qwen2_moe(d):
    return MoEConfig(**_common(d), num_experts=_num_experts(d), top_k=d["num_experts_per_tok"],
                     expert_intermediate_size=d["moe_intermediate_size"],
                     norm_topk_prob=bool(d.get("norm_topk_prob", False)), attention_bias=bool(d.get("qkv_bias", True)),
                     shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size", 0) or 0),
                     dense_intermediate_size=int(d.get("intermediate_size", 0) or 0), dense_layers=_sparse_layers(d))


def _qwen3_moe(d):
    return MoEConfig(**_common(d), num_experts=_num_experts(d), top_k=d["num_experts_per_tok"],
                     expert_intermediate_size=d["moe_intermediate_size"],
                     norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                     attention_bias=bool(d.get("attention_bias", False)), qk_norm="head",
                     dense_intermediate_size=int(d.get("intermediate_size", 0) or 0), dense_layers=_sparse_layers(d))


def _olmoe(d):
    return MoEConfig(**_common(d), num_experts=_num_experts(d), top_k=d["num_experts_per_tok"],
                     expert_intermediate_size=d["intermediate_size"],
                     norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                     attention_bias=bool(d.get("attention_bias", False)), qk_norm="full", clip_qkv=d.get("clip_qkv"))


def _rope_scaled(d: dict) -> dict:
    """rope_type, rope_theta and the parameters of a config that may use YaRN (DeepSeek-V3, gpt-oss)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ModelError("config.json: rope_parameters must be an object")
    rt = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rt not in ("default", "yarn"):
        raise ModelError(f"config.json: rope type {rt!r} is not supported (only 'default' and 'yarn')")
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    params = {k: v for k, v in rp.items() if k not in ("rope_type", "type", "rope_theta")}
    if rt == "yarn":
        if "factor" not in params:
            raise ModelError("config.json: rope_parameters.factor is required for rope type 'yarn'")
        if d.get("original_max_position_embeddings"):
            params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return dict(rope_type=rt, rope_theta=theta, rope_scaling=tuple(sorted(params.items())))


def _fail(msg: str):
    raise ModelError(f"config.json: {msg}")


def _group_routing(d: dict, E: int, K: int) -> tuple[int, int]:
    """(n_group, topk_group) of a DeepSeek-style group-limited router, checked against E experts and top-K."""
    ng, tg = int(d.get("n_group") or 1), int(d.get("topk_group") or 1)
    if E < 1:
        _fail(f"n_routed_experts ({E}) must be >= 1")
    if ng < 1 or tg < 1:
        _fail(f"n_group ({ng}) and topk_group ({tg}) must be >= 1")
    if tg > ng:
        _fail(f"topk_group ({tg}) must not exceed n_group ({ng})")
    if E % ng:
        _fail(f"n_routed_experts ({E}) must be divisible by n_group ({ng})")
    if ng > 1 and E // ng < 2:
        _fail(f"n_routed_experts / n_group ({E}/{ng}) must be >= 2 (groups are scored by their top-2 experts)")
    if K > E:
        _fail(f"num_experts_per_tok ({K}) must not exceed n_routed_experts ({E})")
    if K > tg * (E // ng):
        _fail(f"num_experts_per_tok ({K}) must not exceed topk_group x experts per group "
              f"({tg} x {E // ng} = {tg * E // ng}; n_routed_experts {E}, n_group {ng})")
    return ng, tg


def _first_dense(d: dict) -> tuple[int, ...]:
    L, fk = int(d["num_hidden_layers"]), int(d.get("first_k_dense_replace") or 0)
    if not 0 <= fk <= L:
        _fail(f"first_k_dense_replace ({fk}) must be between 0 and num_hidden_layers ({L})")
    return tuple(range(fk))


def _deepseek_v3(d):
    c = _common({**d, "rope_parameters": None, "rope_scaling": None})
    c.update(_rope_scaled(d))
    E, K = int(d["n_routed_experts"]), int(d["num_experts_per_tok"])
    ng, tg = _group_routing(d, E, K)
    dense = _first_dense(d)
    for f in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if int(d[f]) <= 0:
            _fail(f"{f} ({d[f]}) must be positive")
    if int(d["qk_rope_head_dim"]) % 2:
        _fail(f"qk_rope_head_dim ({d['qk_rope_head_dim']}) must be even")
    qk = int(d["qk_nope_head_dim"]) + int(d["qk_rope_head_dim"])
    c["head_dim"] = qk
    return MoEConfig(**c, num_experts=E, top_k=K, expert_intermediate_size=int(d["moe_intermediate_size"]),
                     norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                     attention_bias=bool(d.get("attention_bias", False)),
                     dense_intermediate_size=int(d.get("intermediate_size", 0) or 0),
                     dense_layers=dense, rotary_dim=int(d["qk_rope_head_dim"]),
                     attention_kind="mla", q_lora_rank=(int(d["q_lora_rank"]) if d.get("q_lora_rank") else None),
                     kv_lora_rank=int(d["kv_lora_rank"]), qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                     qk_rope_head_dim=int(d["qk_rope_head_dim"]), v_head_dim=int(d["v_head_dim"]),
                     rope_interleave=bool(d.get("rope_interleave", True)), router_kind="sigmoid_group",
                     n_group=ng, topk_group=tg, routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                     num_shared_experts=int(d.get("n_shared_experts") or 0), o_proj_bias=bool(d.get("attention_bias", False)))


def _partial_rotary(d: dict, head_dim: int) -> int:
    """Rotated width of a partial-RoPE head: ``rotary_dim`` (MiniMax-M2's release) or ``partial_rotary_factor`` (in
    ``rope_parameters`` or at the top level) x head_dim."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if d.get("rotary_dim"):
        rd = int(d["rotary_dim"])
    else:
        f = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) if isinstance(rp, dict) else 1.0
        rd = int(head_dim * float(f if f is not None else 1.0))
    if not 0 < rd <= head_dim or rd % 2:
        _fail(f"the rotary dimension ({rd}: rotary_dim / partial_rotary_factor x head_dim {head_dim}) must be even "
              f"and between 2 and head_dim")
    return rd


def _glm4_moe(d):
    c = _common(d)
    E, K = int(d["n_routed_experts"]), int(d["num_experts_per_tok"])
    ng, tg = _group_routing(d, E, K)
    return MoEConfig(**c, num_experts=E, top_k=K, expert_intermediate_size=int(d["moe_intermediate_size"]),
                     norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                     attention_bias=bool(d.get("attention_bias", False)),
                     qk_norm="head" if d.get("use_qk_norm") else "none",
                     dense_intermediate_size=int(d.get("intermediate_size", 0) or 0), dense_layers=_first_dense(d),
                     rotary_dim=_partial_rotary(d, c["head_dim"]), attention_kind="partial",
                     router_kind="sigmoid_group", n_group=ng, topk_group=tg,
                     routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                     num_shared_experts=int(d.get("n_shared_experts") or 0))


def _minimax_m2(d):
    c = _common(d)
    E, K = int(d["num_local_experts"]), int(d["num_experts_per_tok"])
    if K > E:
        _fail(f"num_experts_per_tok ({K}) must not exceed num_local_experts ({E})")
    if d.get("use_qk_norm", True) is False or d.get("qk_norm_type", "per_layer") != "per_layer":
        _fail("MiniMax-M2 is supported with use_qk_norm true and qk_norm_type 'per_layer' (as released)")
    return MoEConfig(**c, num_experts=E, top_k=K, expert_intermediate_size=int(d["intermediate_size"]),
                     norm_topk_prob=True, qk_norm="full", rotary_dim=_partial_rotary(d, c["head_dim"]),
                     attention_kind="partial", router_kind="sigmoid_bias")


def _qwen3_next_layers(d: dict) -> tuple[str, ...]:
    L = int(d["num_hidden_layers"])
    lt = d.get("layer_types")
    if lt is None:
        iv = d.get("full_attention_interval", 4)
        if not isinstance(iv, int) or iv < 1:
            _fail(f"full_attention_interval ({iv!r}) must be a positive integer")
        lt = ["linear_attention" if (i + 1) % iv else "full_attention" for i in range(L)]
    if not isinstance(lt, (list, tuple)) or len(lt) != L:
        _fail(f"layer_types has {len(lt) if isinstance(lt, (list, tuple)) else 'no list of'} entries but "
              f"num_hidden_layers is {L}")
    bad = [t for t in lt if t not in ("linear_attention", "full_attention")]
    if bad:
        _fail(f"layer_types: unsupported layer type {bad[0]!r} (qwen3_next has 'linear_attention' and "
              "'full_attention')")
    return tuple(lt)


def _qwen3_next(d):
    c = _common(d)
    E, K = _num_experts(d), int(d["num_experts_per_tok"])
    if K > E:
        _fail(f"num_experts_per_tok ({K}) must not exceed num_experts ({E})")
    lin = {f: int(d[f]) for f in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                  "linear_value_head_dim", "linear_conv_kernel_dim")}
    for f, v in lin.items():
        if v < 1:
            _fail(f"{f} ({v}) must be >= 1")
    if lin["linear_num_value_heads"] % lin["linear_num_key_heads"]:
        _fail(f"linear_num_value_heads ({lin['linear_num_value_heads']}) must be a multiple of linear_num_key_heads "
              f"({lin['linear_num_key_heads']})")
    return MoEConfig(**c, num_experts=E, top_k=K, expert_intermediate_size=int(d["moe_intermediate_size"]),
                     norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                     attention_bias=bool(d.get("attention_bias", False)), o_proj_bias=bool(d.get("attention_bias", False)),
                     qk_norm="head", shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                     dense_intermediate_size=int(d.get("intermediate_size", 0) or 0), dense_layers=_sparse_layers(d),
                     rotary_dim=_partial_rotary(d, c["head_dim"]), attention_kind="gated",
                     layer_types=_qwen3_next_layers(d), rmsnorm_offset=True, **lin)


def _gpt_oss(d):
    c = _common({**d, "rope_parameters": None, "rope_scaling": None})
    c.update(_rope_scaled(d))
    E, K, L = int(d["num_local_experts"]), int(d["num_experts_per_tok"]), int(d["num_hidden_layers"])
    if K > E:
        _fail(f"num_experts_per_tok ({K}) must not exceed num_local_experts ({E})")
    lt = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if len(lt) != L:
        _fail(f"layer_types has {len(lt)} entries but num_hidden_layers is {L}")
    bad = [t for t in lt if t not in ("sliding_attention", "full_attention")]
    if bad:
        _fail(f"layer_types: unsupported layer type {bad[0]!r}")
    sw = d.get("sliding_window")
    if sw is not None and int(sw) < 1:
        _fail(f"sliding_window ({sw}) must be >= 1")
    if float(d.get("swiglu_limit", 7.0)) <= 0:
        _fail(f"swiglu_limit ({d.get('swiglu_limit')}) must be positive")
    return MoEConfig(**c, num_experts=E, top_k=K, expert_intermediate_size=int(d["intermediate_size"]),
                     norm_topk_prob=True, attention_bias=bool(d.get("attention_bias", True)),
                     o_proj_bias=bool(d.get("attention_bias", True)), attention_kind="sinks",
                     router_kind="topk_softmax", expert_act="swiglu_oss",
                     swiglu_alpha=float(d.get("swiglu_alpha", 1.702)), swiglu_limit=float(d.get("swiglu_limit", 7.0)),
                     layer_types=tuple(lt), sliding_window=int(sw) if sw else None)


_PARSERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v3": _deepseek_v3, "kimi_k2": _deepseek_v3, "gpt_oss": _gpt_oss, "glm4_moe": _glm4_moe, "minimax_m2": _minimax_m2,
            "qwen3_next": _qwen3_next}
