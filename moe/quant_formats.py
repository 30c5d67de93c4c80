"""Quantized checkpoint formats, read as published and dequantized to float32 (the caller casts to its dtype).

- ``fp8`` (DeepSeek-V3/R1, Kimi K2, the FP8 releases of Qwen3, GLM-4.5, MiniMax-M2): a linear ``<m>.weight`` is
  ``float8_e4m3fn`` [R, C] with ``<m>.weight_scale_inv`` [ceil(R/br), ceil(C/bc)] (``weight_block_size``
  [br, bc], usually [128, 128]); value = float(w) * scale of its block. A fused tensor ``<t>`` [E, R, C] has
  ``<t>_scale_inv`` [E, ...]. Scales are float32/bf16, or e8m0 (``scale_fmt: ue8m0``, 2^(byte - 127)).
- ``mxfp4`` (gpt-oss experts): ``<t>_blocks`` uint8 [..., R, G, 16] holds 32 e2m1 values per group (low nibble
  first) and ``<t>_scales`` uint8 [..., R, G] one e8m0 exponent per group. Groups run along the input dimension:
  the dequantized [..., R, 32 G] is the transpose of the tensor transformers holds (``gate_up_proj`` [E, D, 2F]),
  the *logical* layout every function here takes and returns.

- ``moeyard`` (``moeyard quantize``, ``moe/quantize.py``): routed experts weight-only quantized as the compute plan
  stores them (``moe/compute.py``'s ``Packed``): ``<m>.weight`` int8 [N, K] with ``<m>.weight_scale`` float32 [N]
  (per output channel), or ``<m>.weight`` uint8 [N, K/2] (int4 nibbles, groups of 32 along K) with
  ``<m>.weight_scale`` float16 [N, K/32]; ``quantization_config.weights`` says which. Dense weights are unquantized.

Modules named in ``modules_to_not_convert`` (or ``ignored_layers``) are stored unquantized and read as is;
matching follows transformers' ``should_convert_module`` (prefix up to a module boundary, regex, suffix). The
arithmetic matches transformers' ``Fp8Dequantize`` and ``convert_moe_packed_tensors`` bit for bit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CheckpointError, ModelError

SUPPORTED_QUANT = ("fp8", "mxfp4", "moeyard")
PACKED_KINDS = ("int8", "int4")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32


@dataclass(frozen=True)
class QuantFormat:
    method: str = "none"                  # "none" | "fp8" | "mxfp4" | "moeyard"
    block: tuple[int, int] | None = None  # fp8 weight_block_size; None: one scale per tensor
    skip: tuple[str, ...] = ()            # modules stored unquantized
    kind: str | None = None               # moeyard: "int8" | "int4" (routed experts as the compute plan packs them)

    def converts(self, module: str) -> bool:
        """True unless ``module`` is on the not-converted list (transformers' matching rules)."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{k}){boundary}", module) or module.endswith(k) for k in self.skip)


def parse_quant(d: dict) -> QuantFormat:
    """The ``quantization_config`` of a config.json (absent: unquantized)."""
    q = d.get("quantization_config")
    if q is None:
        return QuantFormat()
    if not isinstance(q, dict):
        raise ModelError("config.json: quantization_config must be an object")
    m = q.get("quant_method")
    if m not in SUPPORTED_QUANT:
        raise ModelError(f"config.json: quantization_config.quant_method {m!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_QUANT)}")
    if m == "moeyard":
        kind = q.get("weights")
        if kind not in PACKED_KINDS:
            raise ModelError(f"config.json: quantization_config.weights {kind!r} is not supported; valid: "
                             f"{', '.join(PACKED_KINDS)}")
        return QuantFormat("moeyard", kind=kind)
    skip = q.get("modules_to_not_convert") or q.get("ignored_layers") or ()
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ModelError("config.json: quantization_config.modules_to_not_convert must be a list of module names")
    if m == "mxfp4":
        return QuantFormat("mxfp4", None, tuple(skip))
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise ModelError(f"config.json: quantization_config.fmt {fmt!r} is not supported (only e4m3)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ModelError(f"config.json: quantization_config.activation_scheme {q.get('activation_scheme')!r} is not "
                         "supported (only 'dynamic')")
    b = q.get("weight_block_size")
    if b is not None and (not isinstance(b, (list, tuple)) or len(b) != 2
                          or not all(isinstance(x, int) and x > 0 for x in b)):
        raise ModelError(f"config.json: quantization_config.weight_block_size must be two positive integers, got {b!r}")
    return QuantFormat("fp8", tuple(b) if b is not None else None, tuple(skip))


# ---- FP8 ---------------------------------------------------------------------------------------------------------
def fp8_scale_name(name: str) -> str:
    return name[:-len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def fp8_scale_shape(q: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Scale grid of a weight of ``shape`` ([..., R, C]): one scale per block, partial blocks at the edges."""
    if q.block is None:
        return tuple(shape[:-2]) + (1, 1)
    return tuple(shape[:-2]) + (math.ceil(shape[-2] / q.block[0]), math.ceil(shape[-1] / q.block[1]))


def scale_values(s: torch.Tensor) -> torch.Tensor:
    """float32 scales: e8m0 bytes (uint8) are 2^(b - 127); float scales are converted."""
    if s.dtype == torch.uint8:
        return (s.to(torch.float32) - 127.0).exp2()
    return s.to(torch.float32)


def _lut(table: torch.Tensor, codes_u8: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` (float32, shape codes + table.shape[1:]): on a CPU through numpy's ``take``, several times
    faster than torch's fp8 conversion or gather here (benchmarks/bench_dequant.py) and run without the GIL;
    elsewhere torch indexing."""
    if codes_u8.device.type == "cpu":
        return torch.from_numpy(np.take(table.numpy(), codes_u8.contiguous().numpy(), axis=0))
    return table.to(codes_u8.device)[codes_u8.to(torch.int)]


_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)   # exact: every code


def dequant_fp8(w_RC: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float32 [..., R, C] of an e4m3 weight and its per-block inverse scales: ``float(w) * s`` per element, the one
    float32 multiply transformers does (so the same bits however the scales are broadcast)."""
    w = _lut(_E4M3, w_RC.view(torch.uint8)) if w_RC.device.type == "cpu" else w_RC.to(torch.float32)
    s = scale_values(scale).to(w.device)
    if block is None:
        return w.mul_(s.reshape(s.shape[:-2] + (1, 1)) if s.dim() >= 2 else s)
    R, C = w.shape[-2:]
    (br, bc), lead = block, w.shape[:-2]
    if R % br == 0 and C % bc == 0 and s.shape[-2:] == (R // br, C // bc):
        w.view(*lead, R // br, br, C // bc, bc).mul_(s[..., :, None, :, None])
        return w
    return w.mul_(s.repeat_interleave(br, dim=-2)[..., :R, :].repeat_interleave(bc, dim=-1)[..., :C])


# ---- MXFP4 -------------------------------------------------------------------------------------------------------
_FP4_PAIRS = torch.tensor([[FP4_VALUES[i & 15], FP4_VALUES[i >> 4]] for i in range(256)], dtype=torch.float32)
_E8M0 = torch.pow(2.0, torch.arange(256, dtype=torch.int32) - 127)        # what torch.ldexp multiplies by


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., R, 32 G] from blocks [..., R, G, 16] (uint8) and scales [..., R, G] (uint8 e8m0): each byte's two
    e2m1 values (low nibble first) times 2^(scale - 127), the values and the one multiply of transformers'
    ``convert_moe_packed_tensors`` (its lookup then ``ldexp``), without its final transpose."""
    b = blocks.to(torch.uint8)
    if b.device.type == "cpu":
        out = _lut(_FP4_PAIRS, b).reshape(b.shape[:-1] + (2 * b.shape[-1],))
    else:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=b.device)
        out = torch.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=torch.float32, device=b.device)
        out[..., 0::2], out[..., 1::2] = lut[(b & 0x0F).to(torch.int)], lut[(b >> 4).to(torch.int)]
    out.mul_(_lut(_E8M0, scales.to(torch.uint8)).to(out.device).unsqueeze(-1))
    return out.reshape(out.shape[:-3] + (out.shape[-3], out.shape[-2] * out.shape[-1]))


def mxfp4_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks, scales) shapes of an MXFP4 tensor of logical shape [..., C, R] (stored transposed, groups along C)."""
    *lead, C, R = shape
    return tuple(lead) + (R, C // MX_GROUP, MX_GROUP // 2), tuple(lead) + (R, C // MX_GROUP)


# ---- moeyard int8 / int4 -----------------------------------------------------------------------------------------
def packed_scale_name(name: str) -> str:
    return name + "_scale"


def packed_shapes(kind: str, shape: tuple[int, int]) -> tuple[tuple[int, ...], str, tuple[int, ...], str]:
    """(data shape, data dtype, scale shape, scale dtype) of a matrix [N, K] packed as ``kind``."""
    from .compute import INT4_GROUP
    N, K = shape
    if kind == "int8":
        return (N, K), "I8", (N,), "F32"
    return (N, K // 2), "U8", (N, K // INT4_GROUP), "F16"


def check_packed(reader, q: QuantFormat, name: str, shape: tuple[int, int]) -> str:
    """Check a moeyard-packed matrix of logical ``shape`` [N, K] (data and scale dtypes and shapes); its scale's
    name. Errors name the tensor."""
    if q.method != "moeyard":
        raise CheckpointError(f"tensor {name!r} is {reader.dtype(name)} with a weight_scale but config.json has no "
                              f"moeyard quantization_config ({reader.file_of(name)})")
    sn = packed_scale_name(name)
    dshape, ddt, sshape, sdt = packed_shapes(q.kind, tuple(shape))
    for n, want, dt in ((name, dshape, ddt), (sn, sshape, sdt)):
        if reader.dtype(n) != dt:
            raise CheckpointError(f"tensor {n!r} has dtype {reader.dtype(n)} but {q.kind} stores {dt} "
                                  f"({reader.file_of(n)})")
        if tuple(reader.shape(n)) != tuple(want):
            raise CheckpointError(f"tensor {n!r} has shape {list(reader.shape(n))} but {q.kind} of the config's "
                                  f"{list(shape)} needs {list(want)} ({reader.file_of(n)})")
    return sn


def read_packed(reader, q: QuantFormat, name: str, shape: tuple[int, int]):
    """The moeyard-packed matrix ``name`` as a ``compute.Packed`` (its bytes as stored, nothing re-quantized)."""
    from .compute import Packed
    sn = check_packed(reader, q, name, shape)
    return Packed(q.kind, reader.get(name), reader.get(sn), tuple(shape))


# ---- reading -----------------------------------------------------------------------------------------------------
def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def logical_shape(reader, name: str) -> tuple[int, ...]:
    """Shape of tensor ``name`` as transformers holds it (an MXFP4 pair: from its blocks [..., R, G, 16])."""
    if name not in reader and f"{name}_blocks" in reader:
        *lead, R, G, _ = reader.shape(f"{name}_blocks")
        return tuple(lead) + (G * MX_GROUP, R)
    return tuple(reader.shape(name))


def present(reader, name: str) -> bool:
    return name in reader or f"{name}_blocks" in reader


def stored_as(reader, name: str) -> str:
    """How tensor ``name`` is stored: "plain", "fp8" (float8 with a scale), "mxfp4" (``_blocks`` / ``_scales``) or
    "packed" (moeyard int8/int4 with ``weight_scale``)."""
    if name in reader:
        dt = reader.dtype(name)
        if dt.startswith("F8_") and dt != "F8_E4M3":
            raise CheckpointError(f"tensor {name!r} is {dt}: only e4m3 fp8 weights are supported "
                                  f"({reader.file_of(name)})")
        if dt in ("I8", "U8") and packed_scale_name(name) in reader:
            return "packed"
        return "fp8" if dt == "F8_E4M3" else "plain"
    if f"{name}_blocks" in reader:
        return "mxfp4"
    return "plain"    # missing: the plain read names it


def check_fp8(reader, q: QuantFormat, name: str, shape: tuple[int, ...]) -> str:
    """Check a float8 tensor against the config (quantized, not on the skip list) and its scale; its scale's name."""
    mod = module_of(name)
    if q.method != "fp8":
        raise CheckpointError(f"tensor {name!r} is float8 but config.json has no fp8 quantization_config "
                              f"({reader.file_of(name)})")
    if not q.converts(mod):
        raise CheckpointError(f"tensor {name!r} is float8 but quantization_config.modules_to_not_convert lists "
                              f"{mod!r} as unquantized ({reader.file_of(name)})")
    got = reader.shape(name)
    if tuple(got) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(got)} but the config implies {list(shape)} "
                              f"({reader.file_of(name)})")
    sn = fp8_scale_name(name)
    if sn not in reader:
        raise CheckpointError(f"tensor {sn!r} (the fp8 scales of {name!r}) not found in checkpoint {reader.path}")
    want = fp8_scale_shape(q, tuple(shape))
    got = tuple(reader.shape(sn))
    if got != want and not (q.block is None and int(torch.Size(got).numel()) == int(torch.Size(want).numel())):
        raise CheckpointError(f"tensor {sn!r} has shape {list(got)} but the fp8 scales of {name!r} {list(shape)} "
                              f"with weight_block_size {list(q.block or shape[-2:])} need {list(want)} "
                              f"({reader.file_of(sn)})")
    return sn


