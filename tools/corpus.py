"""The shared corpus behind the default model: domains, the train/validation split, tokenised streams.

Text is read in place from ``../shared/corpus`` (never copied into the repo). The last 5% of each file (cut at a
line boundary) is the validation split. Documents are joined with ``<|endoftext|>``: every line of ``c4.txt`` is
one web page; the other files are treated as one stream each, and an end-of-text token closes every file.
"""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CORPUS = os.environ.get("MOEYARD_CORPUS", os.path.join(ROOT, "..", "shared", "corpus"))
DOMAINS = ("arxiv", "c4", "github", "wikipedia")
VAL_FRACTION = 0.05
EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|system|>", "<|user|>", "<|assistant|>"]


def read_domain(domain: str) -> str:
    with open(os.path.join(CORPUS, f"{domain}.txt"), encoding="utf-8") as f:
        return f.read()


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, validation): validation is the last ``val_fraction`` of the characters, from a line start."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl != -1 else cut
    return text[:cut], text[cut:]


def documents(domain: str, text: str) -> list[str]:
    if domain == "c4":
        return [line for line in text.split("\n") if line.strip()]
    return [text]


def split(domain: str, part: str) -> str:
    """The ``part`` ("train" or "val") text of ``domain``."""
    train, val = split_text(read_domain(domain))
    return train if part == "train" else val


def encode_stream(tok, domain: str, part: str) -> np.ndarray:
    """Token ids of a split, documents separated (and ended) by ``<|endoftext|>``; ``tok`` is a tokenizers.Tokenizer."""
    eot = tok.token_to_id(EOT)
    docs = documents(domain, split(domain, part))
    out: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.int32)


# Python source that is not in the corpus (github.txt is mostly JavaScript, Go and C with some Python, none of
# these files): modules of the running interpreter's standard library, read in place, for routing-health checks
# on code no one here wrote.
PYTHON_MODULES = ("argparse.py", "dataclasses.py", "json/decoder.py", "json/encoder.py", "textwrap.py",
                  "heapq.py", "bisect.py", "fractions.py", "statistics.py", "functools.py", "shlex.py",
                  "csv.py", "difflib.py", "enum.py")


def python_source() -> str:
    import sysconfig
    lib = sysconfig.get_paths()["stdlib"]
    parts = []
    for m in PYTHON_MODULES:
        p = os.path.join(lib, m)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                parts.append(f.read())
    return "\n".join(parts)


def python_source_ids(tok) -> np.ndarray:
    return np.asarray(tok.encode(python_source(), add_special_tokens=False).ids, dtype=np.int32)
