"""The document cache: what a saved file gives back, and what a bad file never gives back."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekv import doccache
from edgekv.cache_cli import cache_app
from edgekv.doccache import FORMAT_VERSION, DocumentCache, cache_key, default_cache_dir
from edgekv.errors import DiskFullError

KEY = "a" * 64
OTHER = "b" * 64


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "keys_q4": torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=g),
        "scales": torch.randn(4, 9, generator=g).to(torch.bfloat16),
        "mins": torch.randn(2, 3, generator=g).half(),
        "summary": torch.randn(6, generator=g),
        "token_ids": torch.arange(11, dtype=torch.int64) * 1_000_000_007,
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),  # not contiguous
    }


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def cache(tmp_path: Path, warnings: list[str]) -> DocumentCache:
    return DocumentCache(tmp_path / "docs", warn=warnings.append)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def dead_pid() -> int:
    """The pid of a process that has already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------ round trip


def test_round_trip_of_mixed_dtypes_gives_equal_owned_contiguous_tensors(cache):
    tensors = mixed_tensors()
    meta = {"model": "SmolLM2-135M-Instruct", "tokens": 11, "nested": {"bits": [4, 2]}}
    path = cache.save(KEY, tensors, meta)
    assert path == cache.root / f"{KEY}.edkv" and path.is_file()

    loaded = cache.load(KEY)
    assert loaded is not None
    out, out_meta = loaded
    assert out_meta == meta
    assert list(out) == list(tensors)
    for name, expected in tensors.items():
        got = out[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert got.is_contiguous(), name
        assert got.untyped_storage().nbytes() == got.nbytes, f"{name} shares a buffer"
        assert torch.equal(got, expected), name
    out["keys_q4"].add_(1)  # writable, and changing it changes nothing on disk
    assert torch.equal(cache.load(KEY)[0]["keys_q4"], tensors["keys_q4"])


def test_saving_again_replaces_the_entry(cache):
    cache.save(KEY, {"x": torch.zeros(3)}, {"v": 1})
    cache.save(KEY, {"y": torch.ones(2, dtype=torch.int64)}, {"v": 2})
    out, meta = cache.load(KEY)
    assert meta == {"v": 2} and list(out) == ["y"]
    assert files_in(cache.root) == [f"{KEY}.edkv"]


def test_missing_entry_is_none_without_a_warning(cache, warnings):
    assert cache.load(KEY) is None
    assert warnings == []


def test_tensor_data_is_aligned_in_the_file(cache):
    cache.save(KEY, {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5)}, {})
    with open(cache.path_for(KEY), "rb") as f:
        header = doccache._parse_header(f, os.fstat(f.fileno()).st_size)
    offsets = [t["offset"] for t in header["tensors"]]
    assert len(offsets) == 2 and all(offset % doccache.ALIGN == 0 for offset in offsets)


def test_keys_must_be_safe_file_names(cache):
    for bad in ["", "../x", "a/b", "x" * 129, "key.edkv"]:
        with pytest.raises(ValueError):
            cache.save(bad, {}, {})


# ------------------------------------------------------------------ cache key


def test_cache_key_changes_with_every_part():
    base = dict(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", token_ids=[1, 2, 3, 4],
                codec="kivi4", block_size=64)
    key = cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(**base) == key
    changed = [
        {"model_id": "HuggingFaceTB/SmolLM2-360M-Instruct"},
        {"token_ids": [1, 2, 3, 5]},
        {"token_ids": [1, 2, 3]},
        {"token_ids": [1, 2, 3, 4, 0]},
        {"codec": "kivi2"},
        {"block_size": 32},
    ]
    keys = {cache_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)


def test_cache_key_includes_the_format_version(monkeypatch):
    args = dict(model_id="m", token_ids=[7], codec="kivi4", block_size=16)
    key = cache_key(**args)
    monkeypatch.setattr(doccache, "FORMAT_VERSION", FORMAT_VERSION + 1)
    assert cache_key(**args) != key


def test_cache_key_is_the_same_for_a_list_and_a_tensor_of_the_same_ids():
    args = dict(model_id="m", codec="kivi4", block_size=16)
    ids = [5, 9, 128000, 2]
    key = cache_key(token_ids=ids, **args)
    assert cache_key(token_ids=torch.tensor(ids, dtype=torch.int32), **args) == key
    assert cache_key(token_ids=torch.tensor([ids]), **args) == key
    with pytest.raises(TypeError):
        cache_key(token_ids=torch.tensor([1.0]), **args)


