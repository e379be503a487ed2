"""What a run tells a person on stderr: prefill progress and a one-line summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .sizes import format_size


class ProgressBar:
    """A one-line progress bar: redrawn in place on a terminal, a line per quarter otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()
        self._last_quarter = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        filled = int(frac * self.width)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} tokens {frac:4.0%} {rate:,.0f} tok/s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        elif int(frac * 4) > self._last_quarter:
            self._last_quarter = int(frac * 4)
            self.stream.write(line + "\n")
        self.stream.flush()


def summary_line(stats: dict) -> str:
    """prompt tokens, TTFT, prefill and decode speed, KV bytes per tier — one line."""
    kv = ", ".join(f"{tier} {format_size(b)}" for tier, b in stats.get("kv_bytes", {}).items())
    reused = f" ({stats['reused_tokens']} reused)" if stats.get("reused_tokens") else ""
    if stats.get("document_kv") == "disk":
        reused += " · document KV from cache"
    return (
        f"prompt {stats['prompt_tokens']} tok{reused} · TTFT {stats['ttft_s']:.2f} s · "
        f"prefill {stats['prefill_tok_s']:,.0f} tok/s · decode {stats['decode_tok_s']:.1f} tok/s "
        f"({stats['generated_tokens']} tok, {stats['finish_reason']}) · KV {kv}{_traffic(stats)}"
    )


def _traffic(stats: dict) -> str:
    per_token = stats.get("kv_read_bytes_per_token")
    if not per_token:
        return ""
    moved = ", ".join(f"{tier} {format_size(b)}" for tier, b in per_token.items() if b)
    gbps = ", ".join(f"{tier} {g:.2f} GB/s" for tier, g in stats.get("kv_gbps", {}).items() if g)
    return f" · read/token {moved or '0 B'}" + (f" ({gbps})" if gbps else "")


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG and close it; a write failure is a user error."""
    import matplotlib.pyplot as plt

    from .errors import EdgekvError

    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise EdgekvError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
