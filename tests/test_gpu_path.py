"""The CUDA decode path, checked where no GPU is.

The CUDA backend runs here on CPU tensors (Triton in its interpreter, host clocks for
CUDA events, its cache filler inline): the same placement tables, slot codes, pooled
attention and counters as on a GPU. What a CPU cannot show — that a step never waits for
the device — is checked by recording every call the step's own code makes that would
read device values back to the host. On a GPU, `edgekv bench gpu` counts the same with
torch's sync debug mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from edgekv.kernels.rope import rotate_keys
from edgekv.quant import BlockCodec
from edgekv.tiered_cache import TieredKVCache

INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = (str(ROOT / "edgekv"),)

# calls that read a tensor's values (or a size that depends on them) back to the host
READS_BACK = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "argwhere", "unique", "masked_select"}


class HostReads(TorchFunctionMode):
    """Records the torch calls made from edgekv's own code (edgekv/, its kernels included) that would
    synchronize a GPU with the host: value reads, data-dependent shapes (boolean
    indexing), copies to the CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(OWN_CODE) and self._reads_back(name, args, kwargs):
            frame = sys._getframe(1)
            self.calls.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return func(*args, **kwargs)

    @staticmethod
    def _reads_back(name: str, args: tuple, kwargs: dict) -> bool:
        if name in READS_BACK:
            return True
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name == "to":  # an explicit move to the host (a move to another tensor's device is not one)
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return isinstance(target, str) and target.startswith("cpu")
        return False


def cuda_cache(tmp_path, **overrides) -> TieredKVCache:
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, max_context=512, block_size=4, kv_bits=4,
                recent_window=4, device_cache_bytes=1 << 20, ram_bytes=1 << 20, disk_dir=str(tmp_path),
                disk_bytes=1 << 20, dtype=torch.float32, device=DEVICE, rope_inv_freq=INV_FREQ, backend="triton")
    args.update(overrides)
    return TieredKVCache(**args)


def reference_cache(tmp_path, **overrides) -> TieredKVCache:
    return cuda_cache(tmp_path, **{"backend": "torch", **overrides})


