"""The engine job queue of `edgekv chat`: one engine call at a time, in order.

The engine keeps a single KV cache, so its calls must never overlap. Each thing the UI
asks of it (answer a question, process a document, change the budget, drop the KV) is a
named job; the queue starts the next one once the engine has loaded and the previous
job has finished. Every started job gets a number that tags all of its messages, so
`disown()` (used by /reset) turns the running job's late messages into stale ones.

    submit -> [waiting ...] --pump--> running --(its last message)--> finished -> pump
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from textual.message import Message

from .session import Emit


@dataclass(frozen=True)
class Job:
    """What a started job gets: its cancel flag and its (job-tagged) posters."""

    cancel: threading.Event
    post: Emit  # lifecycle messages; never blocks
    post_chunk: Emit  # streamed pieces; waits until the UI loop has queued each one


JobStart = Callable[[Job], None]  # runs on the UI loop and starts the job's worker


def _tagged(seq: int, post: Emit) -> Emit:
    def tagged_post(message: Message) -> bool:
        message.job = seq  # type: ignore[attr-defined]
        return post(message)

    return tagged_post


class JobQueue:
    def __init__(self, post: Emit, post_chunk: Emit) -> None:
        self._post, self._post_chunk = post, post_chunk
        self._waiting: deque[tuple[str, JobStart]] = deque()
        self._seq = 0
        self._live: int | None = None
        self.running: str | None = None  # name of the running job
        self.cancel = threading.Event()  # the running job's cancel flag
        self.paused = True  # until the engine has loaded

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, name: str, start: JobStart) -> None:
        self._waiting.append((name, start))
        self.pump()

    def pump(self) -> None:
        """Start the next waiting job if the engine is free."""
        if self.paused or self.running or not self._waiting:
            return
        name, start = self._waiting.popleft()
        self.running = name
        self.cancel = threading.Event()
        self._seq += 1
        self._live = seq = self._seq
        start(Job(self.cancel, _tagged(seq, self._post), _tagged(seq, self._post_chunk)))

    def finished(self) -> None:
        """The running job sent its last message."""
        self.running = None

    def is_live(self, message: Message) -> bool:
        """The message comes from the running job, and nobody disowned it."""
        return getattr(message, "job", None) == self._live

    def withdraw(self, name: str) -> bool:
        """Drop the first waiting job called `name`; False if there was none."""
        for entry in self._waiting:
            if entry[0] == name:
                self._waiting.remove(entry)
                return True
        return False

    def disown(self) -> None:
        """Cancel the running job, ignore what it still says, forget the waiting ones."""
        self.cancel.set()
        self._live = None
        self._waiting.clear()
