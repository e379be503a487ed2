"""The CUDA decode backend: Triton kernels, placement read on the device, copies on a side stream.

A decode step of one layer, as calls; none of them waits for the GPU (no host
synchronization) unless some row's home is the disk:

    select    summaries.scores(q)                    the 4-bit key copies scored by Triton
                                                     (other scorers: torch ops on the device)
              top_blocks_torch / adaptive_top_blocks_padded
                                                     block ids [Hkv, k] on the device; a shared
                                                     budget padded with -1 to a width the shapes fix
    attend    slot_table[row ids], ram_table[row ids]
                                                     where each row is: a device-cache slot, else
                                                     its RAM slot (two gathers on the device)
              pooled_decode_attention (Triton)       each row read where it lies: the device cache,
                                                     or the pinned RAM home in place over the bus;
                                                     the exact sink + tail as one segment
              rotate(out, basis, inverse)            back to the model's basis (one matmul)
    counters  blocks selected / needed / hit, rows read per tier: device tensors, read once
              per `stats` (once per generate)
    timings   CUDA events around select, fetch (placement gathers) and attend, folded at
              `stats`

Filling the device cache is off the step's path (`CacheFiller`): the row ids a step read,
and those speculation asked for, cross to pinned host memory without a wait (one
non-blocking copy and an event each), and a worker thread — it, not the decode thread,
waits on those events — reserves device-cache slots for the rows not there
(`TierStore.reserve`: least recently used copies evicted, their slot_table entries set to
-1 on the compute stream, bytes gathered on the host), copies them on a copy stream that
first waits for an event recorded after the eviction (so no kernel can still read an
evicted slot's old bytes through the table), and publishes them once the copy is done
(`TierStore.publish`: their slot_table entries, on the compute stream). The compute
stream never waits for a copy: a row not yet published is read from RAM.

Rows whose home is the disk: a step that may need one (`TierStore.has_disk_rows`) checks
with one host synchronization per layer and brings the ones it needs to the device cache
through `TierStore.get` before attending.

Recompute blocks (`edgekv.recompute`; `RecomputeLane`): their activation rows are read in
place in pinned RAM (the gather kernel) and turned into K/V rows — the layer's k/v
projections, then the row codec — on a recompute stream, into scratch slots of the device
cache held apart for them (two halves: even and odd layers); the attention kernel reads
them there like cached rows. The compute stream waits for that work through an event,
and a half is written again only after an event recorded behind the last kernel that
read it. With budget "all" the recompute blocks are known on the host, and layer l+1's
are launched as soon as layer l's attention is queued: their activations cross the link
and the GEMM runs while layer l's kernel reads its K/V misses over the same link. Under a
sparse budget a layer's recompute blocks are the heads' selections: one host
synchronization per layer finds them (only when the cache has recompute blocks).

On a CPU (Triton's interpreter, for tests) the same code runs with host clocks for events
and the filler working inline at the end of each step: there are no streams to order
concurrent work on one memory.

What still stops capturing a step in a CUDA graph: the number of selected blocks and the
exact tail's length change from step to step (kernel shapes and grids), the budget
arithmetic runs on the host, and the filler's table writes land on the compute stream
between steps.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import torch

from ..kernels.block_score import adaptive_top_blocks_padded, top_blocks_torch
from ..kernels.sparse_attention import pooled_decode_attention
from ..kvstate import ExactKV, KVLayout
from ..recompute import Recompute
from ..rotation import rotate
from ..selection import BlockSummaries, SelectionCounters
from ..tiers import TierStore
from .reference import store_traffic

_SELECTED, _NEEDED, _HIT, _READ_DEVICE, _READ_RAM = range(5)  # slots of the device counters


class _Clock:
    """Marks on the device's timeline: CUDA events (recorded on the current stream, read
    only when folded), or host clocks on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []
        self.seconds = dict.fromkeys(("speculate", "select", "fetch", "attend"), 0.0)

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span(self, key: str, start: object, end: object) -> None:
        self.spans.append((key, start, end))
        if len(self.spans) >= 4096:  # fold the oldest half: long done by now
            self.fold(len(self.spans) // 2)

    def fold(self, count: int | None = None) -> dict[str, float]:
        """Add the first `count` spans (default: all; waits for the last) to `seconds`."""
        done, self.spans = self.spans[:count], self.spans[len(self.spans[:count]):]
        for key, start, end in done:
            if self.cuda:
                end.synchronize()
                self.seconds[key] += start.elapsed_time(end) / 1e3
            else:
                self.seconds[key] += end - start
        return self.seconds

    def reset(self) -> None:
        self.spans.clear()
        self.seconds = dict.fromkeys(self.seconds, 0.0)


class CacheFiller:
    """Brings rows a decode step read (or will read) into the device cache, off its path
    (see the module doc). `request(row_ids)`: int64 ids on the device (negative entries
    ignored) or on the host."""

    def __init__(self, store: TierStore, device: torch.device):
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        self.filled_rows = 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.requests: queue.Queue = queue.Queue()
            self.worker = threading.Thread(target=self._run, name="edgekv-cache-filler", daemon=True)
            self.worker.start()

    def request(self, row_ids: torch.Tensor) -> None:
        if not self.cuda:
            self._fill(row_ids.cpu())
            return
        if row_ids.is_cuda:
            host = torch.empty(row_ids.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(row_ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self.requests.put((host, ready))
        else:
            self.requests.put((row_ids, None))

    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        while True:
            batch = [self.requests.get()]
            while not self.requests.empty():  # a worker behind merges what waits: hints, not orders
                batch.append(self.requests.get_nowait())
            if any(item is None for item in batch):
                return
            for _, ready in batch:
                if ready is not None:
                    ready.synchronize()
            try:
                self._fill(torch.cat([ids.reshape(-1) for ids, _ in batch]))
            except (ValueError, KeyError):  # the store closed, or rows freed meanwhile: hints lost
                continue

    def _fill(self, row_ids: torch.Tensor) -> None:
        ids = torch.unique(row_ids[row_ids >= 0])
        if not len(ids):
            return
        known = torch.tensor([int(i) in self.store for i in ids.tolist()], dtype=torch.bool)
        ids = ids[known]
        self.store.touch(ids)
        reservation = self.store.reserve(ids)
        if reservation is None:
            return
        try:
            if self.cuda:
                evicted = torch.cuda.Event()
                evicted.record()  # after the evictions' slot_table writes on the compute stream
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(evicted)
                    self.store.fill(reservation)
                    copied = torch.cuda.Event()
                    copied.record(self.copy_stream)
                copied.synchronize()
            else:
                self.store.fill(reservation)
        except BaseException:
            self.store.abandon(reservation)
            raise
        self.store.publish(reservation)
        self.filled_rows += len(reservation.ids)

    def close(self) -> None:
        if self.cuda and self.worker.is_alive():
            self.requests.put(None)
            self.worker.join()


class RecomputeLane:
    """The K/V rows of recompute blocks, made on the device into scratch slots of the
    device cache, on a recompute stream (see the module doc). Scratch: the store's
    `scratch_slots` viewed as [2, num_kv_heads, layout.num_recomputed], half layer % 2
    for a layer's rows; `position[half]`: int64 [max_blocks], the column of each block
    recomputed there (-1: none). Does nothing when the cache recomputes nothing."""

    def __init__(self, recompute: Recompute, store: TierStore, layout: KVLayout):
        self.recompute, self.store, self.layout = recompute, store, layout
        self.active = recompute.active
        self.cuda = layout.device.type == "cuda"
        self.stream = torch.cuda.Stream(layout.device) if self.cuda and self.active else None
        self.scratch = store.scratch_slots.view(2, layout.num_kv_heads, -1) if self.active else None
        self.position = torch.full((2, layout.max_blocks), -1, dtype=torch.int64, device=layout.device)
        self.ready: list[tuple[int, set, object] | None] = [None, None]  # per half: layer, blocks, done event
        self.read: list[object | None] = [None, None]  # per half: event behind its last reader

    @staticmethod
    def scratch_rows(layout: KVLayout) -> int:
        """Scratch slots the lane needs: two layers' recompute rows."""
        return 2 * layout.num_kv_heads * layout.num_recomputed

    def launch(self, layer: int, blocks: list[int]) -> None:
        """Recompute `blocks` (ascending, host) of `layer` into its scratch half, on the
        recompute stream (inline without CUDA)."""
        half, lay = layer % 2, self.layout
        ids = torch.tensor(blocks, dtype=torch.int64)
        done = None
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            if self.cuda and self.read[half] is not None:
                self.stream.wait_event(self.read[half])  # the last kernel reading this half is done
            rows = self.recompute.key_value_rows(layer, ids)  # [Hkv, m, row_bytes]
            slots = self.scratch[half, :, :len(blocks)].reshape(-1)
            self.store.device_rows.index_copy_(0, slots, rows.reshape(-1, lay.codec.row_bytes))
            position = self.position[half]
            position.fill_(-1)
            position[ids.to(lay.device)] = torch.arange(len(blocks), device=lay.device)
            if self.cuda:
                done = torch.cuda.Event()
                done.record(self.stream)
        self.ready[half] = (layer, set(blocks), done)

    def place(self, layer: int, block_ids: torch.Tensor, again: torch.Tensor, slots: torch.Tensor,
              every_below: int | None) -> torch.Tensor:
        """`slots` [Hkv, k] with the entries `again` marks (recompute blocks attended)
        pointing at their rows in the scratch half of `layer`, once those are made (the
        current stream waits for them). every_below: the step attends every block below
        it (the recompute blocks are known on the host), or None: they are found from
        `again` (a host synchronization)."""
        if not self.active:
            return slots
        if every_below is None:
            blocks = torch.unique(block_ids[again]).tolist()
        else:
            blocks = self.recompute.blocks_below(every_below)
        if not blocks:
            return slots
        half = layer % 2
        ready = self.ready[half]
        if ready is None or ready[0] != layer or not set(blocks) <= ready[1]:
            self.launch(layer, blocks)
        if self.cuda:
            torch.cuda.current_stream(self.layout.device).wait_event(self.ready[half][2])
        column = self.position[half][block_ids.clamp(min=0)]  # [Hkv, k]
        mine = self.scratch[half].gather(1, column.clamp(min=0))
        return torch.where(again, mine, slots)

    def release(self, layer: int) -> None:
        """The reads of layer's scratch half are queued: a later write there waits for them."""
        if self.active and self.cuda:
            event = torch.cuda.Event()
            event.record()
            self.read[layer % 2] = event

    def ahead(self, layer: int, num_blocks: int) -> None:
        """Budget "all": start layer's recompute blocks below num_blocks now."""
        if self.active and layer < self.layout.num_layers:
            blocks = self.recompute.blocks_below(num_blocks)
            if blocks:
                self.launch(layer, blocks)

    def end_step(self) -> None:
        """Rows launched ahead belong to one step (a truncate may change the blocks after it)."""
        self.ready = [None, None]


class CudaBackend:
    """Decode steps of one `TieredKVCache` with Triton kernels and device-side placement
    (see the module doc)."""

    name = "triton"
    kernels = "triton"

    @classmethod
    def store_options(cls, layout: KVLayout) -> dict:
        """A pinned RAM home (the GPU reads misses there in place), device-side tables and
        the recompute lane's scratch slots."""
        return {"pin_ram": True, "id_space": layout.num_rows, "scratch_rows": RecomputeLane.scratch_rows(layout)}

    def __init__(self, layout: KVLayout, store: TierStore, summaries: BlockSummaries, exact: ExactKV,
                 recompute: Recompute):
        self.layout, self.store, self.summaries, self.exact = layout, store, summaries, exact
        self.recompute = recompute
        self.lane = RecomputeLane(recompute, store, layout)
        self.counters = SelectionCounters()  # pending requests and candidate counts (host side)
        self.clock = _Clock(layout.device)
        self.counts = torch.zeros(5, dtype=torch.int64, device=layout.device)
        self.filler = CacheFiller(store, layout.device)
        self._reads: list[torch.Tensor] = []  # this step's row ids, for the filler
        self._heads = torch.arange(layout.num_kv_heads, device=layout.device)

    # ---- selection -------------------------------------------------------------------
    def pick(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                adaptive: bool) -> torch.Tensor:
        scores = self.summaries.scores(layer, q, num_blocks, self.exact.tail(layer)[0])  # [Hkv, nb] fp32
        if adaptive:
            return adaptive_top_blocks_padded(scores, k, sink_blocks)
        return top_blocks_torch(scores, k, sink_blocks)

    def select(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
               adaptive: bool) -> torch.Tensor:
        start = self.clock.mark()
        ids = self.pick(layer, q, num_blocks, k, sink_blocks, adaptive)
        valid = ids >= 0
        self.counts[_SELECTED] += valid.sum()
        self.counters.candidate_blocks += self.layout.num_kv_heads * num_blocks
        requested = self.counters.pending.pop(layer, None)
        if requested is not None:  # how much of it speculation had asked for, counted on the device
            asked = torch.zeros(ids.shape[0], num_blocks + 1, dtype=torch.bool, device=ids.device)
            asked.scatter_(1, torch.where(requested >= 0, requested, num_blocks), True)
            hit = asked.gather(1, torch.where(valid, ids, num_blocks)) & valid
            self.counts[_NEEDED] += valid.sum()
            self.counts[_HIT] += hit.sum()
        self.clock.span("select", start, self.clock.mark())
        return ids

    def speculate(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                  adaptive: bool) -> None:
        start = self.clock.mark()
        ids = self.pick(layer, q, num_blocks, k, sink_blocks, adaptive)
        self.counters.pending[layer] = ids
        self.filler.request(self._row_ids(layer, ids[:, 1:]))  # block 0 is the exact sink
        self.clock.span("speculate", start, self.clock.mark())

    # ---- attention -------------------------------------------------------------------
    def _row_ids(self, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Row ids [Hkv, k] of block_ids [Hkv, k] on the device; -1 where a block id is -1."""
        rows = (self._heads[:, None] * self.layout.max_blocks + self.layout.first_row(layer)) + block_ids
        return torch.where(block_ids >= 0, rows, -1)

    def _placement(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Each row's slot code [Hkv, k]: its device-cache slot, or -1 - its RAM slot."""
        safe = rows.clamp(min=0)
        on_device = self.store.slot_table[safe]
        in_ram = self.store.ram_table[safe]
        if self.store.has_disk_rows:
            from_disk = valid & (on_device < 0) & (in_ram < 0)
            if bool(from_disk.any()):  # the one host synchronization of a step that reads the disk
                self.store.get(rows[from_disk])  # cached on the device now (slot_table updated)
                on_device = self.store.slot_table[safe]
        return torch.where(on_device >= 0, on_device, -1 - in_ram)

    def attend(self, layer: int, q: torch.Tensor, block_ids: torch.Tensor | None, num_blocks: int) -> torch.Tensor:
        lay = self.layout
        start = self.clock.mark()
        every = block_ids is None  # then the recompute blocks attended are known on the host
        if every:
            block_ids = torch.arange(1, max(num_blocks, 1), device=lay.device).expand(lay.num_kv_heads, -1)
        valid = block_ids >= 0
        rows = self._row_ids(layer, block_ids)
        again = self.recompute.recomputed(block_ids)  # recompute blocks: rows made on the device
        stored = valid & ~again
        slots = self._placement(rows, stored)
        from_device = (stored & (slots >= 0)).sum()
        self.counts[_READ_DEVICE] += from_device
        self.counts[_READ_RAM] += stored.sum() - from_device
        self._reads.append(rows)
        slots = self.lane.place(layer, block_ids, again, slots, num_blocks if every else None)
        fetched = self.clock.mark()
        exact_k, exact_v = self.exact.exact(layer)
        out = pooled_decode_attention(q, self.store.device_rows, self.store.ram_rows, slots, lay.codec, exact_k,
                                      exact_v, num_valid=valid.sum(dim=1), block_ids=block_ids.clamp(min=0),
                                      rope_inv_freq=lay.rope_inv_freq, backend="triton")
        self.lane.release(layer)
        if every:
            self.lane.ahead(layer + 1, num_blocks)
        out = rotate(out, lay.value_basis, inverse=True)
        self.clock.span("fetch", start, fetched)
        self.clock.span("attend", fetched, self.clock.mark())
        return out

    # ---- bookkeeping -----------------------------------------------------------------
    def blocks_added(self, row_ids: torch.Tensor) -> None:
        """The newest blocks are among the next steps' likeliest reads: to the device cache."""
        if self.store.device_room() >= len(row_ids):
            self.filler.request(row_ids)

    def end_step(self) -> None:
        """Hand the step's reads to the filler (LRU order, and the rows that missed)."""
        if self._reads:
            self.filler.request(torch.cat([r.reshape(-1) for r in self._reads]))
            self._reads = []
        self.lane.end_step()

    def warm_up(self) -> None:
        """Nothing here: Triton compiles each kernel at its first launch (on a GPU, a few
        seconds in the first step; under the interpreter, nothing)."""

    def stats(self, decode_steps: int) -> dict:
        """Traffic per tier and selection figures per decode step; reads the device counters
        and timing events once."""
        if not decode_steps:
            return {}
        c = self.counters
        c.seconds = dict(self.clock.fold())
        selected, needed, hit, read_device, read_ram = self.counts.tolist()
        c.selected_blocks, c.needed_blocks, c.hit_blocks = selected, needed, hit
        c.miss_bytes = (needed - hit) * self.store.row_bytes
        rb = self.store.row_bytes
        in_place = {"device": (read_device * rb, read_device, 0), "ram": (read_ram * rb, 0, read_ram)}
        out = store_traffic(self.store.stats(), decode_steps, in_place) | c.as_stats(decode_steps)
        out["filled_rows"] = self.filler.filled_rows
        return out

    def reset_counters(self) -> None:
        self.store.reset_counters()
        self.counters.reset()
        self.clock.reset()
        self.counts.zero_()

    def close(self) -> None:
        self.filler.close()
