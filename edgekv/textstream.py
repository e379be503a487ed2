"""Turning generated token ids into text pieces as they arrive, and finding stop strings."""

from __future__ import annotations


class TextStream:
    """Incremental detokenizer: `push(id)` returns the new text it completes (maybe "").

    Text is re-decoded from a small window of recent ids so multi-token characters and
    tokenizer spacing come out exactly as a full decode would; a trailing U+FFFD (an
    unfinished UTF-8 sequence) is held back until the next token completes it. With no
    tokenizer (a model of random weights) there is no text: every piece is "".
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix_start = 0  # ids before this are settled
        self._prefix_text = ""  # decode of ids[_prefix_start:_read]
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode(self.ids[self._prefix_start:])
        if full.endswith("\ufffd"):
            return ""
        piece = full[len(self._prefix_text):]
        if len(self.ids) - self._prefix_start > 8:  # slide the window forward
            self._prefix_start = len(self.ids) - 4
            self._prefix_text = self._decode(self.ids[self._prefix_start:])
        else:
            self._prefix_text = full
        self.text += piece
        return piece


def find_stop(text: str, stops: list[str], search_from: int) -> int | None:
    """Index in `text` where the earliest stop string starts at or after `search_from`, or None."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, search_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None
