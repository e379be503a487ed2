"""The `edgekv chat` app driven headless with a fast scripted engine (and one real turn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import Input, ProgressBar, Static

from edgekv.errors import EdgekvError
from edgekv.tui import commands, figures
from edgekv.tui.app import ChatApp
from edgekv.tui.conversation import Conversation, Document, read_document
from tui_fake import DEFAULT_REPLY, FakeEngine
from tui_pilot import answers, notes, settle, submit, wait_for
from edgekv.tui.widgets import StatsPanel, UserBox, bar_text

SIZE = (110, 36)


def make_app(engine: FakeEngine | None = None, **kwargs) -> tuple[ChatApp, FakeEngine]:
    engine = engine or FakeEngine()
    return ChatApp(lambda: engine, **kwargs), engine


def status(app: ChatApp) -> str:
    return str(app.query_one("#status", Static).render())


def panel_text(app: ChatApp, widget_id: str) -> str:
    return str(app.query_one(StatsPanel).query_one(f"#{widget_id}", Static).render())


# -- pure parts ------------------------------------------------------------------------

def test_parse_commands() -> None:
    inv = commands.parse_command("  /LOAD  my doc.txt ")
    assert inv.command.name == "load" and inv.arg == "my doc.txt"
    assert commands.parse_command("/reset").arg == ""
    with pytest.raises(commands.CommandError, match="Unknown command `/frob`.*/help"):
        commands.parse_command("/frob")
    with pytest.raises(commands.CommandError, match="needs FILE"):
        commands.parse_command("/save")
    assert commands.parse_budget("2048") == 2048
    assert commands.parse_budget("10%") == "10%"
    assert commands.parse_budget("ALL") == "all"


def test_every_command_has_a_handler_and_help_lists_it() -> None:
    text = commands.help_markdown()
    for name in commands.COMMANDS:
        assert callable(getattr(ChatApp, f"cmd_{name}", None)), name
        assert f"`/{name}" in text


def test_read_document_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgekvError, match="not found"):
        read_document(tmp_path / "missing.txt")
    with pytest.raises(EdgekvError, match="directory"):
        read_document(tmp_path)
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(EdgekvError, match="binary"):
        read_document(tmp_path / "blob.bin")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(EdgekvError, match="not UTF-8"):
        read_document(tmp_path / "latin.txt")
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(EdgekvError, match="empty"):
        read_document(tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("hello\n")
    assert read_document(tmp_path / "ok.txt") == Document("ok.txt", "hello")


def test_conversation_messages_document_and_trim() -> None:
    conv = Conversation(system="be brief")
    conv.ask("q0")
    conv.answer("a0")
    conv.pending_document = Document("d.txt", "DOC")
    assert conv.document_messages()[-1] == {"role": "user", "content": "DOC\n\n"}
    conv.ask("q1")
    assert conv.pending_document is None
    conv.answer("a1")
    conv.ask("q2")
    conv.answer("a2", cancelled=True)
    msgs = conv.messages()
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[3] == {"role": "user", "content": "DOC\n\nq1"}
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3
    # the document turn is never dropped; the others go oldest first
    assert [conv.turns[i].question for i in conv.droppable()] == ["q0", "q2"]
    conv.drop_oldest(1)
    assert [t.question for t in conv.turns] == ["q1", "q2"]
    # a withdrawn turn gives its document back
    conv.reset()
    conv.pending_document = Document("d.txt", "DOC")
    conv.ask("q")
    conv.withdraw()
    assert conv.turns == [] and conv.pending_document == Document("d.txt", "DOC")


def test_transcript_markdown() -> None:
    conv = Conversation()
    conv.pending_document = Document("notes.txt", "x" * 1500)
    conv.ask("What is *it*?")
    conv.answer("It is **this**.", cancelled=True)
    md = conv.transcript("tiny-model")
    assert md.startswith("# edgekv chat with tiny-model\n")
    assert "`notes.txt` (1,500 characters" in md
    assert "## You\n\nWhat is *it*?" in md
    assert "## Assistant\n\nIt is **this**.\n\n*(cancelled)*" in md
    assert "x" * 100 not in md


def test_figures() -> None:
    assert figures.human_bytes(512) == "512 B"
    assert figures.human_bytes(3 * 1024**2) == "3.0 MiB"
    assert figures.human_bytes(5 * 1024**4) == "5120.0 GiB"
    assert figures.share(None) == figures.DASH
    assert figures.share(0.875) == "88%"
    assert figures.seconds(0.042) == "42 ms" and figures.seconds(2.5) == "2.50 s"
    table = figures.stats_markdown({"decode_tok_s": 12.0, "kv_bytes": {"ram": 2048, "nvme": 1}})
    assert "| decode | 12.0 tok/s |" in table and "| KV RAM | 2.0 KiB |" in table
    assert "| KV nvme | 1 B |" in table and "| prefetch hit rate | — |" in table
    more = figures.stats_markdown({"kv_read_bytes_per_token": {"ram": 4096}, "kv_gbps": {"disk": 1.5}})
    assert "| KV read per token, RAM | 4.0 KiB |" in more and "| KV bandwidth, disk | 1.500 GB/s |" in more
    assert bar_text(0.0, 4) == ("", "    ")
    assert bar_text(1.0, 4) == ("████", "")
    assert bar_text(0.5, 3) == ("█▌", " ")


def test_fake_engine_contract() -> None:
    engine = FakeEngine(reply="one two three")
    seen: list[str] = []
    result = engine.generate([{"role": "user", "content": "hi"}], on_token=seen.append)
    assert result.text == "one two three" and "".join(seen) == result.text
    assert result.stats["finish_reason"] == "eos" and result.stats["reused_tokens"] == 0
    stop = engine.generate("a b", on_token=lambda piece: False)
    assert stop.stats["finish_reason"] == "cancelled" and stop.text == ""
    with pytest.raises(EdgekvError, match="budget"):
        engine.update_policy(budget="lots")
    engine.update_policy(budget="10%")
    assert engine.policy.budget == "10%"


# -- the app ---------------------------------------------------------------------------

async def test_layout_focus_and_ready() -> None:
    app, engine = make_app(FakeEngine(hit_rate=0.93))
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.focused, Input)
        await settle(pilot)
        assert status(app) == "ready"
        assert panel_text(app, "model-name") == "fake-smollm"
        assert panel_text(app, "policy") == "budget all\nbits   4-bit"
        assert not app.query_one("#doc-progress", ProgressBar).display
        bindings = {b.key for b in app.BINDINGS}
        assert {"escape", "f1", "ctrl+c"} <= bindings
        await submit(pilot, "hello")
        await settle(pilot)
        rates = panel_text(app, "rates")
        assert "56.7 tok/s" in rates and "42 ms" in rates and "93%" in rates


async def test_startup_is_fast_while_the_model_loads() -> None:
    release = threading.Event()
    engine = FakeEngine()

    def slow_factory() -> FakeEngine:
        release.wait(timeout=10)
        return engine

    started = time.perf_counter()
    app = ChatApp(slow_factory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.focused, Input))
        ready_s = time.perf_counter() - started
        assert ready_s < 2.0, ready_s
        assert status(app) == "loading model…"
        # a question asked while loading waits for the model, then is answered
        await submit(pilot, "early question")
        assert any("still loading" in n for n in notes(app))
        assert engine.calls == []
        release.set()
        await settle(pilot)
        assert app.conversation.turns[0].answer == DEFAULT_REPLY
    print(f"\nstartup (ChatApp() -> input focused, fake engine): {ready_s * 1000:.0f} ms")


def test_tui_import_is_light_and_starts_fast() -> None:
    """In a fresh interpreter: importing the app pulls in no torch; time to focused input."""
    code = """
