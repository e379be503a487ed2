"""The offloaded KV cache: compressed blocks in the tiers, an exact recent window."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.config import Policy
from edgekv.engine import Engine
from edgekv.errors import BudgetError
from edgekv.kernels.rope import rotate_keys
from edgekv.loader import resolve_model
from edgekv.quant import BlockCodec
from edgekv.rotation import rotate, value_rotation
from edgekv.tiered_cache import TieredKVCache

runner = CliRunner()


INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)


def small_cache(tmp_path, **overrides) -> TieredKVCache:
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, max_context=256, block_size=4, kv_bits=4,
                recent_window=5, device_cache_bytes=1 << 20, ram_bytes=1 << 20, disk_dir=str(tmp_path),
                disk_bytes=1 << 20, dtype=torch.float32, device=torch.device("cpu"), rope_inv_freq=INV_FREQ)
    args.update(overrides)
    return TieredKVCache(**args)


def feed(cache: TieredKVCache, chunks: list[int], seed: int = 0) -> tuple[list, list, list]:
    """Push random K/V through attend/commit in chunks, as the layer loop does (keys rotated
    to their positions, and before rotation); returns every layer's full K, pre-RoPE K and V."""
    g = torch.Generator().manual_seed(seed)
    ks, pres, vs = ([torch.empty(2, 0, 16) for _ in range(2)] for _ in range(3))
    for t in chunks:
        positions = torch.arange(cache.length, cache.length + t)
        for layer in range(2):
            k_pre, v = torch.randn(2, t, 16, generator=g), torch.randn(2, t, 16, generator=g)
            k = rotate_keys(k_pre, positions, INV_FREQ)
            cache.attend(layer, torch.randn(4, t, 16, generator=g), k, v, k_pre)
            ks[layer], pres[layer] = torch.cat((ks[layer], k), 1), torch.cat((pres[layer], k_pre), 1)
            vs[layer] = torch.cat((vs[layer], v), 1)
        cache.commit(t)
    return ks, pres, vs


def expected_keys(codec: BlockCodec, keys: torch.Tensor, keys_pre: torch.Tensor, values: torch.Tensor,
                  num_blocks: int):
    """Compressed part = the codec round trip of the keys before RoPE, rotated to their
    positions; block 0 (the sink) and the tail exact."""
    n = num_blocks * codec.block_size
    H, _, D = keys.shape
    blocks = codec.decode(codec.encode(keys_pre[:, :n].reshape(-1, codec.block_size, D),
                                       values[:, :n].reshape(-1, codec.block_size, D)))[0]
    out = torch.cat((rotate_keys(blocks.reshape(H, n, D), torch.arange(n), INV_FREQ), keys[:, n:]), dim=1)
    out[:, :codec.block_size] = keys[:, :codec.block_size]  # block 0: the exact sink
    return out


def test_old_blocks_are_compressed_and_the_recent_window_stays_exact(tmp_path):
    cache = small_cache(tmp_path)
    ks, pres, vs = feed(cache, [3, 7, 1, 1, 9, 2])  # 23 tokens
    assert cache.length == 23
    assert cache.num_blocks == (23 - 5) // 4  # whole blocks older than the window
    for layer in range(2):
        keys, stored = cache.layer_keys_values(layer)
        values = rotate(stored, cache.layout.value_basis, inverse=True)
        assert torch.allclose(keys, expected_keys(cache.codec, ks[layer], pres[layer], vs[layer], cache.num_blocks),
                              atol=1e-5)
        n = cache.num_blocks * 4
        assert torch.equal(keys[:, n:], ks[layer][:, n:]) and torch.allclose(values[:, n:], vs[layer][:, n:], atol=1e-6)
        assert torch.equal(keys[:, :4], ks[layer][:, :4]) and torch.allclose(values[:, :4], vs[layer][:, :4], atol=1e-6)
        assert not torch.equal(keys[:, 4:n], ks[layer][:, 4:n])  # 4-bit really is lossy


