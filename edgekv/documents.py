"""Reading a user's document and laying out the prompt around it.

The document comes first and the question after it, so the document's tokens are a
prefix that a later question can reuse (the engine keeps that KV).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import EdgekvError

TRUNCATE_MODES = ("head", "tail", "middle")


def read_document(path: str) -> str:
    """The UTF-8 text of `path` ("-" = stdin); a clear EdgekvError for anything unusable."""
    if path == "-":
        data = sys.stdin.buffer.read()
        where = "standard input"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise EdgekvError(f"document not found: {p}")
        if p.is_dir():
            raise EdgekvError(f"{p} is a directory: pass a text file (or - for standard input)")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise EdgekvError(f"cannot read {p}: {exc.strerror or exc}") from None
        where = str(p)
    if b"\x00" in data:
        raise EdgekvError(f"{where} looks like a binary file: pass a UTF-8 text document")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgekvError(f"{where} is not UTF-8 text (bad byte at offset {exc.start}): convert it to UTF-8 first") from None
    if not text.strip():
        raise EdgekvError(f"{where} is empty: give a document with some text")
    return text


def document_messages(document: str, question: str) -> list[dict]:
    """One user turn: the document, a blank line, then the question."""
    return [{"role": "user", "content": f"{document.rstrip()}\n\n{question.strip()}"}]


def fit_document(engine, document: str, question: str, *, max_new_tokens: int, truncate: str | None) -> str:
    """The document, cut to fit the context if `truncate` says how; else unchanged.

    truncate: "head" drops the beginning, "tail" drops the end, "middle" drops the middle.
    """
    if truncate is None:
        return document
    if truncate not in TRUNCATE_MODES:
        raise EdgekvError(f"invalid --truncate {truncate!r}: use head, tail or middle")
    overhead = engine.count_tokens(document_messages("", question))
    room = engine.max_context - max_new_tokens - overhead - 8  # a little slack for joins
    if room <= 0:
        raise EdgekvError(
            f"no room for the document: the question and --max-new-tokens {max_new_tokens} already "
            f"fill the model's {engine.max_context}-token context"
        )
    ids = engine.tokenizer.encode(document, add_special_tokens=False)
    if len(ids) <= room:
        return document
    if truncate == "head":
        kept = ids[-room:]
    elif truncate == "tail":
        kept = ids[:room]
    else:
        kept = ids[: room // 2] + ids[len(ids) - (room - room // 2):]
    return engine.tokenizer.decode(kept)


def pydoc_text(seed: int | None = None) -> str:
    """A long real English text that ships with every Python: its pydoc topics, joined
    by blank lines, in name order (or shuffled by `seed`). Benchmarks and tests read it."""
    import random

    from pydoc_data.topics import topics

    keys = sorted(topics)
    if seed is not None:
        random.Random(seed).shuffle(keys)
    return "\n\n".join(topics[k] for k in keys)
