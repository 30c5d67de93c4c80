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
from .tokenizer import Tokenizer
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


def default_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


def resolve_model_path(model: str) -> str:
    if model == "default":
        p = default_model_path()
        if not os.path.isfile(os.path.join(p, "config.json")):
            raise ModelError(f"the embedded default model is missing from {p}")
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


def build_dense(cfg: MoEConfig, reader: CheckpointReader, dtype, device, max_positions=None) -> MoEForCausalLM:
    """The model with its dense weights loaded from ``reader`` and no expert provider yet."""
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
        t = reader.get(ck, tuple(p.shape)).to(device=device, dtype=dtype)
        mod_name, _, attr = pname.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def load_model(model: str, dtype=None, device=None, experts="resident", max_positions=None) -> LoadedModel:
    """Load ``model`` (a directory or "default"). ``experts``: "resident" (all in memory), None (caller sets a
    provider later), or a callable ``(cfg, reader, dtype, device) -> provider``."""
    path = resolve_model_path(model)
    cfg = MoEConfig.from_dir(path)
    device = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, cfg, device)
    reader = CheckpointReader(path)
    m = build_dense(cfg, reader, dt, device, max_positions)
    if experts == "resident":
        prog = _Progress(sum(reader.nbytes(n) for n in reader.names()), len(cfg.moe_layers))
        try:
            m.experts = ResidentExperts(cfg, reader, dt, device, progress=prog)
        finally:
            prog.close()
    elif callable(experts):
        m.experts = experts(cfg, reader, dt, device)
    tok = Tokenizer.from_dir(path)
    return LoadedModel(path, cfg, m, reader, tok, dt, device)
