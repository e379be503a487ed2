"""The widgets of `edgekv chat`: the conversation column and the figures panel.

    +-----------------------------------+---------------+
    | ConversationView (scrolls)        | StatsPanel    |
    |   UserBox / AnswerBox / NoteBox   |  status       |
    |                                   |  Meter ctx    |
    |                                   |  Meter KV x3  |
    |                                   |  rates/policy |
    +-----------------------------------+---------------+
    | Input                                             |
    | Footer                                            |
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Label, Markdown, ProgressBar, Static
from textual.widgets.markdown import MarkdownStream

from . import figures
from .conversation import Turn

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar_text(fraction: float, width: int) -> tuple[str, str]:
    """(filled, empty) strings of a horizontal bar `width` cells wide, 1/8-cell steps."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (_EIGHTHS[part] if part else "")
    return filled, " " * (width - len(filled))


class Meter(Widget):
    """A labelled figure over a bar: `label ........ value` then `████▌    `."""

    COMPONENT_CLASSES = {"meter--bar", "meter--track", "meter--value"}
    DEFAULT_CSS = "Meter { height: 2; }"

    label: reactive[str] = reactive("")
    value_text: reactive[str] = reactive("—")
    fraction: reactive[float] = reactive(0.0)

    def __init__(self, label: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label

    def set(self, value_text: str, fraction: float) -> None:
        self.value_text = value_text
        self.fraction = fraction

    def render(self) -> Text:
        width = max(self.size.width, 1)
        value_style = self.get_component_rich_style("meter--value")
        gap = max(width - len(self.label) - len(self.value_text), 1)
        head = Text.assemble(self.label, " " * gap, (self.value_text, value_style))
        filled, empty = bar_text(self.fraction, width)
        bar = Text.assemble(
            (filled, self.get_component_rich_style("meter--bar")),
            (empty, self.get_component_rich_style("meter--track")),
        )
        return Text("\n").join([head, bar])


class StatsPanel(Vertical):
    """Live figures: model status, context use, KV bytes per tier, speeds, policy."""

    def compose(self) -> ComposeResult:
        yield Static("", id="model-name")
        yield Static("", id="status")
        yield ProgressBar(id="doc-progress", show_eta=False)
        yield Meter("context", id="context")
        yield Label("KV cache", classes="section")
        for tier in figures.TIERS:
            yield Meter(figures.TIER_LABELS[tier], id=f"kv-{tier}")
        yield Label("last turn", classes="section")
        yield Static(self._rates_text({}), id="rates")
        yield Label("policy", classes="section")
        yield Static("budget —\nbits   —", id="policy")

    def set_model(self, name: str) -> None:
        self.query_one("#model-name", Static).update(Text(name))

    def set_status(self, text: str, *, busy: bool = False, error: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(Text(text))
        status.set_class(busy, "-busy")
        status.set_class(error, "-error")

    def show_progress(self, done: int, total: int) -> None:
        bar = self.query_one("#doc-progress", ProgressBar)
        bar.display = True
        bar.update(total=max(total, 1), progress=done)

    def hide_progress(self) -> None:
        self.query_one("#doc-progress", ProgressBar).display = False

    def show_context(self, used_tokens: int, max_context: int | None) -> None:
        limit = max_context or 0
        text = f"{used_tokens:,} / {limit:,}" if limit else f"{used_tokens:,}"
        self.query_one("#context", Meter).set(text, used_tokens / limit if limit else 0.0)

    def show_stats(self, stats: dict[str, Any]) -> None:
        kv = stats.get("kv_bytes") or {}
        total = sum(v for v in kv.values() if isinstance(v, (int, float))) or 1
        for tier in figures.TIERS:
            n = kv.get(tier)
            meter = self.query_one(f"#kv-{tier}", Meter)
            meter.set(figures.human_bytes(n), (n or 0) / total)
        self.query_one("#rates", Static).update(self._rates_text(stats))

    def show_policy(self, policy: Any) -> None:
        budget, bits = figures.policy_line(policy)
        self.query_one("#policy", Static).update(Text(f"budget {budget}\nbits   {bits}"))

    @staticmethod
    def _rates_text(stats: dict[str, Any]) -> Text:
        rows = (
            ("decode", figures.rate(stats.get("decode_tok_s"))),
            ("TTFT", figures.seconds(stats.get("ttft_s"))),
            ("prefill", figures.rate(stats.get("prefill_tok_s"))),
            ("reused", figures.count(stats.get("reused_tokens"))),
            ("prefetch", figures.share(stats.get("prefetch_hit_rate"))),
        )
        return Text("\n".join(f"{name:<9}{value}" for name, value in rows))


class UserBox(Static):
    """One question as the user typed it (plain text, never markup)."""

    def __init__(self, turn: Turn) -> None:
        text = Text(turn.question)
        if turn.document is not None:
            text = Text.assemble((f"document: {turn.document.name}\n", "italic"), text)
        super().__init__(text, classes="user")


class NoteBox(Markdown):
    """An info, warning or error line from the app itself."""

    def __init__(self, markdown: str, kind: str = "info") -> None:
        super().__init__(markdown, classes=f"note -{kind}")


class AnswerBox(Vertical):
    """The assistant's answer, rendered as Markdown while it streams in."""

    def __init__(self) -> None:
        super().__init__(classes="answer -streaming")
        self.text = ""
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Markdown("", classes="answer-body")
        yield Static("", classes="answer-note")

    def on_mount(self) -> None:
        self._stream = Markdown.get_stream(self.query_one(Markdown))

    async def write(self, piece: str) -> None:
        self.text += piece
        if self._stream is not None:
            await self._stream.write(piece)

    async def finish(self, final_text: str, note: str = "", *, kind: str = "") -> None:
        """Close the stream; show `final_text` if the engine's text differs from the pieces."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if final_text != self.text:
            self.text = final_text
            await self.query_one(Markdown).update(final_text)
        self.remove_class("-streaming")
        if kind:
            self.add_class(f"-{kind}")
        label = self.query_one(".answer-note", Static)
        label.update(Text(note))
        label.display = bool(note)


class ConversationView(VerticalScroll):
    """The scrolling column of questions, answers and notes; sticks to the bottom."""

    def on_mount(self) -> None:
        self.anchor()

    async def add_user(self, turn: Turn) -> UserBox:
        box = UserBox(turn)
        await self.mount(box)
        return box

    async def add_note(self, markdown: str, kind: str = "info") -> NoteBox:
        box = NoteBox(markdown, kind)
        await self.mount(box)
        return box

    async def add_answer(self) -> AnswerBox:
        box = AnswerBox()
        await self.mount(box)
        return box