import asyncio, json, sys, time
t0 = time.perf_counter()
from edgekv.tui.app import ChatApp
from tui_fake import FakeEngine
from textual.widgets import Input
imported = time.perf_counter() - t0
heavy = sorted(m for m in ("torch", "transformers", "edgekv.engine") if m in sys.modules)
async def main():
    app = ChatApp(FakeEngine)
    async with app.run_test() as pilot:
        while not isinstance(app.focused, Input):
            await pilot.pause(0.005)
        return time.perf_counter() - t0
focused = asyncio.run(main())
print(json.dumps({"import_s": imported, "focused_s": focused, "heavy": heavy}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH"))))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, env=env)
    figures_ = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\ncold start: import {figures_['import_s'] * 1000:.0f} ms, "
          f"input focused after {figures_['focused_s'] * 1000:.0f} ms")
    assert figures_["heavy"] == []
    assert figures_["focused_s"] < 2.0


async def test_multi_turn_resends_the_conversation_and_reuses_kv() -> None:
    app, engine = make_app(FakeEngine(reply="short answer", token_delay_s=0.001))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "first question")
        await settle(pilot)
        await submit(pilot, "second question")
        await settle(pilot)
        assert engine.calls[1] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "short answer"},
            {"role": "user", "content": "second question"},
        ]
        assert app.last_stats["reused_tokens"] > 0
        assert [b.text for b in answers(app)] == ["short answer", "short answer"]
        assert [str(u.render()) for u in app.query(UserBox)] == [
            "first question", "second question"]
        assert app.query_one(Input).value == ""