# ------------------------------------------------------------------ bad files


def rewrite(path: Path, edit) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))


def flip(position: int):
    def edit(data: bytearray) -> bytearray:
        data[position] ^= 0x5A
        return data
    return edit


def expect_rejected(cache, warnings, key, *words):
    """load() gives None, says so in exactly one line naming the file, and deletes it."""
    path = cache.path_for(key)
    assert cache.load(key) is None
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert "\n" not in line and path.name in line and "rebuilt" in line
    for word in words:
        assert word in line, line
    assert not path.exists()
    warnings.clear()


def test_a_flipped_byte_anywhere_in_the_file_is_caught(cache, warnings):
    tensors = {"a": torch.arange(5, dtype=torch.uint8), "b": torch.randn(3).bfloat16(),
               "c": torch.arange(2, dtype=torch.int64)}
    path = cache.save(KEY, tensors, {"model": "m"})
    good = path.read_bytes()
    for position in range(len(good)):
        path.write_bytes(good)
        rewrite(path, flip(position))
        expect_rejected(cache, warnings, KEY)


@pytest.mark.parametrize("keep", [0, 5, 23, 24, 100, -1])
def test_a_truncated_file_is_caught(cache, warnings, keep):
    path = cache.save(KEY, mixed_tensors(), {})
    size = path.stat().st_size
    rewrite(path, lambda data: data[: keep % size])
    expect_rejected(cache, warnings, KEY, "truncated")


def test_extra_bytes_at_the_end_are_caught(cache, warnings):
    path = cache.save(KEY, mixed_tensors(), {})
    rewrite(path, lambda data: data + b"\0")
    expect_rejected(cache, warnings, KEY, "corrupt")


def test_a_file_of_another_kind_is_caught(cache, warnings):
    cache.root.mkdir(parents=True)
    cache.path_for(KEY).write_bytes(b"PK\x03\x04 this is a zip file, not a cache" * 10)
    expect_rejected(cache, warnings, KEY, "magic")


