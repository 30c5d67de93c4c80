"""Tiny FP8 (block-scaled e4m3) and MXFP4 checkpoints built to the published format specs.

transformers cannot write either on a CPU (its FP8 quantizer needs a GPU, its MXFP4 one Triton kernels), so the
quantized files are written here from a saved bf16/fp32 checkpoint, in the released layouts:
- FP8 (DeepSeek-V3's ``inference/fp8_cast_bf16.py`` convention, read back by transformers' ``Fp8Dequantize``): every
  linear ``<m>.weight`` not on the skip list becomes e4m3 ``w / s`` with ``<m>.weight_scale_inv`` = s = amax / 448
  per [br, bc] block (partial edge blocks allowed), float32;
- MXFP4 (gpt-oss): ``experts.gate_up_proj`` [E, D, 2F] / ``down_proj`` [E, F, D] become ``*_blocks`` [E, R, G, 16]
  and ``*_scales`` [E, R, G] over 32-value groups of the input dimension (OCP MX: shared exponent
  floor(log2(amax)) - 2, values rounded to the nearest e2m1, low nibble first).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp8_quantize(w_RC: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 inverse scales [ceil(R/br), ceil(C/bc)])."""
    R, C = w_RC.shape
    br, bc = block
    gr, gc = math.ceil(R / br), math.ceil(C / bc)
    w = torch.nn.functional.pad(w_RC.float(), (0, gc * bc - C, 0, gr * br - R))
    amax = w.reshape(gr, br, gc, bc).abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    q = (w_RC.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def mxfp4_quantize(w_CR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [R, G, 16] uint8, scales [R, G] uint8) of a logical [C, R] tensor (groups of 32 along C)."""
    x = w_CR.float().transpose(0, 1).contiguous()               # [R, C]
    R, C = x.shape
    g = x.reshape(R, C // 32, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    v = g / torch.exp2(e).unsqueeze(-1)
    idx = (v.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)        # nearest magnitude
    code = (idx + 8 * (v < 0)).to(torch.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e + 127).to(torch.uint8)


def _write(path: str, tensors: dict, quant: dict):
    for fn in os.listdir(path):
        if fn.endswith(".safetensors") or fn.endswith(".safetensors.index.json"):
            os.remove(os.path.join(path, fn))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = quant
    json.dump(cfg, open(cfg_path, "w"), indent=2)


def _state(path: str) -> dict:
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


def to_fp8(path: str, linear_modules: set[str], block=(128, 128), skip=(), scale_dtype=torch.float32) -> dict:
    """Rewrite the checkpoint at ``path`` with every ``<m>.weight`` of ``linear_modules`` (minus ``skip``) in fp8;
    returns the quantization_config written."""
    sd = _state(path)
    out = {}
    for name, t in sd.items():
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        if mod in linear_modules and not any(mod == s or mod.endswith("." + s) for s in skip) and t.dim() == 2:
            q, s = fp8_quantize(t, block)
            out[name], out[f"{mod}.weight_scale_inv"] = q, s.to(scale_dtype)
        else:
            out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}
    if skip:
        quant["modules_to_not_convert"] = list(skip)
    _write(path, out, quant)
    return quant


def to_mxfp4(path: str) -> dict:
    """Rewrite a gpt-oss checkpoint's fused experts as MXFP4 (``_blocks`` / ``_scales``), the rest bf16."""
    sd = _state(path)
    out = {}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            pairs = [mxfp4_quantize(t[e]) for e in range(t.shape[0])]
            out[f"{name}_blocks"] = torch.stack([b for b, _ in pairs])
            out[f"{name}_scales"] = torch.stack([s for _, s in pairs])
        else:
            out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    quant = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                        "lm_head"], "quant_method": "mxfp4"}
    _write(path, out, quant)
    return quant


def linear_modules(hf_model) -> set[str]:
    """Names of the model's nn.Linear modules (per-expert names for fused experts: experts.{e}.gate_proj, …), the
    lm_head and routers excluded, as DeepSeek-V3's release quantizes them."""
    names = {n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    for n, m in hf_model.named_modules():
        if n.endswith("mlp.experts") and hasattr(m, "gate_up_proj"):
            for e in range(m.gate_up_proj.shape[0]):
                names |= {f"{n}.{e}.gate_proj", f"{n}.{e}.up_proj", f"{n}.{e}.down_proj",
                          f"{n}.{e}.w1", f"{n}.{e}.w2", f"{n}.{e}.w3"}
    return names


def dequantized_copy(src: str, dst: str) -> str:
    """An unquantized copy of FP8 checkpoint ``src`` whose weights are transformers' own dequantization of each
    (weight, weight_scale_inv) pair (``Fp8Dequantize``, float32): the oracle model is transformers loading it."""
    import shutil

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    shutil.copytree(src, dst)
    deq = Fp8Dequantize(None)
    sd = _state(src)
    out = {}
    for name, t in sd.items():
        if name.endswith("weight_scale_inv"):
            continue
        sn = name[:-len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else None
        out[name] = deq._dequantize_one(t, sd[sn], torch.float32) if sn in sd else t.float()
    for fn in os.listdir(dst):
        if fn.endswith(".safetensors"):
            os.remove(os.path.join(dst, fn))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.pop("quantization_config")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    return dst
