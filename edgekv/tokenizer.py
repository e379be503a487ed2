"""A model's tokenizer and chat template, read straight from its Hugging Face folder.

The `tokenizers` library (the engine inside transformers' fast tokenizers) reads
tokenizer.json, and jinja2 renders the chat template the way transformers does
(trim_blocks, lstrip_blocks, `raise_exception`); importing transformers' tokenizer
classes would add seconds to every start. Folders without a tokenizer.json fall back
to transformers' AutoTokenizer (see `load_tokenizer` in loader.py).
"""

from __future__ import annotations

import json
from pathlib import Path


class FastTokenizer:
    """The subset of a transformers tokenizer edgekv uses: encode, decode, chat template."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template_file = folder / "chat_template.jinja"
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else config.get("chat_template"))
        self.special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos = self.special["eos_token"]
        self.eos_token_id = self.backend.token_to_id(eos) if eos else None
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Render messages with the model's template; token ids (no added specials) or text."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special.items() if v})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value