def test_another_format_version_is_caught(cache, warnings):
    path = cache.save(KEY, mixed_tensors(), {})
    rewrite(path, lambda data: data[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + data[12:])
    expect_rejected(cache, warnings, KEY, "version")


def test_a_file_holding_another_key_is_caught(cache, warnings):
    cache.save(OTHER, mixed_tensors(), {})
    os.replace(cache.path_for(OTHER), cache.path_for(KEY))
    expect_rejected(cache, warnings, KEY, "key")


def test_a_bad_file_is_rebuilt_by_the_next_save(cache, warnings):
    path = cache.save(KEY, {"x": torch.ones(4)}, {})
    rewrite(path, flip(path.stat().st_size - 1))
    assert cache.load(KEY) is None and len(warnings) == 1
    cache.save(KEY, {"x": torch.ones(4)}, {})
    assert torch.equal(cache.load(KEY)[0]["x"], torch.ones(4))


def test_default_warning_is_one_line_on_stderr(tmp_path, capsys):
    cache = DocumentCache(tmp_path)
    rewrite(cache.save(KEY, {"x": torch.ones(4)}, {}), lambda data: data[:-1])
    assert cache.load(KEY) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err and KEY in err


# ------------------------------------------------------------------ disk full


def write_half_then_fill_up(fd, data):
    view = memoryview(data).cast("B")
    os.write(fd, view[: len(view) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_raises_a_clear_error_and_leaves_nothing_behind(cache, monkeypatch):
    monkeypatch.setattr(doccache, "_write_all", write_half_then_fill_up)
    with pytest.raises(DiskFullError) as info:
        cache.save(KEY, mixed_tensors(), {})
    message = str(info.value)
    assert "disk full" in message and str(cache.root) in message and "edgekv cache prune" in message
    assert files_in(cache.root) == []


def test_disk_full_at_fsync_keeps_the_previous_entry(cache, monkeypatch):
    cache.save(KEY, {"x": torch.ones(3)}, {"v": 1})

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(doccache.os, "fsync", fsync_full)
    with pytest.raises(DiskFullError):
        cache.save(KEY, {"x": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    assert files_in(cache.root) == [f"{KEY}.edkv"]
    assert cache.load(KEY)[1] == {"v": 1}


# ------------------------------------------------------------------ concurrency


def _save_many(root: str, worker: int, start, rounds: int) -> None:
    cache = DocumentCache(root)
    payload = {"x": torch.full((50_000,), worker, dtype=torch.int64),
               "y": torch.full((1000,), float(worker)).bfloat16()}
    start.wait(timeout=60)
    for _ in range(rounds):
        cache.save(KEY, payload, {"worker": worker})


def test_two_processes_saving_one_key_leave_one_valid_file(cache, warnings):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)  # both writers and this reader start together
    workers = [context.Process(target=_save_many, args=(str(cache.root), w, start, 20))
               for w in (1, 2)]
    for p in workers:
        p.start()
    start.wait(timeout=60)
    while any(p.is_alive() for p in workers):  # a reader meanwhile sees whole files only
        loaded = cache.load(KEY)
        if loaded is not None:
            out, meta = loaded
            assert torch.all(out["x"] == meta["worker"])
    for p in workers:
        p.join()
        assert p.exitcode == 0
    out, meta = cache.load(KEY)
    assert meta["worker"] in (1, 2) and torch.all(out["x"] == meta["worker"])
    assert torch.all(out["y"] == float(meta["worker"]))
    assert files_in(cache.root) == [f"{KEY}.edkv"]
    assert warnings == []


# ------------------------------------------------------------------ leftovers


def test_a_killed_writers_temp_file_is_never_read_and_is_cleaned_up(cache, warnings):
    path = cache.save(KEY, {"x": torch.ones(3)}, {})
    temp = cache.root / f".{KEY}.{dead_pid()}.0123abcd.tmp"
    os.replace(path, temp)  # a complete file, but its writer never renamed it
    assert cache.load(KEY) is None
    assert cache.entries() == []
    assert warnings == []
    cache.save(OTHER, {"x": torch.ones(3)}, {})  # any save sweeps it away
    assert files_in(cache.root) == [f"{OTHER}.edkv"]


def test_clear_and_prune_remove_abandoned_temp_files(cache):
    for sweep in (cache.clear, lambda: cache.prune(10**12)):
        cache.root.mkdir(parents=True, exist_ok=True)
        (cache.root / f".{KEY}.{dead_pid()}.feed.tmp").write_bytes(b"half")
        assert sweep() == 1
        assert files_in(cache.root) == []


def test_a_live_writers_temp_file_is_kept_until_it_is_an_hour_old(cache):
    cache.root.mkdir(parents=True)
    temp = cache.root / f".{KEY}.{os.getpid()}.beef.tmp"  # this process: alive
    temp.write_bytes(b"in progress")
    cache.prune(0)
    cache.save(OTHER, {}, {})
    assert temp.exists()
    hours_ago = time.time() - 2 * 3600
    os.utime(temp, (hours_ago, hours_ago))
    cache.save(OTHER, {}, {})
    assert not temp.exists()


# ------------------------------------------------------------------ entries / prune


def test_entries_list_meta_size_and_last_use_newest_first(cache):
    cache.save(KEY, {"x": torch.ones(10)}, {"model": "m1", "tokens": 10})
    cache.save(OTHER, {"x": torch.ones(1000)}, {"model": "m2", "tokens": 1000})
    os.utime(cache.path_for(OTHER), (1_000_000, 1_000_000))
    entries = cache.entries()
    assert [e.key for e in entries] == [KEY, OTHER]
    assert entries[1].last_used == 1_000_000
    assert entries[1].meta == {"model": "m2", "tokens": 1000}
    assert entries[1].size_bytes == cache.path_for(OTHER).stat().st_size > 4000


def test_load_refreshes_last_used(cache):
    path = cache.save(KEY, {"x": torch.ones(3)}, {})
    os.utime(path, (1_000_000, 1_000_000))
    before = time.time()
    cache.load(KEY)
    assert cache.entries()[0].last_used >= before - 1


def test_prune_keeps_the_most_recently_used_within_the_limit(cache):
    keys = ["1" * 64, "2" * 64, "3" * 64]
    for i, key in enumerate(keys):
        path = cache.save(key, {"x": torch.zeros(1000, dtype=torch.uint8)}, {})
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # 1 oldest, 3 newest
    size = cache.path_for(keys[0]).stat().st_size
    cache.load(keys[0])  # now 1 is the most recently used, 2 the least

    assert cache.prune(3 * size) == 0
    assert cache.prune(3 * size - 1) == 1
    assert {e.key for e in cache.entries()} == {keys[0], keys[2]}
    assert cache.prune(size) == 1
    assert [e.key for e in cache.entries()] == [keys[0]]
    assert cache.prune(0) == 1 and cache.entries() == []


def test_clear_removes_every_entry(cache):
    cache.save(KEY, {"x": torch.ones(3)}, {})
    cache.save(OTHER, {"x": torch.ones(3)}, {})
    assert cache.clear() == 2
    assert files_in(cache.root) == []
    assert DocumentCache(cache.root / "never-made").clear() == 0


# ------------------------------------------------------------------ default dir


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKV_DOC_CACHE_DIR", str(tmp_path / "docs"))
    assert default_cache_dir() == tmp_path / "docs"
    monkeypatch.delenv("EDGEKV_DOC_CACHE_DIR")
    monkeypatch.setenv("EDGEKV_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "documents"
    monkeypatch.delenv("EDGEKV_CACHE_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "edgekv" / "documents"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert default_cache_dir() == Path.home() / ".cache" / "edgekv" / "documents"


# ------------------------------------------------------------------ CLI


runner = CliRunner()


def test_cli_list_shows_entries_and_a_total(cache):
    cache.save(KEY, {"x": torch.ones(10)}, {"model": "SmolLM2-135M", "tokens": 8192})
    result = runner.invoke(cache_app, ["list", "--dir", str(cache.root)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["KEY", "SIZE"]
    assert KEY[:12] in lines[1] and "SmolLM2-135M" in lines[1] and "8192" in lines[1]
    assert lines[-1].startswith("total: 1 document,")


def test_cli_list_of_an_empty_cache(tmp_path):
    result = runner.invoke(cache_app, ["list", "--dir", str(tmp_path / "none")])
    assert result.exit_code == 0 and "no cached documents" in result.stdout


def test_cli_clear(cache):
    cache.save(KEY, {"x": torch.ones(3)}, {})
    result = runner.invoke(cache_app, ["clear", "--dir", str(cache.root)])
    assert result.exit_code == 0 and "removed 1 file " in result.stdout
    assert cache.entries() == []


def test_cli_prune(cache):
    for i, key in enumerate([KEY, OTHER]):
        path = cache.save(key, {"x": torch.zeros(4000, dtype=torch.uint8)}, {})
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    result = runner.invoke(cache_app, ["prune", "--max-size", "5KiB", "--dir", str(cache.root)])
    assert result.exit_code == 0, result.output
    assert "removed 1 file;" in result.stdout
    assert [e.key for e in cache.entries()] == [OTHER]


@pytest.mark.parametrize("size", ["lots", "12XB", "-1GiB", ""])
def test_cli_prune_with_a_bad_size_fails_with_one_line(cache, size):
    cache.save(KEY, {"x": torch.ones(3)}, {})
    result = runner.invoke(cache_app, ["prune", "--max-size", size, "--dir", str(cache.root)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert cache.entries() != []


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("100MB", 100 * 10**6),
    ("1.5 GiB", 3 * 2**29), ("4096", 4096), ("0", 0),
])
def test_cli_prune_understands_sizes(cache, text, expected, monkeypatch):
    seen = []
    monkeypatch.setattr(DocumentCache, "prune", lambda self, limit: seen.append(limit) or 0)
    result = runner.invoke(cache_app, ["prune", "--max-size", text, "--dir", str(cache.root)])
    assert result.exit_code == 0, result.output
    assert seen == [expected]


def test_the_layout_tag_tells_weight_precisions_apart():
    """Prefill KV depends on the stored weights' precision: a cached document made with
    fp32 weights is not reused by an engine with fp16 weights (and vice versa)."""
    from types import SimpleNamespace

    from edgekv.config import Policy
    from edgekv.prefix_cache import layout_tag

    def tag(weights: torch.dtype, kv_bits: int = 4) -> str:
        return layout_tag(SimpleNamespace(policy=Policy(kv_bits=kv_bits), dtype=torch.float32, weight_dtype=weights))

    assert len({tag(torch.float16), tag(torch.float32), tag(torch.float16, kv_bits=8)}) == 3
    assert tag(torch.float16) == tag(torch.float16)
