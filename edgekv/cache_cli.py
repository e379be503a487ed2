"""`edgekv cache ...`: look at and trim the document cache (see edgekv.doccache)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from edgekv.errors import EdgekvError
from edgekv.sizes import format_size, parse_size

if TYPE_CHECKING:
    from edgekv.doccache import DocumentCache

cache_app = typer.Typer(
    help="Inspect and trim the on-disk cache of processed documents "
    "(a second question about a cached document skips its prefill).",
    no_args_is_help=True,
)

DirOption = typer.Option(None, "--dir", help="Cache directory [default: the user cache dir].")


def _cache(directory: Optional[Path]) -> DocumentCache:
    from edgekv.doccache import DocumentCache, default_cache_dir  # torch loads only when needed

    return DocumentCache(directory if directory is not None else default_cache_dir())


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(2)


@cache_app.command("list")
def list_(directory: Optional[Path] = DirOption) -> None:
    """List cached documents, most recently used first, with a total line."""
    cache = _cache(directory)
    try:
        entries = cache.entries()
    except OSError as err:
        raise _fail(f"cannot read the document cache in {cache.root}: {err.strerror or err}")
    if not entries:
        print(f"no cached documents in {cache.root}")
        return
    rows = [("KEY", "SIZE", "LAST USED", "MODEL", "TOKENS", "CODEC")]
    for e in entries:
        meta = e.meta
        rows.append((
            e.key[:12],
            format_size(e.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
            str(meta.get("model", meta.get("model_id", "-"))),
            str(meta.get("tokens", meta.get("n_tokens", "-"))),
            str(meta.get("codec", "-")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    total = sum(e.size_bytes for e in entries)
    noun = "document" if len(entries) == 1 else "documents"
    print(f"total: {len(entries)} {noun}, {format_size(total)} in {cache.root}")


@cache_app.command()
def clear(directory: Optional[Path] = DirOption) -> None:
    """Delete every cached document."""
    cache = _cache(directory)
    try:
        removed = cache.clear()
    except OSError as err:
        raise _fail(f"cannot clear the document cache in {cache.root}: {err.strerror or err}")
    print(f"removed {removed} file{'' if removed == 1 else 's'} from {cache.root}")


@cache_app.command()
def prune(
    max_size: str = typer.Option(..., "--max-size", help="Keep at most this much, e.g. 2GiB."),
    directory: Optional[Path] = DirOption,
) -> None:
    """Delete least-recently-used documents until the cache fits in --max-size."""
    try:
        limit = parse_size(max_size)
    except (EdgekvError, ValueError) as err:
        raise _fail(str(err))
    cache = _cache(directory)
    try:
        removed = cache.prune(limit)
        total = cache.total_bytes()
    except OSError as err:
        raise _fail(f"cannot prune the document cache in {cache.root}: {err.strerror or err}")
    print(f"removed {removed} file{'' if removed == 1 else 's'}; "
          f"{cache.root} now holds {format_size(total)} (limit {format_size(limit)})")
