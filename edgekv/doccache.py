"""The document cache: one file per processed document, holding its compressed KV cache.

A second question about the same document loads this file instead of running prefill
again. The cache is a directory of files named `<key>.edkv`, where the key
(`cache_key`) is a sha256 over everything that makes the cached tensors valid: the
model, the document's token ids, the KV codec, the block size and the file format
version.

File layout (all integers little-endian):

    offset 0   8 bytes   magic b"EDGEKVDC"
    offset 8   u32       format version (FORMAT_VERSION)
    offset 12  u32       header length in bytes (H)
    offset 16  u32       crc32 of the header bytes
    offset 20  u32       reserved, always 0
    offset 24  H bytes   header: UTF-8 JSON {"key", "meta", "file_size", "tensors": [
                         {"name", "dtype", "shape", "offset", "length", "crc32"}, ...]}
    then       raw tensor bytes, each starting at a multiple of ALIGN bytes from the
               start of the file; every gap byte is zero.

Every byte of a file is checked on load: the preamble fields, the header by its crc32,
the gaps for zeros, each tensor's bytes by its crc32, and the file's exact size. A file
that fails any check is reported by one warning line, deleted, and treated as missing,
so the caller rebuilds it; bad data is never returned.

Writes are atomic: a file is written under a temporary name (`.<key>.<pid>.<random>.tmp`)
in the same directory, fsynced, and renamed onto its final name, so readers see either
the old file, the new one, or none. Temporary files are never read; those whose writer
is gone (a killed process) are deleted by `clear`, `prune` and every `save`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import psutil
import torch

from edgekv.errors import DiskFullError, EdgekvError

FORMAT_VERSION = 3  # 2: keys stored before RoPE; 3: values in a rotated basis below 16 bits
MAGIC = b"EDGEKVDC"
ALIGN = 64  # bytes; every tensor's data starts at a multiple of this file offset
SUFFIX = ".edkv"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 3600.0  # seconds after which any temporary file counts as abandoned

_PREAMBLE = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, 0
_MAX_HEADER = 64 << 20  # bytes; a longer header is corruption, not a real file
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,128}")
_TEMP_RE = re.compile(r"\.(?P<key>[0-9A-Za-z_-]{1,128})\.(?P<pid>\d+)\.[0-9a-f]+\.tmp")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def cache_key(
    *,
    model_id: str,
    token_ids: Sequence[int] | torch.Tensor,
    codec: str,
    block_size: int,
) -> str:
    """The cache key (64 hex characters) of one document's KV cache.

    Any change of model, token ids, codec, block size (tokens per block) or
    FORMAT_VERSION gives another key. The token ids are hashed as int64 values, so a
    list and a tensor of the same ids (of any integer dtype or shape) give the same key.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.is_complex():
            raise TypeError(f"token_ids must be integers, got a {token_ids.dtype} tensor")
        ids = token_ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
    else:
        ids = np.asarray(list(token_ids), dtype=np.int64).reshape(-1)
    if int(block_size) != block_size or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    fields = {
        "format": FORMAT_VERSION,
        "model": str(model_id),
        "codec": str(codec),
        "block_size": int(block_size),
        "tokens": int(ids.size),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + b"\0")
    digest.update(ids.astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where document caches live unless told otherwise (see `edgekv.loader.document_cache_dir`)."""
    from .loader import document_cache_dir

    return document_cache_dir()


@dataclass(frozen=True)
class CacheEntry:
    """One cached document as seen by `DocumentCache.entries`.

    `size_bytes` is the file size in bytes, `last_used` the time of the last save or
    load in unix seconds, `meta` the caller's metadata ({} when the header is unreadable).
    """

    key: str
    path: Path
    size_bytes: int
    last_used: float
    meta: dict


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class _Reject(Exception):
    """A cache file failed a check; the message says which, in a few words."""


class DocumentCache:
    """A directory of document cache files (see the module docstring for the format).

    `warn` receives one line for each bad file found (and deleted) by `load`.
    """

    def __init__(self, root: Path | str, *, warn: Callable[[str], None] = _warn_stderr):
        self.root = Path(root).expanduser()
        self.warn = warn

    def path_for(self, key: str) -> Path:
        """The final file path of `key`."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"bad cache key {key!r}: use 1-128 of [0-9A-Za-z_-]")
        return self.root / f"{key}{SUFFIX}"

    # ---------------------------------------------------------------- save

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write `tensors` and the JSON-serialisable `meta` under `key`, atomically.

        Tensors may live on any device and need not be contiguous. Returns the final
        path. Raises DiskFullError when the disk fills up (nothing is left behind).
        """
        path = self.path_for(key)
        items = [(str(name), _as_bytes_view(t)) for name, t in tensors.items()]
        if len({name for name, _ in items}) != len(items):
            raise ValueError("tensor names must be distinct")
        records = [{"name": name, "dtype": dtype, "shape": shape, "offset": 0,
                    "length": data.nbytes, "crc32": zlib.crc32(data)}
                   for name, (dtype, shape, data) in items]
        header = {"key": key, "meta": meta, "file_size": 0, "tensors": records}
        # The offsets depend on the header's length, which depends on the offsets'
        # digits: lay out again until the length stops changing (it only grows).
        header_len = 0
        while True:
            end = _PREAMBLE.size + header_len
            for record in records:
                record["offset"] = _align(end)
                end = record["offset"] + record["length"]
            header["file_size"] = end
            blob = json.dumps(header, separators=(",", ":")).encode()
            if len(blob) == header_len:
                break
            header_len = len(blob)

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._write_error(err) from err
        self._remove_orphans()
        temp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(temp, flags, 0o644)
        except OSError as err:
            raise self._write_error(err) from err
        try:
            try:
                preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(blob), zlib.crc32(blob), 0)
                position = _PREAMBLE.size + len(blob)
                _write_all(fd, preamble + blob)
                for record, (_, (_, _, data)) in zip(records, items):
                    if record["offset"] > position:
                        _write_all(fd, bytes(record["offset"] - position))
                    _write_all(fd, data)
                    position = record["offset"] + record["length"]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException as err:
            _unlink(temp)
            if isinstance(err, OSError):
                raise self._write_error(err) from err
            raise
        _fsync_dir(self.root)
        return path

    def _write_error(self, err: OSError) -> EdgekvError:
        if err.errno in _DISK_FULL:
            return DiskFullError(
                f"disk full while saving the document cache to {self.root}: free space "
                f"or run `edgekv cache prune --max-size ...`"
            )
        return EdgekvError(f"cannot write the document cache in {self.root}: {err.strerror or err}")

    # ---------------------------------------------------------------- load

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The tensors and meta saved under `key`, or None when there is no good file.

        A missing file gives None silently. A file that fails any check gives one
        warning line, is deleted, and gives None. A good file has its last-used time
        (mtime) set to now, which is what `prune` orders by.
        """
        path = self.path_for(key)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as err:
            self.warn(f"edgekv: warning: cannot read document cache file {path} "
                      f"({err.strerror or err}); the document will be processed again")
            return None
        with f:
            stat = os.fstat(f.fileno())
            try:
                result = _read_file(f, stat.st_size, key)
            except _Reject as reason:
                self.warn(f"edgekv: warning: document cache file {path} {reason}; "
                          f"deleted it, the cache will be rebuilt")
                _unlink_if_same(path, stat)
                return None
            except OSError as err:
                self.warn(f"edgekv: warning: cannot read document cache file {path} "
                          f"({err.strerror or err}); the document will be processed again")
                return None
        try:
            os.utime(path)
        except OSError:
            pass  # a read-only cache still serves hits; only LRU order suffers
        return result

    # ---------------------------------------------------------------- housekeeping

    def entries(self) -> list[CacheEntry]:
        """Every cache file in the directory, most recently used first.

        Temporary files are not entries. Only headers are read (data is not verified).
        """
        found = []
        for path in self._files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            key = path.name[: -len(SUFFIX)]
            found.append(CacheEntry(key, path, stat.st_size, stat.st_mtime, _read_meta(path, key)))
        found.sort(key=lambda e: e.last_used, reverse=True)
        return found

    def clear(self) -> int:
        """Delete every cache file and abandoned temporary file; returns files removed."""
        removed = sum(_unlink(path) for path in self._files())
        return removed + self._remove_orphans()

    def prune(self, max_bytes: int) -> int:
        """Delete least-recently-used files until the cache holds at most `max_bytes`.

        Abandoned temporary files are deleted first. Returns files removed.
        """
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        removed = self._remove_orphans()
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        for entry in reversed(entries):  # oldest first
            if total <= max_bytes:
                break
            removed += _unlink(entry.path)
            total -= entry.size_bytes
        return removed

    def total_bytes(self) -> int:
        """Bytes held by the cache files (temporary files not counted)."""
        return sum(e.size_bytes for e in self.entries())

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob(f"*{SUFFIX}")
                if not p.name.startswith(".") and _KEY_RE.fullmatch(p.name[: -len(SUFFIX)])]

    def _remove_orphans(self) -> int:
        """Delete temporary files whose writer has died or that are over an hour old."""
        removed, now = 0, time.time()
        for temp in self.root.glob(f".*{TEMP_SUFFIX}"):
            match = _TEMP_RE.fullmatch(temp.name)
            try:
                age = now - temp.stat().st_mtime
            except OSError:
                continue
            writer_alive = match is not None and psutil.pid_exists(int(match["pid"]))
            if age > STALE_TEMP_S or not writer_alive:
                removed += _unlink(temp)
        return removed