def test_new_blocks_go_to_the_device_cache_when_it_has_room_and_evict_nothing(tmp_path):
    rows_per_layer = 2 * (256 // 4)  # Hkv x max_blocks: the least device cache a cache accepts
    cache = small_cache(tmp_path, device_cache_bytes=rows_per_layer * BlockCodec(4, 4, 16).row_bytes)
    store = cache.store
    feed(cache, [100])  # one prefill chunk: 23 blocks per layer and KV head, 92 rows, none read yet
    assert store.device_room() == rows_per_layer - 92
    store.reset_counters()
    store.get(torch.cat([cache.layout.row_ids(layer, torch.arange(cache.num_blocks)) for layer in range(2)]))
    assert store.stats()["device_misses"] == 0 and store.stats()["device_hits"] == 92
    feed(cache, [40])  # 40 more rows than the 36 that fit: prefetching them would evict
    assert store.device_room() == rows_per_layer - 92


def test_the_exact_tail_grows_in_place_and_survives_commits_and_truncation(tmp_path):
    cache = small_cache(tmp_path)
    ks, _, _ = feed(cache, [6] + [1] * 9)  # a prefill chunk, then decode steps across a block boundary
    n = cache.num_blocks * 4
    assert torch.equal(cache.exact.tail(0)[0], ks[0][:, n:])
    assert torch.equal(cache.exact.sink(0)[0], ks[0][:, :4])  # block 0 stays exact, in front of the tail
    buffer = cache.exact.buffers[0][0]
    feed(cache, [1], seed=1)
    assert cache.exact.buffers[0][0].data_ptr() == buffer.data_ptr()  # the step wrote its token, nothing was copied
    kept = cache.truncate(cache.length - 2)
    more, _, _ = feed(cache, [1, 1], seed=2)
    keys, _ = cache.layer_keys_values(0)
    assert cache.length == kept + 2 and torch.equal(keys[:, -2:], more[0])
    assert torch.equal(keys[:, n:kept], ks[0][:, n:kept])  # the tokens before the cut are intact


def test_values_of_compressed_blocks_are_the_codec_round_trip_in_the_rotated_basis(tmp_path):
    cache = small_cache(tmp_path)
    _, pres, vs = feed(cache, [20])
    codec, n, r = cache.codec, cache.num_blocks * 4, cache.layout.value_basis
    _, values = cache.layer_keys_values(1)
    _, v_hat = codec.decode(codec.encode(pres[1][:, :n].reshape(-1, 4, 16), rotate(vs[1][:, :n], r).reshape(-1, 4, 16)))
    assert torch.allclose(values[:, 4:n], v_hat.reshape(2, n, 16)[:, 4:], atol=1e-6)


def test_values_are_rotated_below_16_bits_only(tmp_path):
    assert small_cache(tmp_path / "a", kv_bits=16).layout.value_basis is None
    r = small_cache(tmp_path / "b").layout.value_basis
    assert torch.allclose(r @ r.T, torch.eye(16), atol=1e-6)


def test_rotated_values_quantize_an_outlier_channel_better():
    """One large channel sets a per-token group's grid; the rotation spreads it over every channel."""
    codec = BlockCodec(4, 4, 16)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, 4, 16, generator=g)
    v[..., 3] *= 40
    k = torch.randn(8, 4, 16, generator=g)
    r = value_rotation(16, 4, torch.device("cpu"))
    plain = codec.decode(codec.encode(k, v))[1]
    rotated = rotate(codec.decode(codec.encode(k, rotate(v, r)))[1], r, inverse=True)
    small = [c for c in range(16) if c != 3]
    assert (rotated - v)[..., small].norm() < 0.5 * (plain - v)[..., small].norm()


def test_truncate_keeps_the_blocks_a_fresh_prefill_would_have_compressed(tmp_path):
    """Block 4, window 5: a fresh cache of 30 tokens compresses 6 blocks, one of 10 tokens 1;
    cut back to 10 and run again, the recent window is exact as in a fresh prefill."""
    cache = small_cache(tmp_path)
    feed(cache, [30])
    rows_before = len(cache.store)
    assert cache.truncate(30) == 30 and cache.num_blocks == 6
    assert cache.truncate(29) == 29 and cache.num_blocks == 6  # within the exact tail: nothing to drop
    assert cache.truncate(10) == 4 and cache.num_blocks == 1
    assert len(cache.store) < rows_before
    assert cache.layer_keys_values(0)[0].shape[1] == 4
    feed(cache, [6], seed=1)
    fresh = small_cache(tmp_path)
    feed(fresh, [10])
    assert (cache.length, cache.num_blocks) == (fresh.length, fresh.num_blocks) == (10, 1)
    assert cache.exact.tail(0)[0].shape == fresh.exact.tail(0)[0].shape


def test_a_prefill_keeps_its_decoded_rows_and_attends_exactly_as_decoding_them_all_again(tmp_path):
    """On the CPU the rows decoded for one chunk are kept for the next (within the RAM
    budget); attention outputs equal those of a cache that decodes every row per chunk,
    through a cut back and a prefill after it, and a decode step frees the kept rows."""
    kept, again = small_cache(tmp_path), small_cache(tmp_path)
    again._past_bytes = 0
    outputs = {}
    for cache in (kept, again):
        feed(cache, [9, 7, 12, 3, 8])
        cache.truncate(21)
        feed(cache, [6, 10], seed=1)
        outputs[id(cache)] = [tuple(t.clone() for t in cache.layer_keys_values(layer)) for layer in range(2)]
    assert kept._past is not None and again._past is None
    assert kept._past.blocks == [kept.num_blocks] * 2
    for (k1, v1), (k2, v2) in zip(outputs[id(kept)], outputs[id(again)]):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    q = torch.randn(4, 1, 16)
    k, v = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    assert torch.equal(kept.attend(0, q, k, v, k), again.attend(0, q, k, v, k))
    assert kept._past is None  # the prefill is over


def test_decoded_rows_are_kept_only_within_the_ram_budget(tmp_path):
    cache = small_cache(tmp_path)
    feed(cache, [30])
    cache.layer_keys_values(0)
    assert cache._past.fits(30) and not cache._past.fits(10**6)
    cache._past.max_bytes = 1
    keys, _ = cache.layer_keys_values(1)  # over the budget: decoded into the scratch again
    assert keys.shape[1] == 30 and cache._past.blocks[1] == 0