async def test_document_is_processed_at_once_then_heads_the_first_question(
    tmp_path: Path,
) -> None:
    doc = tmp_path / "story.txt"
    doc.write_text(" ".join(f"word{i}" for i in range(600)) + "\n")
    engine = FakeEngine(prefill_delay_s=0.01)
    app, _ = make_app(engine, doc=str(doc))
    async with app.run_test(size=SIZE) as pilot:
        bar = app.query_one("#doc-progress", ProgressBar)
        await wait_for(pilot, lambda: bar.display and (bar.progress or 0) > 0)
        assert status(app) == "processing document…"
        await settle(pilot)
        assert not bar.display
        text = doc.read_text().rstrip()
        assert engine.calls[0] == [{"role": "user", "content": text + "\n\n"}]
        assert engine.max_new_tokens_seen[0] == 0
        assert any("`story.txt` is processed: 604 prompt tokens" in n for n in notes(app))
        await submit(pilot, "what is word7?")
        await settle(pilot)
        assert engine.calls[1] == [{"role": "user", "content": text + "\n\nwhat is word7?"}]
        assert app.last_stats["reused_tokens"] >= 600
        assert "document: story.txt" in str(app.query(UserBox).last().render())
        await submit(pilot, "and word8?")
        await settle(pilot)
        assert engine.calls[2][0]["content"].startswith(text)  # stays the first message


async def test_load_command_errors_keep_the_app_usable(tmp_path: Path) -> None:
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_text("")
    app, engine = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for name in ("missing.txt", "bin.dat", "empty.txt"):
            await submit(pilot, f"/load {tmp_path / name}")
        await submit(pilot, "/load")
        await settle(pilot)
        errors = notes(app, "error")
        assert "not found" in errors[0]
        assert "binary" in errors[1] and "empty" in errors[2]
        assert any("needs FILE" in n for n in notes(app, "warning"))
        assert app.conversation.pending_document is None and engine.calls == []
        await submit(pilot, "still there?")
        await settle(pilot)
        assert app.conversation.turns[0].answer == DEFAULT_REPLY


async def test_document_too_long_for_the_model(tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("word " * 500)
    app, engine = make_app(FakeEngine(max_context=300), max_new_tokens=50)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, f"/load {doc}")
        await settle(pilot)
        assert "but the model holds 300" in notes(app, "error")[0]
        assert app.conversation.pending_document is None and engine.calls == []


async def test_budget_command() -> None:
    app, engine = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "/budget 10%")
        await settle(pilot)
        assert engine.policy.budget == "10%"
        assert panel_text(app, "policy").startswith("budget 10%")
        await submit(pilot, "/budget 2048")
        await settle(pilot)
        assert engine.policy.budget == 2048
        await submit(pilot, "/budget plenty")
        await settle(pilot)
        assert "`/budget` failed: budget must be" in notes(app, "error")[0]
        assert engine.policy.budget == 2048


async def test_reset_forgets_everything() -> None:
    app, engine = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "remember 42")
        await settle(pilot)
        await submit(pilot, "/reset")
        await settle(pilot)
        assert app.conversation.turns == [] and app.last_stats is None
        assert engine.resets == 1
        assert answers(app) == [] and len(notes(app)) == 1
        await submit(pilot, "/stats")
        assert "No figures yet" in notes(app)[-1]
        await submit(pilot, "again")
        await settle(pilot)
        assert engine.calls[-1] == [{"role": "user", "content": "again"}]


async def test_save_writes_the_markdown_transcript(tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret passkey is 4217. Remember it.")
    target = tmp_path / "chat.md"
    app, _ = make_app(FakeEngine(reply="It is 4217."), doc=str(doc))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "What is the passkey?")
        await settle(pilot)
        await submit(pilot, f"/save {target}")
        await submit(pilot, f"/save {tmp_path / 'no' / 'such' / 'dir.md'}")
        assert f"Saved the transcript to `{target}`" in notes(app)[-2]
        assert "Could not save" in notes(app, "error")[-1]
    assert target.read_text() == (
        "# edgekv chat with fake-smollm\n\n"
        "*Attached document: `doc.txt` (40 characters, not copied here)*\n\n"
        "## You\n\nWhat is the passkey?\n\n"
        "## Assistant\n\nIt is 4217.\n"
    )


