"""Typed messages from the engine thread to the chat UI.

The engine runs in worker threads; every thing it has to tell the UI travels as one of
these messages (posted thread-safely), and the app reacts to them on its own loop. One
message per lifecycle step keeps the UI state machine readable:

    ModelLoaded | ModelLoadFailed
    DocumentProgress* -> DocumentReady | DocumentFailed
    ResponseStarted -> ResponseChunk* -> ResponseDone | ResponseFailed
    ContextOverflow            (the turn was not sent: prompt + answer > model maximum)
    TrimPlanned                (how many old turns /trim has to drop)
    EngineJobDone              (a small engine command such as /budget or /reset finished)
"""

from __future__ import annotations

from typing import Any

from textual.message import Message


class ModelLoaded(Message):
    """The engine is loaded and ready for requests."""

    def __init__(self, engine: Any, load_s: float) -> None:
        super().__init__()
        self.engine = engine
        self.load_s = load_s  # seconds


class ModelLoadFailed(Message):
    """Loading the engine failed; `error` is the message to show."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DocumentProgress(Message):
    """Prefill progress of the attached document, in prompt tokens."""

    def __init__(self, done_tokens: int, total_tokens: int) -> None:
        super().__init__()
        self.done_tokens = done_tokens
        self.total_tokens = total_tokens


class DocumentReady(Message):
    """The document's KV is in the engine; later questions reuse it."""

    def __init__(self, name: str, stats: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.stats = stats


class DocumentFailed(Message):
    """The document could not be processed (too long, engine error, cancelled)."""

    def __init__(self, name: str, error: str, *, keep: bool = False) -> None:
        super().__init__()
        self.name = name
        self.error = error
        self.keep = keep  # True: the document stays attached to the next question


class ResponseStarted(Message):
    """The engine accepted the turn; pieces of the answer follow."""


class ResponseChunk(Message):
    """One streamed piece of the answer's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ResponseDone(Message):
    """The answer is complete (or cancelled: `finish_reason == "cancelled"`)."""

    def __init__(self, text: str, stats: dict[str, Any]) -> None:
        super().__init__()
        self.text = text
        self.stats = stats

    @property
    def finish_reason(self) -> str:
        return str(self.stats.get("finish_reason", "eos"))


class ResponseFailed(Message):
    """Generation raised; `error` is the message to show, `partial` what had streamed."""

    def __init__(self, error: str, partial: str = "", *, cancelled: bool = False) -> None:
        super().__init__()
        self.error = error
        self.partial = partial
        self.cancelled = cancelled


class ContextOverflow(Message):
    """The turn would not fit the model's context; nothing was sent."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
        super().__init__()
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context


class TrimPlanned(Message):
    """/trim worked out how many old turns to drop (`None`: dropping all is not enough)."""

    def __init__(self, drop_turns: int | None, prompt_tokens: int) -> None:
        super().__init__()
        self.drop_turns = drop_turns
        self.prompt_tokens = prompt_tokens


class EngineJobDone(Message):
    """A small engine command finished; `error` is set when it raised."""

    def __init__(self, name: str, note: str = "", error: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.note = note
        self.error = error