def check_mxfp4(reader, q: QuantFormat, name: str, shape: tuple[int, ...]) -> None:
    """Check the ``_blocks`` / ``_scales`` pair of an MXFP4 tensor of logical shape ``shape``."""
    if q.method != "mxfp4":
        raise CheckpointError(f"tensor {name}_blocks is MXFP4 but config.json has no mxfp4 quantization_config "
                              f"({reader.file_of(name + '_blocks')})")
    if not q.converts(module_of(name)):
        raise CheckpointError(f"tensor {name}_blocks is MXFP4 but quantization_config.modules_to_not_convert lists "
                              f"{module_of(name)!r} as unquantized ({reader.file_of(name + '_blocks')})")
    if shape[-2] % MX_GROUP:
        raise CheckpointError(f"tensor {name!r}: MXFP4 needs its input dimension ({shape[-2]}) to be a multiple of "
                              f"{MX_GROUP}")
    for n, want, dt in zip((f"{name}_blocks", f"{name}_scales"), mxfp4_shapes(shape), ("U8", "U8")):
        if n not in reader:
            raise CheckpointError(f"tensor {n!r} (MXFP4 {'scales' if n.endswith('scales') else 'blocks'} of "
                                  f"{name!r}) not found in checkpoint {reader.path}")
        if tuple(reader.shape(n)) != want:
            raise CheckpointError(f"tensor {n!r} has shape {list(reader.shape(n))} but the config implies "
                                  f"{list(want)} ({reader.file_of(n)})")
        if reader.dtype(n) != dt:
            raise CheckpointError(f"tensor {n!r} has dtype {reader.dtype(n)} but MXFP4 stores uint8 ({reader.file_of(n)})")


