"""Checkpoint validation before anything is built or served, the same in every mode.

``check_config_types(d)``: config.json is an object whose size fields are integers (not strings, not booleans)
within sane bounds. ``validate_checkpoint(cfg, reader)``: the checkpoint has tensors for every layer the config
declares, and every tensor the model will read exists with a floating-point dtype (or as a supported quantized
pair) and the shape the config implies — dense weights and every routed expert, so offload mode (which reads
experts later, by byte ranges) refuses a transposed or integer expert at start-up too. Only safetensors headers are
read. ``check_finite(name, t, where)``: a loaded weight holds no NaN.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointError, ModelError

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# config.json integer fields: (minimum, maximum); absent or null fields are left to the parsers' defaults.
_INT_FIELDS = {
    "vocab_size": (1, 10_000_000), "hidden_size": (1, 1_000_000), "num_hidden_layers": (1, 10_000),
    "num_attention_heads": (1, 100_000), "num_key_value_heads": (1, 100_000), "head_dim": (1, 100_000),
    "intermediate_size": (0, 10_000_000), "moe_intermediate_size": (1, 10_000_000),
    "shared_expert_intermediate_size": (0, 10_000_000), "num_local_experts": (1, 1_000_000),
    "num_experts": (1, 1_000_000), "n_routed_experts": (1, 1_000_000), "num_experts_per_tok": (1, 1_000_000),
    "max_position_embeddings": (1, 1 << 30), "kv_lora_rank": (1, 1_000_000), "q_lora_rank": (1, 1_000_000),
    "qk_rope_head_dim": (1, 100_000), "qk_nope_head_dim": (1, 100_000), "v_head_dim": (1, 100_000),
    "n_group": (1, 1_000_000), "topk_group": (1, 1_000_000), "first_k_dense_replace": (0, 10_000),
    "n_shared_experts": (0, 1_000_000), "decoder_sparse_step": (0, 10_000), "sliding_window": (1, 1 << 30),
    "rotary_dim": (1, 100_000), "linear_num_key_heads": (1, 100_000), "linear_num_value_heads": (1, 100_000),
    "linear_key_head_dim": (1, 100_000), "linear_value_head_dim": (1, 100_000),
    "linear_conv_kernel_dim": (1, 10_000), "full_attention_interval": (1, 10_000),
}
_CORE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor", "swiglu_limit",
                 "swiglu_alpha")


def check_config_types(d) -> None:
    if not isinstance(d, dict):
        raise ModelError(f"config.json: expected a JSON object, got a JSON {type(d).__name__ if d is not None else 'null'}"
                         .replace("JSON list", "JSON array").replace("JSON dict", "JSON object"))
    for k, (lo, hi) in _INT_FIELDS.items():
        if k not in _CORE:
            lo = 0                                   # 0 means "none" in some releases (sliding_window, ...)
        v = d.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelError(f"config.json: {k} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ModelError(f"config.json: {k} ({v}) must be between {lo} and {hi}")
    for k in _FLOAT_FIELDS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ModelError(f"config.json: {k} must be a number, got {v!r}")
    for k in ("eos_token_id", "bos_token_id"):
        v = d.get(k)
        items = v if isinstance(v, list) else [v]
        if v is not None and any(isinstance(x, bool) or not isinstance(x, int) for x in items):
            raise ModelError(f"config.json: {k} must be an integer or a list of integers, got {v!r}")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layers_present(reader) -> int:
    seen = set()
    for n in reader.names():
        m = _LAYER.match(n)
        if m:
            seen.add(int(m.group(1)))
    k = 0
    while k in seen:
        k += 1
    return k


def _check_plain(reader, name: str, shape: tuple[int, ...] | None, what: str, q=None):
    """``q``: the checkpoint's ``QuantFormat`` when ``name`` is a routed expert matrix (moeyard-packed ones are
    checked here: offload mode reads them later, by byte ranges)."""
    from .quant_formats import check_packed, stored_as
    if name not in reader:
        if f"{name}_blocks" in reader:
            return                                   # MXFP4: checked by quant_formats when read
        raise CheckpointError(f"tensor {name!r} ({what}) not found in checkpoint {reader.path}")
    how = stored_as(reader, name)
    packed_ckpt = q is not None and q.method == "moeyard"
    if how == "packed" or packed_ckpt:
        if q is None:
            raise CheckpointError(f"tensor {name!r} ({what}) is {reader.dtype(name)} with a weight_scale: only routed "
                                  f"experts may be stored packed ({reader.file_of(name)})")
        if how != "packed":
            raise CheckpointError(f"tensor {name!r} ({what}) is stored as {reader.dtype(name)} but config.json's "
                                  f"quantization_config says routed experts are {q.kind} ({reader.file_of(name)})")
        if shape is None:
            raise CheckpointError(f"tensor {name!r} ({what}): packed experts must be stored one tensor per expert "
                                  f"matrix, not fused ({reader.file_of(name)})")
        check_packed(reader, q, name, shape)
        return
    if how != "plain":
        return                                       # fp8 with its scale: checked by quant_formats when read
    dt = reader.dtype(name)
    if dt not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name!r} ({what}) is stored as {dt}, but weights must be floating point "
                              f"({', '.join(FLOAT_DTYPES)}, or a supported quantized format) ({reader.file_of(name)})")
    if shape is not None and tuple(reader.shape(name)) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} ({what}) has shape {list(reader.shape(name))} but the config implies "
                              f"{list(shape)} ({reader.file_of(name)})")


def validate_checkpoint(cfg, reader) -> None:
    """Raise ``CheckpointError`` naming the first tensor that is missing or has the wrong dtype or shape."""
    have = _layers_present(reader)
    if have < cfg.num_layers:
        raise CheckpointError(f"config.json declares num_hidden_layers = {cfg.num_layers} but the checkpoint "
                              f"{reader.path} has tensors for layers 0..{have - 1} only" if have else
                              f"config.json declares num_hidden_layers = {cfg.num_layers} but the checkpoint "
                              f"{reader.path} has no model.layers.* tensors")
    from .model import MoEForCausalLM
    from .weights import check_fused_shapes, dense_checkpoint_name, expert_refs
    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    for pname, p in model.named_parameters():
        if pname == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        _check_plain(reader, dense_checkpoint_name(cfg, reader, pname), tuple(p.shape), "dense weight")
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    for layer in cfg.moe_layers:
        check_fused_shapes(cfg, reader, layer)
        for e in range(cfg.num_experts):
            refs = expert_refs(cfg, reader, layer, e)
            for ref, shape in ((refs.gate, (F, D)), (refs.up, (F, D)), (refs.down, (D, F)),
                               (refs.gate_bias, None), (refs.up_bias, None), (refs.down_bias, None)):
                if ref is None:
                    continue
                what = f"expert {e} of layer {layer}"
                # fused tensors: the whole tensor's shape was checked above; per-expert ones here
                _check_plain(reader, ref.name, shape if ref.index is None else None, what,
                             cfg.quant if shape is not None else None)


def check_finite(name: str, t: torch.Tensor, where: str = "") -> None:
    """A loaded weight must not hold NaN (they would silently poison every token routed through it)."""
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise CheckpointError(f"tensor {name!r} holds NaN values{f' ({where})' if where else ''}")
