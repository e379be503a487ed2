"""The reference decode backend: the torch twins of `edgekv.kernels`, one call each.

A decode step of one layer, as calls::

    select    summaries.scores(q)            score every block's summary      (BlockSummaries)
              select_blocks(scores, k, ...)  sinks + top-k (or a shared budget)
    attend    recompute.rows(row ids)        the selected rows, gathered      (TierStore; recompute
                                             blocks' rows made from their inputs, `edgekv.recompute`)
              sparse_decode_attention(...)   dequantize, rotate keys, attend  (torch twin)
              rotate(out, basis, inverse)    back to the model's basis

It runs on any device and is the specification the other backends are tested against;
`CpuBackend` is this with compiled kernels where they exist. Timings are host clocks.
"""

from __future__ import annotations

import time

import torch

from ..kernels import sparse_decode_attention
from ..kvstate import ExactKV, KVLayout
from ..recompute import Recompute
from ..rotation import rotate
from ..selection import BlockSummaries, SelectionCounters, select_blocks
from ..tiers import TierStore


class ReferenceBackend:
    """Decode steps of one `TieredKVCache` with the per-call torch twins (see the module doc)."""

    name = "torch"
    kernels = "torch"

    @classmethod
    def store_options(cls, layout: KVLayout) -> dict:
        """Extra `TierStore` arguments this backend reads the store with."""
        return {}

    def __init__(self, layout: KVLayout, store: TierStore, summaries: BlockSummaries, exact: ExactKV,
                 recompute: Recompute):
        self.layout, self.store, self.summaries, self.exact = layout, store, summaries, exact
        self.recompute = recompute
        self.counters = SelectionCounters()
        layer_rows = layout.num_kv_heads * layout.max_blocks
        # budget "all": copy layer l+1's rows to the device cache while layer l attends,
        # when the cache holds two layers at once (else it would evict layer l's)
        self.prefetch_ahead = store.stats()["budgets"]["device"] >= 2 * layer_rows * store.row_bytes

    # ---- selection -------------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
               adaptive: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        ids = self.pick(layer, q, num_blocks, k, sink_blocks, adaptive)
        self._count(layer, ids, num_blocks, adaptive)
        self.counters.seconds["select"] += time.perf_counter() - t0
        return ids

    def pick(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                adaptive: bool) -> torch.Tensor:
        """Block ids [Hkv, k] (adaptive: [Hkv, k_max], -1 padded) of q [Hq, D]."""
        tail_k = self.exact.tail(layer)[0]
        scores = self.summaries.scores(layer, q, num_blocks, tail_k)
        return select_blocks(scores, k, sink_blocks, adaptive=adaptive, backend=self.kernels)

    def _count(self, layer: int, ids: torch.Tensor, num_blocks: int, adaptive: bool) -> None:
        c = self.counters
        c.record(layer, ids, self.store.row_bytes)
        c.selected_blocks += int((ids >= 0).sum()) if adaptive else ids.numel()
        c.candidate_blocks += self.layout.num_kv_heads * num_blocks

    def speculate(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                  adaptive: bool) -> None:
        t0 = time.perf_counter()
        ids = self.pick(layer, q, num_blocks, k, sink_blocks, adaptive)
        self.counters.pending[layer] = ids
        self._prefetch(self.recompute.stored_ids(self.valid_row_ids(layer, ids[:, 1:])[0]))  # block 0: the sink
        self.counters.seconds["speculate"] += time.perf_counter() - t0

    def _prefetch(self, row_ids: torch.Tensor) -> None:
        self.store.prefetch(row_ids)

    # ---- attention -------------------------------------------------------------------
    def valid_row_ids(self, layer: int, block_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Host row ids of block_ids [Hkv, k] (head-major, -1 entries left out) and, when some
        are -1, the mask of real entries and their count per head (else None, None)."""
        ids = self.layout.row_ids(layer, block_ids.cpu())
        if not bool((block_ids < 0).any()):
            return ids, None, None
        valid = block_ids >= 0
        return ids[valid.reshape(-1).cpu()], valid, valid.sum(dim=1)

    def every_block(self, num_blocks: int) -> torch.Tensor:
        """Blocks 1 .. num_blocks-1 of every KV head: [Hkv, num_blocks - 1]."""
        return torch.arange(1, max(num_blocks, 1), device=self.layout.device).expand(self.layout.num_kv_heads, -1)

    def prefetch_next_layer(self, layer: int, num_blocks: int) -> None:
        """Budget "all": layer+1's rows to the device cache while this layer computes."""
        if self.prefetch_ahead and num_blocks > 1:
            blocks = self.recompute.stored(torch.arange(1, num_blocks))
            self._prefetch(self.layout.row_ids((layer + 1) % self.layout.num_layers, blocks))

    def attend(self, layer: int, q: torch.Tensor, block_ids: torch.Tensor | None, num_blocks: int) -> torch.Tensor:
        t0 = time.perf_counter()
        if block_ids is None:
            self.prefetch_next_layer(layer, num_blocks)
            block_ids = self.every_block(num_blocks)
        ids, valid, counts = self.valid_row_ids(layer, block_ids)
        lay = self.layout
        rows = self.recompute.rows(ids)
        if valid is None:
            rows = rows.view(*block_ids.shape, lay.codec.row_bytes)
        else:  # each head's blocks first in its row: the kernel reads counts[h] of them
            rows = rows.new_zeros(*block_ids.shape, lay.codec.row_bytes).index_put_((valid,), rows)
            block_ids = block_ids.clamp(min=0)
        t1 = time.perf_counter()
        exact_k, exact_v = self.exact.exact(layer)
        out = sparse_decode_attention(q, rows, lay.codec, exact_k, exact_v, num_valid=counts, block_ids=block_ids,
                                      rope_inv_freq=lay.rope_inv_freq, backend=self.kernels)
        out = rotate(out, lay.value_basis, inverse=True)
        seconds = self.counters.seconds
        seconds["fetch"] += t1 - t0
        seconds["attend"] += time.perf_counter() - t1
        return out

    # ---- bookkeeping -----------------------------------------------------------------
    def blocks_added(self, row_ids: torch.Tensor) -> None:
        """The newest blocks are among the next steps' likeliest reads: copy them to the
        device cache now, where that evicts nothing (else a step's first read waits)."""
        if self.store.device_room() >= len(row_ids):
            self._prefetch(row_ids)

    def end_step(self) -> None:
        """Nothing is deferred to the end of a step."""

    def warm_up(self) -> None:
        """Nothing to compile."""

    def stats(self, decode_steps: int) -> dict:
        """Traffic per tier (the store's counters) and selection figures, per decode step."""
        return store_traffic(self.store.stats(), decode_steps) | self.counters.as_stats(decode_steps)

    def reset_counters(self) -> None:
        self.store.reset_counters()
        self.counters.reset()

    def close(self) -> None:
        """Nothing of its own to release."""


def store_traffic(t: dict, decode_steps: int, extra_reads: dict | None = None) -> dict:
    """The stats keys of a store's counters `t` over `decode_steps` steps: bytes each tier
    delivered per step (prefetch copies included) and the bandwidth it achieved;
    fetch_bytes: bytes of the rows the steps read, wherever they were (hits and misses,
    not prefetch copies); `extra_reads` {tier: (bytes, hits, misses)} adds reads a backend
    did without the store (the CUDA backend's in-place reads)."""
    if not decode_steps:
        return {}
    read, hits, misses = dict(t["bytes_read"]), t["device_hits"], t["device_misses"]
    for tier, (nbytes, h, m) in (extra_reads or {}).items():
        read[tier] += nbytes
        hits, misses = hits + h, misses + m
    return {
        "kv_read_bytes_per_token": {tier: round(b / decode_steps) for tier, b in read.items()},
        "fetch_bytes": round((hits + misses) * t["row_bytes"] / decode_steps),
        "kv_gbps": {tier: round(t["gbps"][tier], 3) for tier in ("device", "ram", "disk")},
        "kv_disk_write_bytes": t["bytes_written"]["disk"],
        # rows decode needed that were already on the device (cached or prefetched a layer ahead)
        "device_hit_rate": round(hits / max(hits + misses, 1), 4),
        "prefetched_rows": t["prefetched_rows"],
    }
