"""Build a model from a checkpoint directory: config, dense weights, an expert provider, the tokenizer."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .errors import ModelError
from .experts import ResidentExperts
from .model import MoEForCausalLM
from .quant_formats import read_tensor
from .tokenizer import Tokenizer
from .validate import check_finite, validate_checkpoint
from .weights import dense_checkpoint_name

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype, cfg: MoEConfig, device: torch.device) -> torch.dtype:
    """``None``: the checkpoint's dtype on GPU; float32 on CPU, where half-precision matmuls are slow or absent."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(cfg.torch_dtype, torch.float32)
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# Models shipped as package data: name -> folder of moe/. "default" is the Mixtral-shaped model (16 experts,
# top-2); "deepseek-mini" the fine-grained DeepSeek-V3-architecture one (64 experts, top-6, 2 shared, MLA).
EMBEDDED_MODELS = {"default": "default_model", "mixtral-mini": "default_model", "deepseek-mini": "deepseek_mini"}
_EMBEDDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def embedded_model_path(name: str = "default") -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), EMBEDDED_MODELS[name])


def default_model_path() -> str:
    return embedded_model_path("default")


def resolve_model_path(model: str) -> str:
    """A checkpoint directory, or the directory of an embedded model named in ``EMBEDDED_MODELS``."""
    if model in EMBEDDED_MODELS and not os.path.isdir(model):
        p = embedded_model_path(model)
        for fn in _EMBEDDED_FILES:
            if not os.path.isfile(os.path.join(p, fn)):
                raise ModelError(f"the embedded model {model!r} is incomplete: {os.path.join(p, fn)} is missing")
        return p
    return model


@dataclass
class LoadedModel:
    path: str
    cfg: MoEConfig
    model: MoEForCausalLM
    reader: CheckpointReader
    tokenizer: Tokenizer | None
    dtype: torch.dtype
    device: torch.device


class _Progress:
    """A progress bar on stderr while loading a checkpoint larger than 256 MB."""

    def __init__(self, total_bytes: int, layers: int):
        self.bar = None
        if total_bytes > (256 << 20):
            from tqdm import tqdm
            self.bar = tqdm(total=layers, desc="loading experts", unit="layer", file=sys.stderr, leave=False)

    def __call__(self, _layer):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_dense(cfg: MoEConfig, reader: CheckpointReader, dtype, device, max_positions=None,
                plan=None) -> MoEForCausalLM:
    """The model with its dense weights loaded from ``reader`` and no expert provider yet. With a ``plan`` that
    packs (``moe/compute.py``), each linear layer is packed as soon as it is read (a small load-time peak)."""
    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    from .rope import make_rotary
    model.rotary = make_rotary(cfg, max_positions or min(cfg.max_position_embeddings, 4096))
    model.rotary.to(device)
    for pname, p in list(model.named_parameters()):
        if pname == "lm_head.weight" and (cfg.tie_word_embeddings or pname not in reader) \
                and cfg.tie_word_embeddings:
            continue
        ck = dense_checkpoint_name(cfg, reader, pname)
        t = read_tensor(reader, cfg.quant, ck, tuple(p.shape))
        check_finite(ck, t, reader.file_of(ck) if ck in reader else "")
        t = t.to(device=device, dtype=dtype)
        mod_name, _, attr = pname.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        if plan is not None and plan.packs:
            from .compute import pack_module
            pack_module(model, mod_name, plan)
    if plan is not None and plan.packs:
        from .compute import finish_dense
        finish_dense(model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def compute_plan(cfg: MoEConfig, dtype: torch.dtype, device: torch.device, quantization=None):
    """The storage and kernels for this checkpoint on this machine (``moe/compute.py``). A checkpoint written by
    ``moeyard quantize`` brings its own quantization (another one asked for is refused)."""
    from .compute import check_quantization, plan_for
    quantization = check_quantization(quantization)
    if cfg.quant.method == "moeyard":
        if quantization not in (None, cfg.quant.kind):
            raise ModelError(f"quantization={quantization!r} asked for, but the checkpoint's routed experts are "
                             f"stored as {cfg.quant.kind} (moeyard quantize); use quantization={cfg.quant.kind!r} "
                             "or None")
        quantization = cfg.quant.kind
    ckpt_dtype = None if cfg.quant.method != "none" else cfg.torch_dtype
    return plan_for(ckpt_dtype, dtype, device, quantization)


def load_model(model: str, dtype=None, device=None, experts="resident", max_positions=None,
               quantization=None, plan=None) -> LoadedModel:
    """Load ``model`` (a directory or "default"). ``experts``: "resident" (all in memory), None (caller sets a
    provider later), or a callable ``(cfg, reader, dtype, device) -> provider``. ``quantization``: None, "int8"
    or "int4" (weight-only, ``moe/compute.py``); ``plan``: a ``ComputePlan`` chosen by the caller."""
    path = resolve_model_path(model)
    cfg = MoEConfig.from_dir(path)
    device = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, cfg, device)
    plan = plan or compute_plan(cfg, dt, device, quantization)
    if plan.packs:
        from .compute import fixed_mmap_threshold
        fixed_mmap_threshold()
    reader = CheckpointReader(path)
    validate_checkpoint(cfg, reader)
    m = build_dense(cfg, reader, dt, device, max_positions, plan=plan)
    m.plan = plan
    if experts == "resident":
        prog = _Progress(sum(reader.nbytes(n) for n in reader.names()), len(cfg.moe_layers))
        try:
            m.experts = ResidentExperts(cfg, reader, dt, device, progress=prog,
                                        pack=plan.experts if plan.packs else None)
        finally:
            prog.close()
    elif callable(experts):
        m.experts = experts(cfg, reader, dt, device)
    tok = Tokenizer.from_dir(path)
    return LoadedModel(path, cfg, m, reader, tok, dt, device)
