"""Turning engine figures (bytes, seconds, rates) into short display strings."""

from __future__ import annotations

from typing import Any

DASH = "—"
TIERS = ("device", "ram", "disk")
TIER_LABELS = {"device": "device", "ram": "RAM", "disk": "disk"}


def human_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return DASH  # unreachable


def rate(value: Any, unit: str = "tok/s") -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return f"{value:.3f} {unit}" if unit == "GB/s" else f"{value:.1f} {unit}"


def seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def share(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return f"{value:.0%}"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else DASH


def policy_line(policy: Any) -> tuple[str, str]:
    """(budget, bits) of an engine policy dataclass, as text."""
    budget = getattr(policy, "budget", "all")
    bits = getattr(policy, "kv_bits", 16)
    return str(budget), f"{bits}-bit"


def stats_markdown(stats: dict[str, Any]) -> str:
    """The full figures of one turn as a Markdown table (for /stats)."""
    kv = stats.get("kv_bytes") or {}
    rows = [
        ("prompt tokens", count(stats.get("prompt_tokens"))),
        ("reused tokens", count(stats.get("reused_tokens"))),
        ("generated tokens", count(stats.get("generated_tokens"))),
        ("time to first token", seconds(stats.get("ttft_s"))),
        ("prefill", rate(stats.get("prefill_tok_s"))),
        ("decode", rate(stats.get("decode_tok_s"))),
        ("prefetch hit rate", share(stats.get("prefetch_hit_rate"))),
        ("finish", str(stats.get("finish_reason", DASH))),
    ]
    rows += [(f"KV {TIER_LABELS.get(t, t)}", human_bytes(kv.get(t))) for t in _tiers(kv)]
    read = stats.get("kv_read_bytes_per_token") or {}
    rows += [(f"KV read per token, {TIER_LABELS.get(t, t)}", human_bytes(read[t]))
             for t in _tiers(read)]
    gbps = stats.get("kv_gbps") or {}
    rows += [(f"KV bandwidth, {TIER_LABELS.get(t, t)}", rate(gbps[t], "GB/s"))
             for t in _tiers(gbps)]
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _tiers(kv: dict[str, Any]) -> list[str]:
    """Known tiers first in their order, then any other tier the engine reports."""
    return [t for t in TIERS if t in kv] + sorted(t for t in kv if t not in TIERS)
