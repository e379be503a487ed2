"""The CPU decode backend: compiled (numba) selection and attention, rows read where they lie.

A decode step of one layer, as calls::

    select    NumbaBlockSelector / NumbaMassSelector   score the 4-bit key copies and pick
                                                       the blocks: one compiled call, the
                                                       exact tail read in place
    attend    store.cached_rows(row ids)               the device cache (RAM here) and the
                                                       slots of the rows, under the store's lock
              NumbaSparseAttention(...)                dequantize in registers, rotate keys
                                                       from a table made once, attend the
                                                       rows and the exact sink + tail (read in
                                                       place), turn the output back to the
                                                       model's basis; one compiled call
              (recompute.rows(row ids) first when some row is not cached, or
              is a recompute block's: `edgekv.recompute`)

Everything else — other scorers' selection, 16-bit rows — is the reference backend's
(`ReferenceBackend`, which this extends). Prefetching runs inline while every row is in
RAM (a background thread's torch copies would start a second OpenMP thread team: on the
CPU that slowed later decode steps by half), on one worker thread when rows come from
disk. Timings are host clocks.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..kernels import compress_blocks
from ..kernels.block_score import key_copy, top_blocks
from ..kernels.block_score_numba import NumbaBlockSelector, NumbaMassSelector
from ..kernels.sparse_attention_numba import NumbaSparseAttention
from ..kvstate import ExactKV, KVLayout
from ..recompute import Recompute
from ..selection import BlockSummaries, key_copy_codec
from ..tiers import TierStore
from .reference import ReferenceBackend


def _slot_grid(slots: torch.Tensor, valid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Slots [n] of the selected rows as the kernel's [Hkv, k] grid; with a mask of the real
    entries (a shared budget), the others read slot 0 and are never attended."""
    if valid is None:
        return slots.view(shape)
    return slots.new_zeros(shape).index_put_((valid,), slots)


class CpuBackend(ReferenceBackend):
    """Decode steps of one `TieredKVCache` on the CPU (see the module doc)."""

    name = "numba"
    kernels = "numba"

    def __init__(self, layout: KVLayout, store: TierStore, summaries: BlockSummaries, exact: ExactKV,
                 recompute: Recompute):
        super().__init__(layout, store, summaries, exact, recompute)
        codec, scorer = layout.codec, summaries.scorer
        key_codec = key_copy_codec(codec)
        self.key_codec = key_codec if scorer.key_copies and key_codec.head_dim % 2 == 0 else None
        self.selector = None
        if self.key_codec is not None:
            self.selector = (NumbaMassSelector if scorer.mass else NumbaBlockSelector)(self.key_codec)
        d = codec.head_dim
        self.attention = None
        if codec.bits < 16 and d % codec.codes_per_byte == 0 and d % 2 == 0:
            self.attention = NumbaSparseAttention(codec, layout.rope_inv_freq, layout.max_blocks,
                                                  layout.value_basis)  # its outputs: in the model's basis
        self._disk_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekv-prefetch")

    def pick(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                adaptive: bool) -> torch.Tensor:
        if self.selector is None:
            return super().pick(layer, q, num_blocks, k, sink_blocks, adaptive)
        keys = self.exact.buffers[layer][0]  # the exact buffer, read in place: tail from sink_len on
        return self.selector(q, self.summaries.layers[layer], num_blocks, k, sink_blocks, keys,
                             self.exact.tail_lens[layer], adaptive, tail_start=self.exact.sink_len)

    def _prefetch(self, row_ids: torch.Tensor) -> None:
        if self.store.has_disk_rows:
            self._disk_reader.submit(self.store.prefetch, row_ids)
        else:
            self.store.prefetch(row_ids)

    def attend(self, layer: int, q: torch.Tensor, block_ids: torch.Tensor | None, num_blocks: int) -> torch.Tensor:
        if self.attention is None:
            return super().attend(layer, q, block_ids, num_blocks)
        t0 = time.perf_counter()
        if block_ids is None:
            self.prefetch_next_layer(layer, num_blocks)
            block_ids = self.every_block(num_blocks)
        ids, valid, counts = self.valid_row_ids(layer, block_ids)
        keys, _, values = self.exact.buffers[layer]  # sink + tail: one exact segment, read in place
        exact_len = self.exact.sink_len + self.exact.tail_lens[layer]
        with self.store.cached_rows(ids) as cached:
            if cached is not None:
                pool, slots = cached
                t1 = time.perf_counter()
                out = self.attention(q, pool, _slot_grid(slots, valid, block_ids.shape), block_ids,
                                     keys[:, :0], values[:, :0], keys, values, exact_len, counts)
        if cached is None:
            rows = self.recompute.rows(ids)
            t1 = time.perf_counter()
            slots = _slot_grid(torch.arange(rows.shape[0]), valid, block_ids.shape)
            out = self.attention(q, rows, slots, block_ids, keys[:, :0], values[:, :0], keys, values,
                                 exact_len, counts)
        seconds = self.counters.seconds
        seconds["fetch"] += t1 - t0
        seconds["attend"] += time.perf_counter() - t1
        return out

    def warm_up(self) -> None:
        """Run the compiled kernels once on a tiny input shaped like the engine's, so that
        numba compiles them (or loads them from its disk cache) now, not in the first step."""
        lay = self.layout
        hkv, d = lay.num_kv_heads, lay.head_dim
        q = torch.zeros(hkv, d)
        top_blocks(torch.zeros(hkv, 2), 1, 1, backend="numba")  # other scorers' selection
        if self.selector is not None:
            summaries = torch.zeros(hkv, 3, self.key_codec.row_bytes, dtype=torch.uint8)
            tail = torch.zeros(hkv, 3, d)
            for adaptive in (False, True) if self.selector.by_mass else (False,):
                self.selector(q, key_copy(summaries, self.key_codec), 2, 1, 1, tail, 2, adaptive, tail_start=1)
        if self.attention is not None:
            k = torch.zeros(hkv, 2 * lay.block_size, d)
            pool = compress_blocks(k, k, lay.codec, backend="torch").reshape(-1, lay.codec.row_bytes)
            ids = torch.zeros(hkv, 2, dtype=torch.int64)
            exact = torch.zeros(hkv, 3, d)
            self.attention(q, pool, torch.arange(2 * hkv).view(hkv, 2), ids, exact, exact, exact, exact,
                           num_valid=torch.ones(hkv, dtype=torch.int64))

    def close(self) -> None:
        self._disk_reader.shutdown(wait=True, cancel_futures=True)
