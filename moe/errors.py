"""User-facing errors. Every message names the thing that is wrong (file, tensor, parameter)."""


class MoeyardError(ValueError):
    """Base of errors caused by the user's input; the CLI prints them as one line and exits 2."""


class ModelError(MoeyardError):
    """A checkpoint or its config cannot be used."""


class CheckpointError(ModelError):
    """A safetensors file is missing, truncated or lacks a tensor."""
