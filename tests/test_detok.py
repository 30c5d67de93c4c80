"""Incremental detokenisation gives exactly the full decode, token by token (multi-byte characters split across
byte tokens included), and stop strings are still found when they straddle tokens."""

import numpy as np

from moeyard.moe.loader import resolve_model_path
from moeyard.moe.tokenizer import Tokenizer
from moeyard.runtime.detok import IncrementalDetokenizer

TEXTS = ["Hello, world! The café serves crème brûlée — 3.14 ≈ π. 日本語のテキスト 🙂🚀 done.",
         "  leading spaces\nand\ttabs\n\n  def f(x):\n      return x ** 2  # émoji 🎉",
         "ÀÉÎÕÜ ß ø å ğ ş ı 한국어 العربية עברית ελληνικά русский"]


def tok():
    return Tokenizer.from_dir(resolve_model_path("default"))


def test_incremental_equals_full_decode_on_text():
    t = tok()
    for s in TEXTS:
        ids = t.encode(s)
        d = IncrementalDetokenizer(t)
        for i in range(1, len(ids) + 1):
            got = d.update(ids[:i])
            full = t.decode(ids[:i])
            assert full.startswith(got)                 # never ahead of the truth, never wrong
            assert len(full) - len(got) <= 4 or full.endswith("\ufffd")
        assert got == t.decode(ids)


def test_incremental_equals_full_decode_random_ids():
    t = tok()
    rng = np.random.default_rng(0)
    V = t._tok.get_vocab_size()
    for _ in range(20):
        ids = rng.integers(0, V, 60).tolist()
        d = IncrementalDetokenizer(t)
        for i in range(1, len(ids) + 1):
            got = d.update(ids[:i])
        full = t.decode(ids)
        assert got == full or (full.endswith("\ufffd") and full.startswith(got))


def test_stop_string_across_tokens():
    from moeyard.runtime import LLM, SamplingParams
    llm = LLM("default")
    free = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    words = free.text.split()
    assert len(words) >= 4
    stop = " " + words[2]
    got = llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                          stop=[stop]))[0]
    assert got.finish_reason == "stop" and got.text == free.text[:free.text.index(stop)]
