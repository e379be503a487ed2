"""The slash-command handlers of the chat app (one `cmd_<name>` per `commands.COMMANDS`).

A mixin of `ChatApp`: the handlers use its conversation view, job queue and engine.
"""

from __future__ import annotations

from pathlib import Path

from . import commands, figures
from .jobs import Job


class CommandHandlers:
    """Mixed into `ChatApp`; `self` is the app (view, panel, jobs, conversation, engine)."""

    async def cmd_help(self, _arg: str) -> None:
        await self.action_help()

    async def cmd_quit(self, _arg: str) -> None:
        await self.action_quit()

    async def cmd_load(self, arg: str) -> None:
        await self._attach_document(arg)

    async def cmd_stats(self, _arg: str) -> None:
        if self.last_stats is None:
            await self.view.add_note("No figures yet: ask a question first.")
            return
        await self.view.add_note("### Last turn\n\n" + figures.stats_markdown(self.last_stats))

    async def cmd_save(self, arg: str) -> None:
        path = Path(arg).expanduser()
        name = getattr(self.engine, "model_name", "") or ""
        try:
            path.write_text(self.conversation.transcript(name), encoding="utf-8")
        except OSError as error:
            await self.view.add_note(f"Could not save to `{path}`: {error.strerror or error}",
                                     "error")
            return
        await self.view.add_note(f"Saved the transcript to `{path}`.")

    async def cmd_budget(self, arg: str) -> None:
        if self.load_error:
            await self.view.add_note(f"No model is loaded ({self.load_error}).", "error")
            return
        value = commands.parse_budget(arg)

        def apply() -> str:
            self.engine.update_policy(budget=value)
            return f"Budget set to {getattr(self.engine.policy, 'budget', value)}."

        self._submit("budget", lambda job: self._command_worker("budget", apply, job))

    async def cmd_reset(self, _arg: str) -> None:
        self.jobs.disown()  # stop the running job; its late messages are ignored
        self._open_turn = self._answer_box = self._overflowed = self._prefilled_doc = None
        self.conversation.reset()
        self.last_stats = None
        await self.view.remove_children()
        await self.view.add_note("Conversation reset: turns, document and kept KV are gone.")
        self.panel.show_context(0, getattr(self.engine, "max_context", None))
        self.panel.show_stats({})
        if self.engine is not None:
            engine = self.engine

            def drop_kv() -> str:
                engine.reset()
                return ""

            self._submit("reset", lambda job: self._command_worker("reset", drop_kv, job))

    async def cmd_trim(self, _arg: str) -> None:
        if self._overflowed is None:
            await self.view.add_note("Nothing to trim: no question is waiting for room.")
            return
        if self.busy == "trim":
            return
        question = self._overflowed

        def start(job: Job) -> None:
            self._trim_worker(self.conversation.snapshot(), question, job)

        self._submit("trim", start)