def step_tokens(cache: TieredKVCache, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    q, k_pre, v = (torch.randn(h, tokens, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    k = rotate_keys(k_pre, torch.arange(cache.length, cache.length + tokens, device=DEVICE), INV_FREQ.to(DEVICE))
    return q, k, v, k_pre


def fill(caches: list[TieredKVCache], tokens: int, seed: int = 0) -> None:
    for cache in caches:
        g = torch.Generator().manual_seed(seed)
        for layer in range(2):
            cache.attend(layer, *step_tokens(cache, tokens, g))
        cache.commit(tokens)


def test_a_cuda_decode_step_reads_nothing_back_to_the_host(tmp_path):
    cache = cuda_cache(tmp_path, scorer="mass")
    fill([cache], 100)
    cache.configure_selection(budget=24, sink_blocks=1, dense_layers=0, speculate=True, head_budget="adaptive")
    handed_to_filler = []
    cache.backend.filler.request = handed_to_filler.append  # its worker thread waits, not the step
    g = torch.Generator().manual_seed(1)
    q, k, v, k_pre = step_tokens(cache, 1, g)
    with HostReads() as reads:
        cache.speculate(0, q[:, 0])
        cache.attend(0, q, k, v, k_pre)
        cache.speculate(1, q[:, 0])
        cache.attend(1, q, k, v, k_pre)  # the last layer: the step's reads go to the filler
        cache.commit(1)
    assert reads.calls == []
    assert len(handed_to_filler) == 3  # two speculative requests, then the step's reads
    with HostReads() as probe:  # the recorder sees what it should
        int(torch.ones(1, device=DEVICE)[0] > 0)
        torch.arange(4, device=DEVICE)[torch.arange(4, device=DEVICE) > 1]
    assert probe.calls == []  # (called from a test file, not edgekv's code: not counted)
    assert HostReads._reads_back("__getitem__", (torch.ones(2), torch.ones(2, dtype=torch.bool)), {})
    assert HostReads._reads_back("to", (torch.ones(2), "cpu"), {})


def test_misses_are_read_from_ram_in_place_then_filled_into_the_device_cache(tmp_path):
    one_layer = 2 * (512 // 4) * BlockCodec(4, 4, 16).row_bytes  # the least device cache accepted
    cache = cuda_cache(tmp_path / "a", device_cache_bytes=one_layer)
    reference = reference_cache(tmp_path / "b")
    fill([cache, reference], 400)  # 99 blocks a layer and head: the two layers do not fit together
    for c in (cache, reference):
        c.configure_selection(budget=24, sink_blocks=1, dense_layers=0, speculate=False)
    store = cache.store
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        cache.reset_counters()
        q, k, v, k_pre = step_tokens(cache, 1, g)
        for layer in range(2):
            got = cache.attend(layer, q, k, v, k_pre)
            want = reference.attend(layer, q, k, v, k_pre)
            assert (got - want).abs().max().item() < 2e-4, (step, layer)
        for c in (cache, reference):
            c.commit(1)
        stats = cache.decode_stats(1)
        if step == 0:  # the cache holds one layer: layer 1's blocks pushed layer 0's out
            assert stats["kv_read_bytes_per_token"]["ram"] > 0
        assert stats["kv_read_bytes_per_token"]["ram"] + stats["kv_read_bytes_per_token"]["device"] > 0
    assert stats["filled_rows"] > 0  # the filler copied missed rows to the device cache
    # the tables agree with the store's own placement
    slots = {i: s for i in range(store.slot_table.shape[0]) if (s := store._dev.get(i)) is not None}
    assert {i: int(store.slot_table[i]) for i in slots} == slots
    assert int((store.slot_table >= 0).sum()) == len(slots)


def test_rows_on_disk_are_brought_to_the_device_cache_before_a_step_reads_them(tmp_path):
    row = BlockCodec(4, 4, 16).row_bytes
    one_layer = 2 * (512 // 4) * row
    cache = cuda_cache(tmp_path / "a", device_cache_bytes=one_layer, ram_bytes=one_layer)
    reference = reference_cache(tmp_path / "b")
    fill([cache, reference], 500)  # 124 blocks a layer and head: more than RAM holds
    assert cache.store.has_disk_rows
    g = torch.Generator().manual_seed(4)
    q, k, v, k_pre = step_tokens(cache, 1, g)
    cache.reset_counters()
    for layer in range(2):  # budget all: every block, some of them on disk
        got, want = cache.attend(layer, q, k, v, k_pre), reference.attend(layer, q, k, v, k_pre)
        assert (got - want).abs().max().item() < 2e-4
    assert cache.store.stats()["bytes_read"]["disk"] > 0


def test_the_gpu_check_refuses_without_a_gpu_and_dry_runs_on_the_cpu(tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    runner = CliRunner()
    if not torch.cuda.is_available():
        refused = runner.invoke(app, ["bench", "gpu", "--report", str(tmp_path / "r.md")])
        assert refused.exit_code == 2 and "no CUDA GPU" in refused.stderr
        assert not (tmp_path / "r.md").exists()
    from edgekv import bench_gpu

    rows = bench_gpu.run_gpu_check(tmp_path / "dry.md", dry_run=True, decode_budget_s=3600)
    report = (tmp_path / "dry.md").read_text()
    assert "## End-to-end decode" in report and "a dry run" in report
    assert len(rows) == 6 and all(r["decode_tok_s"] > 0 for r in rows)
    sparse = [r for r in rows if "2048" in r["label"] and r["context"] == 1024]
    assert sparse and sparse[0]["kv_bytes"]["ram"] > 0  # the tiers hold the compressed KV