async def test_stats_help_and_unknown_command() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "/stats")
        assert "No figures yet" in notes(app)[-1]
        await submit(pilot, "hi")
        await settle(pilot)
        await submit(pilot, "/stats")
        table = notes(app)[-1]
        assert "| decode | 56.7 tok/s |" in table and "| time to first token | 42 ms |" in table
        assert "| prefetch hit rate | — |" in table and "| KV device |" in table
        await submit(pilot, "/help")
        assert "`/trim`" in notes(app)[-1] and "Esc" in notes(app)[-1]
        await pilot.press("f1")
        await pilot.pause()
        assert notes(app)[-1] == notes(app)[-2]
        await submit(pilot, "/frobnicate now")
        assert "Unknown command `/frobnicate`" in notes(app, "warning")[-1]
        assert "/help" in notes(app, "warning")[-1]


async def test_escape_cancels_at_once_and_keeps_the_partial_answer() -> None:
    engine = FakeEngine(reply="one two three four five six seven", hold_after_tokens=3)
    app, _ = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "count")
        await wait_for(pilot, lambda: answers(app) and answers(app)[0].text == "one two three ")
        assert app.busy == "answer"
        await pilot.press("escape")
        engine.resume.set()
        await settle(pilot)
        turn = app.conversation.turns[0]
        assert turn.answer == "one two three " and turn.cancelled
        box = answers(app)[0]
        assert box.has_class("-cancelled")
        assert str(box.query_one(".answer-note", Static).render()) == "cancelled"
        assert app.last_stats["finish_reason"] == "cancelled"
        # the conversation goes on, with the partial answer in it
        engine.hold_after_tokens = None
        await submit(pilot, "again")
        await settle(pilot)
        assert engine.calls[-1][1] == {"role": "assistant", "content": "one two three "}
        assert "(cancelled)" in app.conversation.transcript()


async def test_escape_during_prefill_stops_the_document(tmp_path: Path) -> None:
    doc = tmp_path / "big.txt"
    doc.write_text("w " * 3000)
    engine = FakeEngine(prefill_delay_s=0.02)
    app, _ = make_app(engine, doc=str(doc))
    async with app.run_test(size=SIZE) as pilot:
        bar = app.query_one("#doc-progress", ProgressBar)
        await wait_for(pilot, lambda: (bar.progress or 0) > 0)
        await pilot.press("escape")
        await settle(pilot, timeout_s=5)
        assert "stopped" in notes(app, "warning")[-1]
        assert app.conversation.pending_document is not None  # goes with the next question
        engine.prefill_delay_s = 0
        await submit(pilot, "what?")
        await settle(pilot)
        assert engine.calls[-1][0]["content"].endswith("\n\nwhat?")
        # the chunks finished before Esc are reused, not processed again
        assert 0 < app.last_stats["reused_tokens"] < 3000


async def test_generation_failures_are_shown_and_the_app_goes_on() -> None:
    engine = FakeEngine(fail_with=RuntimeError("kernel exploded"))
    app, _ = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "q1")
        await settle(pilot)
        assert "Generation failed: RuntimeError: kernel exploded" in notes(app, "error")[0]
        assert app.conversation.turns == []
        engine.fail_with = EdgekvError("the disk tier is full; free 2 GiB")
        engine.fail_after_tokens = 2
        await submit(pilot, "q2")
        await settle(pilot)
        assert notes(app, "error")[1] == "Generation failed: the disk tier is full; free 2 GiB"
        box = answers(app)[-1]
        assert box.has_class("-failed") and box.text == "The passkey "
        engine.fail_with = None
        await submit(pilot, "q3")
        await settle(pilot)
        assert [t.question for t in app.conversation.turns] == ["q3"]
        assert status(app) == "ready"


async def test_a_bug_in_a_worker_is_shown_and_frees_the_engine(monkeypatch) -> None:
    from edgekv.tui import session

    def broken_answer(*args, **kwargs):
        raise ValueError("a bug")

    app, engine = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        with monkeypatch.context() as patch:
            patch.setattr(session, "answer", broken_answer)
            await submit(pilot, "q1")
            await settle(pilot)
        assert "Internal error: ValueError: a bug" in notes(app, "error")[-1]
        assert app.conversation.turns == [] and status(app) == "ready"
        await submit(pilot, "q2")
        await settle(pilot)
        assert app.conversation.turns[0].answer == DEFAULT_REPLY


async def test_model_load_failure_is_shown_and_the_app_stays_open() -> None:
    def broken() -> FakeEngine:
        raise EdgekvError("No model at /nowhere: give a HF folder or a .gguf file.")

    app = ChatApp(broken)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert status(app) == "model failed to load"
        assert "Could not load the model: No model at /nowhere" in notes(app, "error")[0]
        await submit(pilot, "hello?")
        assert "No model is loaded" in notes(app, "error")[-1]
        assert app.query_one(Input).value == "hello?"  # kept for after the fix
        await submit(pilot, "/help")
        assert "`/load FILE`" in notes(app)[-1]
        assert app.is_running