def test_export_then_import_restores_every_value(tmp_path):
    cache = small_cache(tmp_path)
    feed(cache, [13, 6])
    state = cache.export_state()
    before = [tuple(t.clone() for t in cache.layer_keys_values(layer)) for layer in range(2)]  # scratch views
    fresh = small_cache(tmp_path)
    fresh.import_state(state)
    assert fresh.length == cache.length and fresh.num_blocks == cache.num_blocks
    for layer in range(2):
        after = fresh.layer_keys_values(layer)
        assert torch.equal(after[0], before[layer][0]) and torch.equal(after[1], before[layer][1])


def test_ram_budget_below_one_layer_is_refused_with_the_minimum(tmp_path):
    with pytest.raises(BudgetError, match="at least"):
        small_cache(tmp_path, ram_bytes=100)


@pytest.fixture(scope="module")
def tiny_folder(tiny_models):
    return tiny_models["llama3"]


def test_ram_below_the_kv_size_spills_to_disk_and_gives_identical_tokens(tiny_folder, tmp_path, long_text):
    prompt = long_text[:5000]
    in_ram = Engine(resolve_model(tiny_folder), Policy(block_size=16, ram_bytes="64MiB", disk_dir=str(tmp_path)))
    a = in_ram.generate(prompt, max_new_tokens=24, ignore_eos=True)
    row_bytes = in_ram.kv.codec.row_bytes
    layer_rows = in_ram.kv.layout.num_kv_heads * in_ram.kv.layout.max_blocks
    one_layer = layer_rows * row_bytes  # the least RAM and device cache accepted: decode reads the disk
    spilling = Engine(resolve_model(tiny_folder), Policy(block_size=16, ram_bytes=one_layer,
                                                         device_cache_bytes=one_layer, disk_dir=str(tmp_path)))
    b = spilling.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert a.stats["kv_bytes"]["disk"] == 0
    assert b.stats["kv_bytes"]["disk"] > 0 and b.stats["kv_bytes"]["ram"] <= layer_rows * row_bytes
    assert b.stats["kv_read_bytes_per_token"]["disk"] > 0  # decode steps read rows back from the disk
    assert a.token_ids == b.token_ids
    spilling.close()
    in_ram.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tier")]  # the tier file is removed


def test_too_small_ram_on_the_command_line_names_the_minimum(tiny_folder, tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("A short document.")
    result = runner.invoke(app, ["generate", str(doc), "-p", "q", "--model", str(tiny_folder), "--ram", "1KiB"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: RAM budget 1 KiB is too small: at least")


def test_disk_full_while_spilling_is_one_clear_error_and_leaves_no_file(tiny_folder, tmp_path, monkeypatch, long_text):
    import edgekv.tiers

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edgekv.tiers.os, "pwrite", full)
    doc = tmp_path / "d.txt"
    doc.write_text(long_text[:7500])  # ~1.8K tokens: twice what RAM may hold
    disk = tmp_path / "tier"
    result = runner.invoke(app, ["generate", str(doc), "-p", "q", "--model", str(tiny_folder), "-n", "2",
                                 "--ram", "88KiB", "--disk-dir", str(disk), "--no-doc-cache"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "disk" in result.stderr.lower() and "Traceback" not in result.output
    import gc

    gc.collect()
    assert not list(disk.glob("*.tier"))


def test_second_question_reuses_the_document_from_the_cache(tiny_folder, tmp_path, long_text):
    doc = tmp_path / "d.txt"
    doc.write_text(long_text[:6000])
    cache = tmp_path / "docs"

    def ask(question: str, *extra: str) -> dict:
        stats = tmp_path / "s.json"
        result = runner.invoke(app, ["generate", str(doc), "-p", question, "--model", str(tiny_folder), "-n", "6",
                                     "--doc-cache-dir", str(cache), "--stats-json", str(stats), *extra])
        assert result.exit_code == 0, result.output
        return {**json.loads(stats.read_text()), "text": result.stdout, "stderr": result.stderr}

    first = ask("What is this?")
    second = ask("Who wrote it?")
    fresh = ask("Who wrote it?", "--no-doc-cache")
    assert first["document_kv"] == "computed" and second["document_kv"] == "disk"
    assert second["reused_tokens"] > 0.9 * second["prompt_tokens"]
    assert second["text"] == fresh["text"]
    # a corrupt cache file is reported once, rebuilt, and never used
    (entry,) = cache.glob("*.edkv")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    third = ask("Who wrote it?")
    assert third["document_kv"] == "computed" and third["text"] == fresh["text"]
    assert sum("rebuilt" in line or "corrupt" in line.lower() for line in third["stderr"].splitlines()) == 1


def test_too_small_device_cache_names_what_one_layer_needs(tiny_folder, tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("A short document.")
    result = runner.invoke(app, ["generate", str(doc), "-p", "q", "--model", str(tiny_folder), "--device-cache", "4KiB"])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error: device cache budget 4 KiB is too small") and "--device-cache" in message
