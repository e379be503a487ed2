"""`edgekv chat`: the terminal chat app.

The UI never waits on the engine. The model loads on a background thread; every engine
call is a *job* that runs in a textual thread worker, one at a time, in submission
order (the engine keeps one KV cache, so calls must not overlap). Jobs report back with
the typed messages of `messages.py`; the handlers below are the whole state machine.

    Input.Submitted -> command | question
    question -> Conversation.ask -> job "answer" -> ResponseStarted/Chunk*/Done
                                                  | ResponseFailed | ContextOverflow
    /load    -> read file -> job "document" -> DocumentProgress*/DocumentReady|Failed

The queue itself (one job at a time, job numbers, disowning on /reset) is `jobs.py`.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

from textual import on, work
from textual.worker import Worker, WorkerState
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Input

from edgekv.errors import EdgekvError

from . import commands, session
from .conversation import Conversation, Turn, read_document
from .jobs import Job, JobQueue, JobStart
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
from .command_handlers import CommandHandlers
from .widgets import AnswerBox, ConversationView, StatsPanel


def ends_job(handler: Callable[[Any, Any], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """For the handler of a job's last message: act only if the job is still owned (not
    disowned by /reset), then free the engine for the next queued job."""

    @functools.wraps(handler)
    async def handle(self: ChatApp, message: Message) -> None:
        try:
            if self.jobs.is_live(message):
                await handler(self, message)
        finally:
            self._job_finished()

    return handle


WELCOME = "Ask a question, or type `/help` for commands."
STATUS = {
    "answer": "writing answer…",
    "document": "processing document…",
    "trim": "trimming…",
    "budget": "changing budget…",
    "reset": "resetting…",
}


class ChatApp(CommandHandlers, App[int]):
    """Chat with an edgekv engine. `engine_factory` builds it (slow; runs off the UI)."""

    CSS_PATH = Path(__file__).with_name("chat.tcss")  # absolute: subclasses live elsewhere
    TITLE = "edgekv chat"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+c", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        engine_factory: Callable[[], session.Engine],
        doc: str | None = None,
        *,
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        model_label: str | None = None,
        doc_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self._factory = engine_factory
        self._doc_cache_dir = doc_cache_dir  # persistent document cache folder, or None
        self._doc_path = doc
        self._model_label = model_label or "default model"
        self.sampling = session.Sampling(max_new_tokens, temperature)
        self.conversation = Conversation(system=system)
        self.engine: session.Engine | None = None
        self.load_error: str | None = None
        self.last_stats: dict[str, Any] | None = None
        self.jobs = JobQueue(self._post, self._post_chunk)
        self._open_turn: Turn | None = None  # asked, not yet answered
        self._answer_box: AnswerBox | None = None
        self._overflowed: str | None = None  # question waiting for /trim
        self._prefilled_doc: Any = None
        self._quitting = False

    # -- layout ---------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ConversationView(id="conversation")
            yield StatsPanel(id="side")
        yield Input(placeholder="Ask a question, or /help for commands", id="prompt")
        yield Footer()

    @property
    def is_idle(self) -> bool:
        """The model has loaded (or failed to) and no job is running or waiting."""
        loaded = self.engine is not None or self.load_error is not None
        return loaded and self.busy is None and not self.jobs and self._open_turn is None

    @property
    def busy(self) -> str | None:
        """Name of the running engine job, if any."""
        return self.jobs.running

    @property
    def view(self) -> ConversationView:
        return self.query_one(ConversationView)

    @property
    def panel(self) -> StatsPanel:
        return self.query_one(StatsPanel)

    async def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        self.panel.set_model(self._model_label)
        self.panel.show_context(0, None)
        self._refresh_status()
        threading.Thread(
            target=session.load_engine, args=(self._factory, self._post),
            name="edgekv-load", daemon=True,  # a slow load must not hold up quitting
        ).start()
        await self.view.add_note(WELCOME)
        if self._doc_path:
            await self._attach_document(self._doc_path)

    # -- posting from threads --------------------------------------------------------
    def _post(self, message: Message) -> bool:
        """Thread-safe post of a lifecycle message; False once the app is closing."""
        if self._quitting:
            return False
        try:
            return self.post_message(message)
        except RuntimeError:  # the event loop is already closed
            return False

    def _post_chunk(self, message: Message) -> bool:
        """Hand a streamed piece to the UI loop and wait until it is queued there."""
        if self._quitting:
            return False
        try:
            return bool(self.call_from_thread(self.post_message, message))
        except RuntimeError:
            return False

    # -- the job queue ---------------------------------------------------------------
    def _submit(self, name: str, start: JobStart) -> None:
        self.jobs.submit(name, start)
        self._refresh_status()

    def _job_finished(self) -> None:
        """Called by every job's last message, after the UI has taken its outcome in."""
        self.jobs.finished()
        self.panel.hide_progress()
        self.jobs.pump()
        self._refresh_status()

    def _refresh_status(self) -> None:
        if self.load_error:
            self.panel.set_status("model failed to load", error=True)
        elif self.engine is None:
            self.panel.set_status("loading model…", busy=True)
        elif self.busy:
            self.panel.set_status(STATUS.get(self.busy, self.busy), busy=True)
        else:
            self.panel.set_status("ready")

    # -- workers (engine threads) ------------------------------------------------------
    @work(thread=True, group="engine", exit_on_error=False)
    def _answer_worker(self, messages: list[dict[str, str]], job: Job) -> None:
        session.answer(self.engine, messages, self.sampling, job.cancel, job.post,
                       job.post_chunk)

    @work(thread=True, group="engine", exit_on_error=False)
    def _document_worker(self, messages: list[dict[str, str]], name: str, job: Job) -> None:
        session.prefill_document(self.engine, messages, name, self.sampling, job.cancel,
                                 job.post, self._doc_cache_dir)

    @work(thread=True, group="engine", exit_on_error=False)
    def _trim_worker(self, snapshot: Conversation, question: str, job: Job) -> None:
        session.plan_trim(self.engine, snapshot, question, self.sampling, job.post)

    @work(thread=True, group="engine", exit_on_error=False)
    def _command_worker(self, name: str, action: Callable[[], str], job: Job) -> None:
        session.run_command(name, action, job.post)

    async def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Safety net: a worker that died of a bug must not leave the engine 'busy'."""
        worker = event.worker
        if worker.group == "engine" and event.state == WorkerState.ERROR:
            self._withdraw_open_turn()
            self._answer_box = None
            self._job_finished()
            await self.view.add_note(
                f"Internal error: {session.describe(worker.error)}", "error")

    # -- input -------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    async def _submitted(self, event: Input.Submitted) -> None:
        line = event.value.strip()
        if not line:
            return
        if commands.is_command(line):
            event.input.clear()
            await self._run_command(line)
        elif await self._ask(line):
            event.input.clear()

    async def _run_command(self, line: str) -> None:
        try:
            invocation = commands.parse_command(line)
        except commands.CommandError as error:
            await self.view.add_note(str(error), "warning")
            return
        await getattr(self, f"cmd_{invocation.command.name}")(invocation.arg)

    async def _ask(self, question: str) -> bool:
        """Start a turn; False (input kept) when a turn cannot start now."""
        if self.load_error:
            await self.view.add_note(
                f"No model is loaded ({self.load_error}). Fix it and restart `edgekv chat`.",
                "error")
            return False
        if self._open_turn is not None or self.busy == "trim":
            await self.view.add_note(
                "Still answering the last question: wait, or press Esc to stop it.", "warning")
            return False
        self._overflowed = None
        turn = self.conversation.ask(question)
        await self.view.add_user(turn)
        if self.engine is None:
            await self.view.add_note("The model is still loading; the answer starts once it is ready.")
        self._start_turn(turn)
        return True

    def _start_turn(self, turn: Turn) -> None:
        self._open_turn = turn

        def start(job: Job) -> None:
            self._answer_worker(self.conversation.messages(), job)

        self._submit("answer", start)

    # -- keys ----------------------------------------------------------------------------
    async def action_stop(self) -> None:
        if self.busy in ("answer", "document"):
            self.jobs.cancel.set()
            self.panel.set_status("stopping…", busy=True)
        elif self._open_turn is not None and self.jobs.withdraw("answer"):
            self._withdraw_open_turn()
            await self.view.add_note("Question withdrawn before it was sent.")

    async def action_help(self) -> None:
        await self.view.add_note(commands.help_markdown())

    async def action_quit(self) -> None:
        self._quitting = True
        self.jobs.cancel.set()  # a running answer stops at its next token
        self.exit(0)

    def on_unmount(self) -> None:
        self._quitting = True
        self.jobs.cancel.set()

    # -- documents -----------------------------------------------------------------------
    async def _attach_document(self, path: str) -> None:
        try:
            doc = read_document(path)
        except EdgekvError as error:
            await self.view.add_note(str(error), "error")
            return
        replaced = self.conversation.pending_document
        self.conversation.pending_document = doc
        note = (f"Attached `{doc.name}` ({len(doc.text):,} characters); it goes in front "
                "of your next question.")
        if replaced is not None:
            note += f" It replaces `{replaced.name}`."
        await self.view.add_note(note)
        if self.load_error is None:
            self._submit("document", self._start_document)

    def _start_document(self, job: Job) -> None:
        doc = self.conversation.pending_document
        if doc is None or doc is self._prefilled_doc:
            # Already asked about (the answer's prefill covers it) or already processed.
            self.call_later(self._job_finished)
            return
        self._prefilled_doc = doc
        self.panel.show_progress(0, 1)
        self._document_worker(self.conversation.document_messages(), doc.name, job)

    def on_document_progress(self, message: DocumentProgress) -> None:
        if self.jobs.is_live(message):
            self.panel.show_progress(message.done_tokens, message.total_tokens)

    @ends_job
    async def on_document_ready(self, message: DocumentReady) -> None:
        self._show_figures(message.stats)
        tokens = message.stats.get("prompt_tokens")
        size = f": {tokens:,} prompt tokens in the KV cache" if isinstance(tokens, int) else ""
        origin = {"disk": " (its KV came from the document cache)",
                  "memory": " (its KV was already in memory)"}.get(message.stats.get("document_kv"), "")
        await self.view.add_note(f"`{message.name}` is processed{size}{origin}.")

    @ends_job
    async def on_document_failed(self, message: DocumentFailed) -> None:
        pending = self.conversation.pending_document
        self._prefilled_doc = None
        if not message.keep and pending is not None and pending.name == message.name:
            self.conversation.pending_document = None
        kind = "warning" if message.keep else "error"
        await self.view.add_note(f"Document `{message.name}`: {message.error}", kind)

    # -- model loading ---------------------------------------------------------------------
    async def on_model_loaded(self, message: ModelLoaded) -> None:
        self.engine = message.engine
        self.panel.set_model(getattr(self.engine, "model_name", self._model_label))
        self.panel.show_policy(getattr(self.engine, "policy", None))
        self.panel.show_context(0, getattr(self.engine, "max_context", None))
        self.jobs.paused = False
        self.jobs.pump()
        self._refresh_status()

    async def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.load_error = message.error
        self.jobs.disown()
        self._withdraw_open_turn()
        self._refresh_status()
        await self.view.add_note(f"Could not load the model: {message.error}", "error")

    # -- answers ---------------------------------------------------------------------------
    async def on_response_started(self, message: ResponseStarted) -> None:
        if self.jobs.is_live(message):
            self._answer_box = await self.view.add_answer()

    async def on_response_chunk(self, message: ResponseChunk) -> None:
        if self.jobs.is_live(message) and self._answer_box is not None:
            self.panel.hide_progress()
            await self._answer_box.write(message.text)

    @ends_job
    async def on_response_done(self, message: ResponseDone) -> None:
        cancelled = message.finish_reason == "cancelled"
        if self._open_turn is not None:
            self.conversation.answer(message.text, cancelled=cancelled)
        note = ""
        if cancelled:
            note = "cancelled"
        elif message.finish_reason == "length":
            note = f"stopped at the {self.sampling.max_new_tokens:,}-token limit"
        box, self._answer_box, self._open_turn = self._answer_box, None, None
        if box is not None:
            await box.finish(message.text, note, kind="cancelled" if cancelled else "")
        self._show_figures(message.stats)

    @ends_job
    async def on_response_failed(self, message: ResponseFailed) -> None:
        box, self._answer_box = self._answer_box, None
        if box is not None:
            await box.finish(message.partial, "failed", kind="failed")
        self._withdraw_open_turn()
        await self.view.add_note(f"Generation failed: {message.error}", "error")

    @ends_job
    async def on_context_overflow(self, message: ContextOverflow) -> None:
        turn = self._withdraw_open_turn()
        self._overflowed = turn.question if turn is not None else None
        need = message.prompt_tokens + message.max_new_tokens
        text = (f"**This question does not fit.** The prompt is {message.prompt_tokens:,} "
                f"tokens and the answer may take {message.max_new_tokens:,} more "
                f"({need:,}), but the model holds {message.max_context:,}. Nothing was sent.")
        if self.conversation.droppable():
            text += " Type `/trim` to drop the oldest turns and send it again, or `/reset`."
        else:
            text += (" There are no earlier turns to drop: ask a shorter question, or "
                     "`/reset` and load a shorter document.")
        await self.view.add_note(text, "warning")

    def _withdraw_open_turn(self) -> Turn | None:
        turn, self._open_turn = self._open_turn, None
        if turn is not None and self.conversation.turns and self.conversation.turns[-1] is turn:
            self.conversation.withdraw()
        return turn

    @ends_job
    async def on_trim_planned(self, message: TrimPlanned) -> None:
        question, self._overflowed = self._overflowed, None
        if question is None:
            return
        if message.drop_turns is None:
            await self.view.add_note(
                f"Even with every earlier turn dropped the question needs "
                f"{message.prompt_tokens:,} prompt tokens plus "
                f"{self.sampling.max_new_tokens:,} for the answer, more than the model "
                "holds. Ask a shorter question, or `/reset` and load a shorter document.",
                "error")
            return
        self.conversation.drop_oldest(message.drop_turns)
        await self.view.add_note(
            f"Dropped the {message.drop_turns} oldest turn(s); sending your question again.")
        self._start_turn(self.conversation.ask(question))

    @ends_job
    async def on_engine_job_done(self, message: EngineJobDone) -> None:
        if message.error:
            await self.view.add_note(f"`/{message.name}` failed: {message.error}", "error")
            return
        if message.name == "budget" and self.engine is not None:
            self.panel.show_policy(self.engine.policy)
        if message.note:
            await self.view.add_note(message.note)

    def _show_figures(self, stats: dict[str, Any]) -> None:
        if "prompt_tokens" not in stats:
            return  # cancelled before the engine reported anything
        self.last_stats = stats
        self.panel.show_stats(stats)
        used = int(stats.get("prompt_tokens") or 0) + int(stats.get("generated_tokens") or 0)
        self.panel.show_context(used, getattr(self.engine, "max_context", None))


def run_chat(
    *,
    model: str | None,
    doc: str | None,
    policy: dict[str, Any],
    max_new_tokens: int = 512,
    temperature: float = 0.0,
) -> int:
    """Run `edgekv chat` in this terminal; returns the process exit code."""

    def load_engine() -> session.Engine:
        import edgekv  # deferred: the engine pulls in torch, the UI must not wait for it

        return edgekv.load(model=model, **policy)

    from edgekv.loader import document_cache_dir  # torch-free: the app opens at once

    app = ChatApp(
        load_engine, doc=doc, max_new_tokens=max_new_tokens, temperature=temperature,
        model_label=model, doc_cache_dir=document_cache_dir(),
    )
    app.run()
    return app.return_code or 0
