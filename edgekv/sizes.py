"""Byte sizes as people write them ("512MiB", "2GiB", "100KB") and as edgekv prints them."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import EdgekvError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`: "4096", "100KB" (1000^n), "512MiB" (1024^n), "1.5GB"; any case."""
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    scale = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    value = Decimal(match.group(1)) * scale if scale else None
    if value is None or value != value.to_integral_value():
        raise EdgekvError(f"invalid size '{text}': use a number with a unit such as 512MiB or 2GiB")
    return int(value)


def format_size(n: int) -> str:
    """`n` bytes in binary units with at most two decimals: 1610612736 -> "1.5 GiB"."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} B"
