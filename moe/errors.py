"""User-facing errors. Every message names the thing that is wrong (file, tensor, parameter)."""


class MoeyardError(ValueError):
    """Base of errors caused by the user's input; the CLI prints them as one line and exits 2."""


class ModelError(MoeyardError):
    """A checkpoint or its config cannot be used."""


class CheckpointError(ModelError):
    """A safetensors file is missing, truncated or lacks a tensor."""


def lookup(registry: dict, name, what: str):
    """``registry[name]``; an unknown name raises MoeyardError listing the valid ones (``what``: the option)."""
    if name not in registry:
        raise MoeyardError(f"{what} must be one of {', '.join(map(repr, registry))}, got {name!r}")
    return registry[name]


def check_options(given, takes, what: str):
    """MoeyardError naming ``what`` (a registry entry) and every option of ``given`` it does not take."""
    bad = [k for k in given or () if k not in takes]
    if bad:
        raise MoeyardError(f"{what} does not take {', '.join(map(repr, bad))}; it takes: "
                           f"{', '.join(takes) or 'no options'}")
