"""Helpers to drive the chat app headless (textual's Pilot), for its tests."""

from __future__ import annotations

import time

from textual.pilot import Pilot
from textual.widgets import Input

from edgekv.tui.app import ChatApp
from edgekv.tui.widgets import AnswerBox, NoteBox


async def settle(pilot: Pilot, timeout_s: float = 10.0) -> None:
    """Wait until the model has loaded and no engine job is running or queued."""
    app = pilot.app
    assert isinstance(app, ChatApp)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await pilot.pause(0.01)
        if app.is_idle:
            await pilot.pause()
            return
    raise AssertionError(f"chat app still busy after {timeout_s} s (job: {app.busy})")


async def wait_for(pilot: Pilot, predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.01)
    raise AssertionError("condition not met in time")


async def submit(pilot: Pilot, line: str) -> None:
    """Put `line` in the input box and press Enter."""
    pilot.app.query_one("#prompt", Input).value = line
    await pilot.press("enter")
    await pilot.pause()


def notes(app: ChatApp, kind: str | None = None) -> list[str]:
    """Markdown of the app's own notes in the conversation, oldest first."""
    boxes = app.query(NoteBox)
    return [b.source for b in boxes if kind is None or b.has_class(f"-{kind}")]


def answers(app: ChatApp) -> list[AnswerBox]:
    return list(app.query(AnswerBox))
