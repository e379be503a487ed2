"""A scripted stand-in for the edgekv engine, for the chat app's tests.

It honours the engine contract the app codes against (generate / count_tokens /
update_policy / reset, streaming through `on_token`, prefill progress through
`on_progress`, KV reuse across calls) with words as tokens and frozen figures, so
screens built from it are the same on every run.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from edgekv.errors import EdgekvError

DEFAULT_REPLY = (
    "The passkey in the document is **4217**. It appears once, near the middle:\n\n"
    "- it follows the word *secret*\n"
    "- nothing else in the text looks like it\n"
)
BYTES_PER_TOKEN = 30 * 3 * 64 * 2 // 2  # layers x kv heads x head dim x (K,V) at 4 bits
DEVICE_TOKENS = 256  # tokens kept in the device tier before spilling to RAM
RAM_TOKENS = 4096  # then to disk
PREFILL_CHUNK = 64  # tokens per on_progress call


@dataclass(frozen=True)
class FakePolicy:
    budget: int | str = "all"
    kv_bits: int = 4


@dataclass
class FakeResult:
    text: str
    token_ids: list[int]
    stats: dict[str, Any]


def _tokens(prompt_or_messages: Any) -> list[str]:
    """Words stand in for tokens; each message adds a 2-token header and footer."""
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages.split()
    out: list[str] = []
    for m in prompt_or_messages:
        out += [f"<{m['role']}>", "<start>"] + m["content"].split() + ["<end>", "<sep>"]
    return out


def _pieces(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


def _check_budget(value: Any) -> None:
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError:
            share = -1.0
        if 0 < share <= 100:
            return
    raise EdgekvError(
        f"budget must be a token count (2048), a share (10%) or 'all', not {value!r}."
    )


@dataclass
class FakeEngine:
    reply: str = DEFAULT_REPLY
    max_context: int = 8192  # tokens
    model_name: str = "fake-smollm"
    policy: FakePolicy = field(default_factory=FakePolicy)
    token_delay_s: float = 0.0  # seconds between streamed pieces
    prefill_delay_s: float = 0.0  # seconds per prefill chunk
    hit_rate: float | None = None  # reported as prefetch_hit_rate when set
    fail_with: BaseException | None = None  # raised by the next generate() calls
    fail_after_tokens: int = 0  # pieces streamed before `fail_with` is raised
    hold_after_tokens: int | None = None  # pause here until `resume` is set
    resume: threading.Event = field(default_factory=threading.Event)
    calls: list[Any] = field(default_factory=list)  # every prompt given to generate()
    max_new_tokens_seen: list[int] = field(default_factory=list)  # and its max_new_tokens
    resets: int = 0
    _kept: list[str] = field(default_factory=list)

    # -- engine contract --------------------------------------------------------------
    def count_tokens(self, prompt_or_messages: Any) -> int:
        return len(_tokens(prompt_or_messages))

    def update_policy(self, **changes: Any) -> None:
        unknown = set(changes) - {"budget", "kv_bits"}
        if unknown:
            raise EdgekvError(f"unknown policy key(s): {', '.join(sorted(unknown))}")
        if "budget" in changes:
            _check_budget(changes["budget"])
        self.policy = replace(self.policy, **changes)

    def reset(self) -> None:
        self._kept = []
        self.resets += 1

    def generate(
        self,
        prompt_or_messages: Any,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        on_token: Callable[[str], bool | None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> FakeResult:
        self.calls.append(prompt_or_messages)
        self.max_new_tokens_seen.append(max_new_tokens)
        prompt = _tokens(prompt_or_messages)
        reused = 0
        for a, b in zip(prompt, self._kept):
            if a != b:
                break
            reused += 1
        self._prefill(prompt, reused, on_progress)
        if self.fail_with is not None and self.fail_after_tokens == 0:
            raise self.fail_with

        text, finish = self._decode(max_new_tokens, on_token)
        self._kept = prompt + text.split()
        generated = len(_pieces(text))
        return FakeResult(text, list(range(generated)), self._stats(
            len(prompt), reused, generated, finish))

    # -- parts --------------------------------------------------------------------------
    def _prefill(self, prompt: list[str], reused: int,
                 on_progress: Callable[[int, int], None] | None) -> None:
        """Chunk by chunk; like the engine, the KV of every finished chunk is kept."""
        done, total = reused, len(prompt)
        self._kept = prompt[:done]
        while done < total:
            done = min(done + PREFILL_CHUNK, total)
            if self.prefill_delay_s:
                time.sleep(self.prefill_delay_s)
            self._kept = prompt[:done]
            if on_progress is not None:
                on_progress(done, total)

    def _decode(self, max_new_tokens: int,
                on_token: Callable[[str], bool | None] | None) -> tuple[str, str]:
        pieces = _pieces(self.reply)
        finish = "eos" if len(pieces) <= max_new_tokens else "length"
        out: list[str] = []
        for i, piece in enumerate(pieces[:max_new_tokens]):
            if self.hold_after_tokens is not None and i == self.hold_after_tokens:
                self.resume.wait(timeout=10)
            if self.fail_with is not None and i == self.fail_after_tokens:
                raise self.fail_with
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if on_token is not None and on_token(piece) is False:
                return "".join(out), "cancelled"
            out.append(piece)
        return "".join(out), finish

    def _stats(self, prompt: int, reused: int, generated: int, finish: str) -> dict[str, Any]:
        kept = prompt + generated
        device = min(kept, DEVICE_TOKENS)
        ram = min(kept - device, RAM_TOKENS)
        disk = kept - device - ram
        stats: dict[str, Any] = {
            "prompt_tokens": prompt,
            "reused_tokens": reused,
            "generated_tokens": generated,
            "ttft_s": 0.042,
            "prefill_tok_s": 1234.5,
            "decode_tok_s": 56.7,
            "kv_bytes": {
                "device": device * BYTES_PER_TOKEN,
                "ram": ram * BYTES_PER_TOKEN,
                "disk": disk * BYTES_PER_TOKEN,
            },
            "finish_reason": finish,
        }
        if self.hit_rate is not None:
            stats["prefetch_hit_rate"] = self.hit_rate
        return stats
