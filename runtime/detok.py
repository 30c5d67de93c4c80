"""Incremental detokenisation: a sequence's text grows by a delta per token instead of re-decoding every output
token at every step (which is quadratic in the output length).

The delta of a new token is ``decode(ids[prefix:]) - decode(ids[prefix:read])``: both decodes start at the same
offset, so a decoder that strips or adds something at the start of a string (a leading space) affects both
alike; a decode ending in U+FFFD (an incomplete UTF-8 sequence split across byte tokens) is held back until the
next token completes it. Offsets then move up, so each step decodes only a few tokens.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    __slots__ = ("tok", "prefix", "read", "text")

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.prefix = 0      # decode windows start here
        self.read = 0        # tokens up to here are already in ``text``
        self.text = ""

    def update(self, ids: list[int]) -> str:
        """``ids``: all output ids so far (one or more appended since the last call); returns the text so far."""
        prefix_text = self.tok.decode(ids[self.prefix:self.read])
        new_text = self.tok.decode(ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(ids)
        return self.text
