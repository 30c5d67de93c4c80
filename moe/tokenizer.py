"""A checkpoint's tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and its chat template."""

from __future__ import annotations

import json
import os

from .errors import ModelError

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class Tokenizer:
    def __init__(self, tok, config: dict):
        self._tok = tok
        self.config = config
        self.chat_template = config.get("chat_template")
        self.eos_token_id = self._id_of(config.get("eos_token"))
        self.bos_token_id = self._id_of(config.get("bos_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None

    def _id_of(self, tok):
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self._tok.token_to_id(tok) if tok else None

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer | None":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            return None
        from tokenizers import Tokenizer as HFTok
        try:
            tok = HFTok.from_file(tj)
        except Exception as e:
            raise ModelError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            try:
                with open(tc, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelError(f"{tc}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ModelError(f"{tc}: expected a JSON object")
        return cls(tok, cfg)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        tmpl = env.from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                   if k in ("bos_token", "eos_token")}
        special.setdefault("bos_token", "")
        special.setdefault("eos_token", "")
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
