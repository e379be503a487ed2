"""Slash commands of `edgekv chat`: the registry, the parser and the help text.

The registry is the one place that knows which commands exist; the app looks up a
handler named `cmd_<name>` for each (a test checks that every command has one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # argument synopsis, "" when the command takes none
    summary: str
    needs_arg: bool = False


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("load", "FILE", "attach a text document; it is processed now and goes "
                "in front of your next question", needs_arg=True),
        Command("budget", "VALUE", "KV tokens attended per step: a count (2048), "
                "a share (10%) or all", needs_arg=True),
        Command("trim", "", "drop the oldest turns so the question that did not fit "
                "can be sent (the document turn is kept)"),
        Command("reset", "", "forget the conversation, the document and the kept KV"),
        Command("save", "FILE", "write the transcript as Markdown", needs_arg=True),
        Command("stats", "", "show the figures of the last turn"),
        Command("help", "", "show this help"),
        Command("quit", "", "leave (Ctrl+C does the same)"),
    )
}


class CommandError(ValueError):
    """The line looks like a command but is not a valid one; `str()` says why."""


@dataclass(frozen=True)
class Invocation:
    command: Command
    arg: str


def is_command(line: str) -> bool:
    return line.lstrip().startswith("/")


def parse_command(line: str) -> Invocation:
    """Split `/name ARG...` into the command and its (stripped) argument text."""
    head, _, arg = line.strip()[1:].partition(" ")
    name = head.lower()
    command = COMMANDS.get(name)
    if command is None:
        raise CommandError(f"Unknown command `/{head}`. Type `/help` for the list.")
    arg = arg.strip()
    if command.needs_arg and not arg:
        raise CommandError(f"`/{name}` needs {command.usage}: `/{name} {command.usage}`.")
    return Invocation(command, arg)


def parse_budget(text: str) -> int | str:
    """`"2048"` -> 2048; `"10%"` and `"all"` pass through for the engine to validate."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    return text.lower() if text.lower() == "all" else text


KEYS = (
    ("Enter", "send the question or command"),
    ("Esc", "stop the answer being written (what was written is kept)"),
    ("F1", "this help"),
    ("Ctrl+C", "quit"),
)


def help_markdown() -> str:
    lines = ["### Commands", "", "| command | what it does |", "|---|---|"]
    for c in COMMANDS.values():
        usage = f"/{c.name} {c.usage}".rstrip()
        lines.append(f"| `{usage}` | {c.summary} |")
    lines += ["", "### Keys", "", "| key | what it does |", "|---|---|"]
    lines += [f"| {key} | {what} |" for key, what in KEYS]
    lines += [
        "",
        "Every question resends the whole conversation; the engine keeps the KV of the "
        "previous turn, so only the new tokens are processed. When a question would not "
        "fit the model's context, nothing is sent: `/trim` drops the oldest turns and "
        "sends it, `/reset` starts over.",
    ]
    return "\n".join(lines)
