"""What the chat app runs on its engine threads.

Each function here is one engine job. It runs off the UI loop, talks to the engine only,
and reports every outcome as a typed message through `emit` (thread-safe; returns False
once the app has gone). None of them raises: a failure becomes a message the UI shows.

Cancelling: the app sets `cancel` (a threading.Event). During decode the `on_token`
callback returns False, which the engine contract defines as "stop now"; during prefill
the `on_progress` callback raises `Cancelled` between two prefill chunks. The engine
keeps the KV of the chunks it finished (its kept token list grows chunk by chunk), so
the next call reuses them instead of starting over.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from textual.message import Message

from edgekv.errors import EdgekvError

from .conversation import Conversation, Turn
from .messages import (
    ContextOverflow,
    DocumentFailed,
    DocumentProgress,
    DocumentReady,
    EngineJobDone,
    ModelLoaded,
    ModelLoadFailed,
    ResponseChunk,
    ResponseDone,
    ResponseFailed,
    ResponseStarted,
    TrimPlanned,
)

Emit = Callable[[Message], bool]


class Engine(Protocol):
    """The part of the edgekv engine the chat app uses."""

    max_context: int  # tokens
    model_name: str
    policy: Any

    def generate(self, prompt_or_messages: Any, **kwargs: Any) -> Any: ...
    def count_tokens(self, prompt_or_messages: Any) -> int: ...
    def update_policy(self, **changes: Any) -> None: ...
    def reset(self) -> None: ...


class Cancelled(Exception):
    """Raised inside `on_progress` to abandon a prefill the user cancelled."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0


def describe(error: BaseException) -> str:
    """The text shown for an error: the message alone for errors users can fix."""
    if isinstance(error, EdgekvError):
        return str(error)
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    at = f" (at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
    return f"{type(error).__name__}: {error}{at}"


def load_engine(factory: Callable[[], Engine], emit: Emit) -> None:
    started = time.perf_counter()
    try:
        engine = factory()
    except Exception as error:  # noqa: BLE001 - every failure is shown, the app stays up
        emit(ModelLoadFailed(describe(error)))
        return
    emit(ModelLoaded(engine, time.perf_counter() - started))


def _prefill_progress(cancel: threading.Event, emit: Emit) -> Callable[[int, int], None]:
    def on_progress(done_tokens: int, total_tokens: int) -> None:
        if cancel.is_set():
            raise Cancelled
        emit(DocumentProgress(done_tokens, total_tokens))

    return on_progress


def prefill_document(
    engine: Engine, messages: list[dict[str, str]], name: str, sampling: Sampling,
    cancel: threading.Event, emit: Emit, doc_cache_dir: Any = None,
) -> None:
    """Process the document now (no answer) so the next question finds its KV ready.

    With a `doc_cache_dir` (edgekv's persistent document cache) the document's KV is
    loaded from it when another run processed the same document, and saved otherwise.
    """
    try:
        tokens = engine.count_tokens(messages)
        if tokens + sampling.max_new_tokens > engine.max_context:
            emit(DocumentFailed(name, (
                f"`{name}` needs {tokens:,} tokens plus {sampling.max_new_tokens:,} for the "
                f"answer, but the model holds {engine.max_context:,}. Load a shorter "
                "document or `/reset` first.")))
            return
        if doc_cache_dir is not None:
            from edgekv.doccache import DocumentCache
            from edgekv.prefix_cache import process_document

            stats = process_document(engine, messages, DocumentCache(doc_cache_dir),
                                     _prefill_progress(cancel, emit))
        else:
            stats = engine.generate(
                messages, max_new_tokens=0, temperature=sampling.temperature,
                on_progress=_prefill_progress(cancel, emit),
            ).stats
    except Cancelled:
        emit(DocumentFailed(name, "stopped; it will be processed with your next question",
                            keep=True))
        return
    except Exception as error:  # noqa: BLE001
        emit(DocumentFailed(name, describe(error)))
        return
    emit(DocumentReady(name, dict(stats)))


def answer(
    engine: Engine, messages: list[dict[str, str]], sampling: Sampling,
    cancel: threading.Event, emit: Emit, emit_chunk: Emit,
) -> None:
    """One chat turn: check it fits, stream the answer, report the figures."""
    shown: list[str] = []
    try:
        tokens = engine.count_tokens(messages)
        if tokens + sampling.max_new_tokens > engine.max_context:
            emit(ContextOverflow(tokens, sampling.max_new_tokens, engine.max_context))
            return
        emit(ResponseStarted())

        def on_token(piece: str) -> bool:
            if cancel.is_set():
                return False
            shown.append(piece)
            if not emit_chunk(ResponseChunk(piece)):
                cancel.set()  # the app is gone: stop decoding
                return False
            return True

        result = engine.generate(
            messages, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, on_token=on_token,
            on_progress=_prefill_progress(cancel, emit),
        )
    except Cancelled:
        emit(ResponseDone("".join(shown), {"finish_reason": "cancelled"}))
        return
    except Exception as error:  # noqa: BLE001
        emit(ResponseFailed(describe(error), "".join(shown)))
        return
    stats = dict(result.stats)
    text = "".join(shown) if stats.get("finish_reason") == "cancelled" else result.text
    emit(ResponseDone(text, stats))


def plan_trim(
    engine: Engine, conversation: Conversation, question: str, sampling: Sampling,
    emit: Emit,
) -> None:
    """Find the fewest oldest turns to drop so `question` fits; report it (or None)."""
    limit = engine.max_context - sampling.max_new_tokens
    asked = Turn(question=question, document=conversation.pending_document)
    tokens = 0
    try:
        for drop in range(len(conversation.droppable()) + 1):
            kept = conversation.without_oldest(drop) + [asked]
            tokens = engine.count_tokens(conversation.messages(kept))
            if tokens <= limit:
                emit(TrimPlanned(drop, tokens))
                return
    except Exception as error:  # noqa: BLE001
        emit(EngineJobDone("trim", error=describe(error)))
        return
    emit(TrimPlanned(None, tokens))


def run_command(name: str, action: Callable[[], str], emit: Emit) -> None:
    """A small engine command (update the policy, drop the KV); `action` returns a note."""
    try:
        note = action()
    except Exception as error:  # noqa: BLE001
        emit(EngineJobDone(name, error=describe(error)))
        return
    emit(EngineJobDone(name, note))