def read_tensor(reader, q: QuantFormat, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor ``name`` of ``shape`` as stored, dequantized when it is fp8 or MXFP4 (then float32)."""
    how = stored_as(reader, name)
    if how == "fp8":
        sn = check_fp8(reader, q, name, shape)
        return dequant_fp8(reader.get(name), reader.get(sn), q.block)
    if how == "mxfp4":
        check_mxfp4(reader, q, name, shape)
        return dequant_mxfp4(reader.get(f"{name}_blocks"), reader.get(f"{name}_scales")).transpose(-1, -2)
    if how == "packed":
        return read_packed(reader, q, name, shape).dequantize()
    return reader.get(name, shape)


def read_slice(reader, q: QuantFormat, name: str, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``name[index]`` of a fused tensor whose full shape is ``shape`` (dequantized when quantized); only that
    expert's bytes are read."""
    how = stored_as(reader, name)
    sl = lambda n: reader.slice(n)[index]    # noqa: E731
    if how == "fp8":
        sn = check_fp8(reader, q, name, shape)
        return dequant_fp8(sl(name), sl(sn), q.block)
    if how == "mxfp4":
        check_mxfp4(reader, q, name, shape)
        return dequant_mxfp4(sl(f"{name}_blocks"), sl(f"{name}_scales")).transpose(-1, -2)
    return sl(name)