# -------------------------------------------------------------------- helpers


def _align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _as_bytes_view(tensor: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, a flat byte view) of a CPU contiguous copy of `tensor`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    return dtype, list(t.shape), memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data) -> None:
    """Write all of `data` (bytes-like) to `fd`, looping over short writes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(f, buffer) -> None:
    view = memoryview(buffer).cast("B")
    while view:
        n = f.readinto(view)
        if not n:
            raise _Reject("is truncated")
        view = view[n:]


def _parse_header(f, size: int) -> dict:
    """Check the preamble and header of an open cache file; returns the header."""
    if size < _PREAMBLE.size:
        raise _Reject(f"is truncated ({size} bytes, shorter than the {_PREAMBLE.size}-byte preamble)")
    raw = bytearray(_PREAMBLE.size)
    _read_exact(f, raw)
    magic, version, header_len, header_crc, reserved = _PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise _Reject("is not an edgekv document cache file (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise _Reject(f"has format version {version}, this edgekv reads version {FORMAT_VERSION}")
    if reserved != 0:
        raise _Reject("is corrupt (bad preamble)")
    if header_len > min(_MAX_HEADER, size - _PREAMBLE.size):
        raise _Reject("is truncated or corrupt (the header runs past the end of the file)")
    blob = bytearray(header_len)
    _read_exact(f, blob)
    if zlib.crc32(blob) != header_crc:
        raise _Reject("is corrupt (header checksum mismatch)")
    try:
        header = json.loads(blob)
        if not isinstance(header, dict) or not isinstance(header["meta"], dict):
            raise ValueError("not an object")
        header["header_end"] = _PREAMBLE.size + header_len
        return header
    except (ValueError, KeyError, TypeError) as err:
        raise _Reject(f"has a malformed header ({err})") from None


def _read_file(f, size: int, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a whole cache file; raises _Reject on the first problem."""
    header = _parse_header(f, size)
    if header.get("key") != key:
        raise _Reject(f"holds key {str(header.get('key'))[:16]!r}..., not the key in its name")
    try:
        file_size = int(header["file_size"])
        plan = []
        position = header["header_end"]
        for record in header["tensors"]:
            dtype = getattr(torch, record["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {record['dtype']!r}")
            shape = [int(n) for n in record["shape"]]
            offset, length = int(record["offset"]), int(record["length"])
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if min(shape, default=0) < 0 or length != numel * dtype.itemsize:
                raise ValueError(f"tensor {record['name']!r} has a length that does not match its shape")
            if offset < position or offset % ALIGN:
                raise ValueError(f"tensor {record['name']!r} has a bad offset")
            plan.append((str(record["name"]), dtype, shape, offset, length, int(record["crc32"])))
            position = offset + length
        if position != file_size:
            raise ValueError("the tensors do not end at the file size")
    except (ValueError, KeyError, TypeError) as err:
        raise _Reject(f"has a malformed header ({err})") from None
    if size < file_size:
        raise _Reject(f"is truncated ({size} of {file_size} bytes)")
    if size > file_size:
        raise _Reject(f"is corrupt ({size - file_size} unexpected bytes at the end)")

    tensors: dict[str, torch.Tensor] = {}
    position = header["header_end"]
    for name, dtype, shape, offset, length, crc in plan:
        gap = bytearray(offset - position)
        _read_exact(f, gap)
        if gap.count(0) != len(gap):
            raise _Reject("is corrupt (nonzero padding bytes)")
        tensor = torch.empty(shape, dtype=dtype)
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        _read_exact(f, data)
        if zlib.crc32(data) != crc:
            raise _Reject(f"is corrupt (checksum mismatch in tensor {name!r})")
        tensors[name] = tensor
        position = offset + length
    return tensors, header["meta"]


def _read_meta(path: Path, key: str) -> dict:
    """The meta of a cache file from its header alone, or {} when it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as f:
            header = _parse_header(f, os.fstat(f.fileno()).st_size)
    except (OSError, _Reject):
        return {}
    return header["meta"] if header.get("key") == key else {}


def _unlink(path: Path) -> int:
    """Delete `path`; 1 if this call removed it, 0 if it was already gone."""
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def _unlink_if_same(path: Path, stat: os.stat_result) -> None:
    """Delete `path` unless another process has meanwhile replaced it with a new file."""
    try:
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