async def test_overflow_warns_and_trim_drops_the_oldest_turns() -> None:
    # each turn: question (10 words + 4) + answer (5 words + 4) = 23 tokens
    engine = FakeEngine(reply="a b c d e", max_context=100)
    app, _ = make_app(engine, max_new_tokens=30)
    question = "one two three four five six seven eight nine {}"
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for i in range(3):
            await submit(pilot, question.format(i))
            await settle(pilot)
        assert len(engine.calls) == 3
        await submit(pilot, question.format(3))  # 3 * 23 + 14 = 83 > 100 - 30
        await settle(pilot)
        assert len(engine.calls) == 3  # nothing was sent
        warning = notes(app, "warning")[-1]
        assert "does not fit" in warning and "83" in warning and "/trim" in warning
        assert len(app.conversation.turns) == 3
        await submit(pilot, "/trim")
        await settle(pilot)
        assert "Dropped the 1 oldest turn(s)" in notes(app)[-1]
        assert [t.question[-1] for t in app.conversation.turns] == ["1", "2", "3"]
        assert app.conversation.turns[-1].answer == "a b c d e"
        await submit(pilot, "/trim")
        assert "Nothing to trim" in notes(app)[-1]


async def test_overflow_with_nothing_to_drop() -> None:
    engine = FakeEngine(max_context=40)
    app, _ = make_app(engine, max_new_tokens=20)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "word " * 30)
        await settle(pilot)
        assert "no earlier turns to drop" in notes(app, "warning")[-1]
        await submit(pilot, "/trim")
        await settle(pilot)
        assert "Even with every earlier turn dropped" in notes(app, "error")[-1]
        assert engine.calls == [] and app.conversation.turns == []


async def test_second_question_while_answering_is_refused_politely() -> None:
    engine = FakeEngine(hold_after_tokens=1)
    app, _ = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "first")
        await wait_for(pilot, lambda: app.busy == "answer")
        await submit(pilot, "second")
        assert "Still answering" in notes(app, "warning")[-1]
        assert app.query_one(Input).value == "second"
        engine.resume.set()
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert [t.question for t in app.conversation.turns] == ["first", "second"]


async def test_quit_command_exits_cleanly() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "/quit")
        await pilot.pause()
    assert app.return_code == 0


async def test_ctrl_c_during_an_answer_exits_and_stops_the_engine() -> None:
    engine = FakeEngine(hold_after_tokens=2)
    app, _ = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await submit(pilot, "go")
        await wait_for(pilot, lambda: app.busy == "answer" and answers(app))
        await pilot.press("ctrl+c")
        engine.resume.set()
        await pilot.pause()
    assert app.return_code == 0
    assert app.jobs.cancel.is_set()


# -- one real turn -----------------------------------------------------------------------

@pytest.mark.real_model
async def test_real_engine_end_to_end(tmp_path: Path) -> None:
    import edgekv

    doc = tmp_path / "doc.txt"
    doc.write_text("Notes from the trip.\nThe secret passkey is 4217. Remember it.\n"
                   "The weather was fine all week.\n")
    cache = tmp_path / "docs"
    app = ChatApp(lambda: edgekv.load(model=None), doc=str(doc), max_new_tokens=12, doc_cache_dir=cache)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.focused, Input)
        await settle(pilot, timeout_s=240)
        assert app.load_error is None, app.load_error
        await submit(pilot, "What is the secret passkey?")
        await settle(pilot, timeout_s=120)
        assert not notes(app, "error"), notes(app, "error")
        turn = app.conversation.turns[0]
        assert turn.answer and turn.answer.strip()
        assert answers(app)[0].text == turn.answer
        stats = app.last_stats
        assert stats["generated_tokens"] >= 1 and stats["reused_tokens"] > 0
        await submit(pilot, "Say it again.")
        await settle(pilot, timeout_s=120)
        assert app.last_stats["reused_tokens"] >= stats["prompt_tokens"] - 8
        print(f"\nreal answer: {turn.answer!r}; stats: {json.dumps(app.last_stats)}")
    # a new app (a new engine) finds the processed document in the document cache
    again = ChatApp(lambda: edgekv.load(model=None), doc=str(doc), max_new_tokens=12, doc_cache_dir=cache)
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot, timeout_s=240)
        assert any("document cache" in text for text in notes(again)), notes(again)
