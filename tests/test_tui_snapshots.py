"""Screens of `edgekv chat` compared with accepted SVG snapshots (pytest-textual-snapshot).

The scripted engine reports frozen figures, so nothing time-dependent reaches a screen.
Update after a deliberate change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import Input

from edgekv.tui.app import ChatApp
from tui_fake import FakeEngine
from tui_pilot import settle, submit

SIZE = (110, 34)


async def _steady(pilot: Pilot) -> None:
    pilot.app.query_one(Input).cursor_blink = False
    await settle(pilot)


def _document(tmp_path: Path, words: int) -> str:
    doc = tmp_path / "pydoc_topics.txt"
    doc.write_text(" ".join(f"w{i}" for i in range(words)) + "\n")
    return str(doc)


def test_main_screen_after_a_turn(snap_compare, tmp_path: Path) -> None:
    # 5,000 document tokens: the KV spreads over device, RAM and disk
    engine = FakeEngine(hit_rate=0.93)
    app = ChatApp(lambda: engine, doc=_document(tmp_path, 5000))

    async def run_before(pilot: Pilot) -> None:
        await _steady(pilot)
        await submit(pilot, "What is the secret passkey?")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help(snap_compare) -> None:
    engine = FakeEngine()
    app = ChatApp(lambda: engine)

    async def run_before(pilot: Pilot) -> None:
        await _steady(pilot)
        await submit(pilot, "/help")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_overflow_warning(snap_compare) -> None:
    engine = FakeEngine(reply="a b c d e", max_context=100)
    app = ChatApp(lambda: engine, max_new_tokens=30)

    async def run_before(pilot: Pilot) -> None:
        await _steady(pilot)
        for i in range(4):
            await submit(pilot, f"one two three four five six seven eight nine q{i}")
            await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_loading_model(snap_compare) -> None:
    release = threading.Event()

    def slow_load() -> FakeEngine:
        release.wait(timeout=30)
        return FakeEngine()

    app = ChatApp(slow_load, model_label="SmolLM2-135M-Instruct")

    async def run_before(pilot: Pilot) -> None:
        pilot.app.query_one(Input).cursor_blink = False
        await pilot.pause()

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    finally:
        release.set()
