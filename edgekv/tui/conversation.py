"""The conversation state of `edgekv chat`: turns, the attached document, transcripts.

Pure data, no UI and no engine: the app owns one `Conversation` and asks it for the
message list to send. Layout of what is sent each turn:

    [system?] [user, assistant]* [user: (document "\\n\\n")? question]

A document waits in `pending_document` until the next question, then becomes the head
of that user message and stays there (that turn is never trimmed), so the engine can
reuse its KV on every later turn.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path


DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    name: str  # file name as shown to the user
    text: str

    def head_of(self, question: str) -> str:
        return self.text + DOC_SEPARATOR + question


def read_document(path: str | Path) -> Document:
    """Read a UTF-8 text file; EdgekvError (as `edgekv generate` words it) for missing,
    binary, non-UTF-8 or empty files."""
    from edgekv.documents import read_document as read_text

    return Document(name=Path(path).expanduser().name, text=read_text(str(path)).rstrip())


@dataclass
class Turn:
    question: str  # what the user typed
    answer: str | None = None  # None while the answer is being written
    document: Document | None = None  # attached in front of this question
    cancelled: bool = False

    def user_message(self) -> dict[str, str]:
        content = self.document.head_of(self.question) if self.document else self.question
        return {"role": "user", "content": content}


@dataclass
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    pending_document: Document | None = None

    # -- what gets sent -------------------------------------------------------------
    def messages(self, turns: list[Turn] | None = None) -> list[dict[str, str]]:
        """The message list for the engine (the last turn may still lack its answer)."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        for turn in self.turns if turns is None else turns:
            out.append(turn.user_message())
            if turn.answer is not None:
                out.append({"role": "assistant", "content": turn.answer})
        return out

    def document_messages(self) -> list[dict[str, str]]:
        """The conversation so far plus the pending document alone (for its prefill)."""
        assert self.pending_document is not None
        head = {"role": "user", "content": self.pending_document.text + DOC_SEPARATOR}
        return self.messages() + [head]

    # -- changes --------------------------------------------------------------------
    def ask(self, question: str) -> Turn:
        """Open a turn; the pending document (if any) is attached to it."""
        turn = Turn(question=question, document=self.pending_document)
        self.pending_document = None
        self.turns.append(turn)
        return turn

    def answer(self, text: str, *, cancelled: bool = False) -> None:
        turn = self.turns[-1]
        turn.answer = text
        turn.cancelled = cancelled

    def withdraw(self) -> Turn:
        """Remove the open last turn (it failed or did not fit); its document waits again."""
        turn = self.turns.pop()
        if turn.document is not None and self.pending_document is None:
            self.pending_document = turn.document
        return turn

    def droppable(self) -> list[int]:
        """Indices of answered turns that /trim may drop, oldest first."""
        return [
            i for i, t in enumerate(self.turns)
            if t.document is None and t.answer is not None
        ]

    def without_oldest(self, count: int) -> list[Turn]:
        """The turns that remain after dropping the `count` oldest droppable ones."""
        gone = set(self.droppable()[:count])
        return [t for i, t in enumerate(self.turns) if i not in gone]

    def drop_oldest(self, count: int) -> None:
        self.turns = self.without_oldest(count)

    def reset(self) -> None:
        self.turns.clear()
        self.pending_document = None

    def snapshot(self) -> Conversation:
        """A deep copy for a worker thread to read while the UI keeps editing."""
        return copy.deepcopy(self)

    # -- transcript -----------------------------------------------------------------
    def transcript(self, model_name: str = "") -> str:
        """The conversation as Markdown. Documents are named, not copied in full."""
        lines = ["# edgekv chat" + (f" with {model_name}" if model_name else ""), ""]
        if self.system:
            lines += ["**System:** " + self.system, ""]
        for turn in self.turns:
            if turn.document is not None:
                doc = turn.document
                lines += [f"*Attached document: `{doc.name}` ({len(doc.text):,} characters, "
                          "not copied here)*", ""]
            lines += ["## You", "", turn.question, ""]
            if turn.answer is not None:
                lines += ["## Assistant", "", turn.answer, ""]
                if turn.cancelled:
                    lines += ["*(cancelled)*", ""]
        if self.pending_document is not None:
            lines += [f"*Attached document, not yet asked about: "
                      f"`{self.pending_document.name}`*", ""]
        return "\n".join(lines).rstrip() + "\n"
