"""The offloaded KV cache: compressed blocks in the tier store, an exact recent window.

Per layer, the sequence is laid out as

    [ block 0 | block 1 | … | block C-1 ][ exact tail: recent tokens, model dtype ]
      compressed rows in the TierStore      between recent_window and
      (one row per KV head per block)       recent_window + block_size - 1 tokens

Block 0 also stays exact on the device (the attention sink: the first tokens draw a
large share of every query's attention, so their quantization error weighs most); its
row is kept for the persistent state but attention reads the exact copy.

A token stays exact until it is `recent_window` tokens old and its whole block is; then
its keys are rotated back to position 0 (stored keys are *pre-RoPE*, see
`kernels/rope.py`: per-channel 4-bit grids fit un-rotated keys much better) and the block
is compressed (`compress_blocks`: packed rows in the `BlockCodec` layout) and
put in the store (device cache → RAM → disk). A decode step fetches a layer's rows in one
batched `get` and runs `sparse_decode_attention` over the packed rows (dequantized in
registers by the Triton kernel on CUDA, by the numba kernel on the CPU, and rotated to their
positions there) and the exact tail. Below 16 bits every value the cache holds (rows,
sink and tail) is in the Hadamard-rotated basis of `edgekv.rotation`, and each attention
output is rotated back once. With a budget below "all", a decode step fetches and
attends only the blocks `edgekv.selection` picks from per-block summaries (made here
when a block is compressed); `speculate` lets the layer loop request a layer's blocks
one layer early. On the CPU the step's selection and attention run through
`kernels.compiled_decode`, kernels with their constants made once for this cache. A prefill chunk decodes and rotates the rows into a
reusable scratch buffer next to the tail and attends densely. Budget "all" selects every block. Row ids:

    row(layer, kv_head, block) = (layer * num_kv_heads + kv_head) * max_blocks + block
"""

from __future__ import annotations

import time

import torch

from .attention import dense_attention
from .errors import BudgetError
from .kernels import compiled_decode, compress_blocks, sparse_decode_attention, warm_up
from .kernels.rope import rotate_keys
from .quant import BlockCodec
from .rotation import rotate, value_rotation
from .selection import SCORERS, BlockSummaries, SelectionCounters, budget_blocks, key_copy_codec, select_blocks
from .sizes import format_size
from .tiers import TierStore, check_budgets


def _slot_grid(slots: torch.Tensor, valid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Slots [n] of the selected rows as the kernel's [Hkv, k] grid; with a mask of the real
    entries (adaptive selection), the others read slot 0 and are never attended."""
    if valid is None:
        return slots.view(shape)
    return slots.new_zeros(shape).index_put_((valid,), slots)


class TieredKVCache:
    """The `KVCache` protocol of `model.py`, backed by a `TierStore` of compressed blocks."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_context: int,
                 block_size: int, kv_bits: int, recent_window: int, device_cache_bytes: int,
                 ram_bytes: int, disk_dir: str | None, disk_bytes: int, dtype: torch.dtype,
                 device: torch.device, rope_inv_freq: torch.Tensor, scorer: str = "keys4",
                 kernels: str = "auto"):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.recent_window = block_size, recent_window
        self.dtype, self.device, self.kernels = dtype, device, kernels
        self.rope_inv_freq = rope_inv_freq.to(device=device, dtype=torch.float32)  # [head_dim // 2]
        self.codec = BlockCodec(bits=kv_bits, block_size=block_size, head_dim=head_dim)
        self.value_basis = value_rotation(head_dim, kv_bits, device)  # every value held is rotated by it
        self.max_blocks = -(-max_context // block_size)
        self._head_rows = torch.arange(num_kv_heads)[:, None] * self.max_blocks  # [Hkv, 1]: row_ids' head offsets
        layer_rows = num_kv_heads * self.max_blocks
        check_budgets(self.codec.row_bytes, min_ram_rows=layer_rows, device_cache_bytes=device_cache_bytes,
                      ram_bytes=ram_bytes, disk_bytes=disk_bytes, has_disk=disk_dir is not None)
        if device_cache_bytes < layer_rows * self.codec.row_bytes:
            need = layer_rows * self.codec.row_bytes
            raise BudgetError(f"device cache budget {format_size(device_cache_bytes)} is too small: one layer's "
                              f"KV blocks at full context need {format_size(need)}; raise --device-cache to at least that")
        self.store = TierStore(self.codec.row_bytes, device_cache_bytes=device_cache_bytes, ram_bytes=ram_bytes,
                               disk_dir=disk_dir, disk_bytes=disk_bytes, device=device)
        # fetch layer l+1's rows in the background while layer l computes, when the
        # device cache can hold two layers at once (else the prefetch would evict layer l)
        self.prefetch_ahead = device_cache_bytes >= 2 * layer_rows * self.codec.row_bytes
        empty = torch.empty((num_kv_heads, 0, head_dim), dtype=dtype, device=device)
        self.tail_k = [empty] * num_layers
        self.tail_v = [empty] * num_layers
        self._tail_buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # see _append_tail
        self.sink_k = [empty] * num_layers  # block 0, exact (once it is compressed)
        self.sink_v = [empty] * num_layers
        self.num_blocks = 0  # compressed blocks per layer (and KV head)
        self.length = 0
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # [Hkv, capacity, D] each
        self.summaries = BlockSummaries(SCORERS[scorer], self.codec, num_layers=num_layers,
                                        num_kv_heads=num_kv_heads, max_blocks=self.max_blocks, device=device,
                                        backend=kernels)
        key_codec = key_copy_codec(self.codec) if SCORERS[scorer].key_copies else None
        self.compiled = compiled_decode(self.codec, key_codec, self.rope_inv_freq, self.max_blocks, backend=kernels,
                                        device=device, by_mass=SCORERS[scorer].mass,
                                        value_basis=self.value_basis)  # its outputs: in the model's basis
        self.counters = SelectionCounters()
        self.configure_selection(budget="all", sink_blocks=1, dense_layers=0, speculate=False, head_budget="uniform")
        warm_up(self.compiled, self.codec, key_copy_codec(self.codec), num_heads=num_kv_heads,
                num_kv_heads=num_kv_heads)

    def configure_selection(self, *, budget: int | str, sink_blocks: int, dense_layers: int,
                            speculate: bool, head_budget: str = "uniform") -> None:
        """Set the decode-time selection (see `edgekv.selection`); takes effect at the next step.
        head_budget "adaptive" (the scorer must estimate attention mass): a selection's rows
        hold each KV head's blocks, then -1."""
        if head_budget == "adaptive" and not self.summaries.scorer.mass:
            raise ValueError("an adaptive head budget needs a scorer of attention mass "
                             f"(got {self.summaries.scorer.name})")
        self.budget, self.sink_blocks, self.dense_layers = budget, sink_blocks, dense_layers
        self.adaptive = head_budget == "adaptive"
        self.speculating = speculate and budget != "all"  # read by the layer loop
        self.counters.pending.clear()

    def reset_counters(self) -> None:
        self.store.reset_counters()
        self.counters.reset()

    # ---- row ids ----------------------------------------------------------------------
    def row_ids(self, layer: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [num_kv_heads * n] ids, head-major, of `blocks`: [n] the same blocks of
        every KV head (default: all compressed), or [num_kv_heads, n] per KV head."""
        if blocks is None:
            blocks = torch.arange(self.num_blocks)
        first = layer * self.num_kv_heads * self.max_blocks  # row of (layer, head 0, block 0)
        return (self._head_rows + (blocks.cpu() + first)).reshape(-1)

    # ---- selection --------------------------------------------------------------------
    def _selection(self, layer: int, q: torch.Tensor) -> torch.Tensor | None:
        """Block ids [Hkv, k] a decode query q [Hq, D] of `layer` attends (None: every block)."""
        nb = self.num_blocks
        if self.budget == "all" or layer < self.dense_layers or nb == 0:
            return None
        tail = self.tail_k[layer].shape[1]
        k = budget_blocks(self.budget, context=nb * self.block_size + tail, tail=tail,
                          block_size=self.block_size, num_blocks=nb, sink_blocks=self.sink_blocks)
        if k >= nb:
            return None
        sinks = max(1, self.sink_blocks)
        if self.compiled.select is not None:
            buffer = self._tail_buffers[layer]  # read in place when the tail is a view of its buffer
            tail_k = buffer[0] if buffer is not None and buffer[0].data_ptr() == self.tail_k[layer].data_ptr() \
                else self.tail_k[layer]
            return self.compiled.select(q, self.summaries.layers[layer], nb, k, sinks, tail_k, tail, self.adaptive)
        return select_blocks(self.summaries.scores(layer, q, nb, self.tail_k[layer]), k, sinks,
                             adaptive=self.adaptive, backend=self.kernels)

    def speculate(self, layer: int, q: torch.Tensor) -> None:
        """Request the blocks an approximate query q [Hq, D] of `layer` selects (layer-ahead prefetch)."""
        if layer >= self.num_layers:
            return
        t0 = time.perf_counter()
        blocks = self._selection(layer, q)
        if blocks is not None:
            self.counters.pending[layer] = blocks
            self.store.prefetch(self._valid_row_ids(layer, blocks[:, 1:])[0])  # block 0 is the exact sink
        self.counters.seconds["speculate"] += time.perf_counter() - t0

    # ---- attention --------------------------------------------------------------------
    def _scratch_for(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None or self._scratch[0].shape[1] < tokens:
            capacity = max(tokens, 2 * (self._scratch[0].shape[1] if self._scratch else 0), 256)
            shape = (self.num_kv_heads, capacity, self.head_dim)
            self._scratch = (torch.empty(shape, dtype=self.dtype, device=self.device),
                             torch.empty(shape, dtype=self.dtype, device=self.device))
        return self._scratch

    def _attend_compiled(self, layer: int, q: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The compiled CPU decode attention of q [Hq, D] over blocks block_ids [Hkv, k] (-1:
        none; read in the device cache when all are cached, else fetched), the sink and
        the tail; returns the output [Hq, D] (in the model's basis: the kernel undoes the
        value rotation) and the time the rows were at hand."""
        ids, valid, counts = self._valid_row_ids(layer, block_ids)
        exact = (self.sink_k[layer], self.sink_v[layer], *self._tail_buffers[layer])  # the tail read in place
        tail = self.tail_k[layer].shape[1]
        with self.store.cached_rows(ids) as cached:
            if cached is not None:
                pool, slots = cached
                ready = time.perf_counter()
                return self.compiled.attend(q, pool, _slot_grid(slots, valid, block_ids.shape), block_ids, *exact,
                                            tail, counts), ready
        rows = self.store.get(ids)
        ready = time.perf_counter()
        slots = _slot_grid(torch.arange(rows.shape[0]), valid, block_ids.shape)
        return self.compiled.attend(q, rows, slots, block_ids, *exact, tail, counts), ready

    def _valid_row_ids(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                            torch.Tensor | None]:
        """Row ids of the selected blocks (head-major, -1 entries left out), and with an
        adaptive selection the mask of real entries and their count per head (else None)."""
        ids = self.row_ids(layer, block_ids)
        if not self.adaptive:
            return ids, None, None
        valid = block_ids >= 0
        return ids[valid.reshape(-1).cpu()], valid, valid.sum(dim=1)

    def layer_keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored K and V of `layer`, decoded: each [num_kv_heads, length, head_dim] (a scratch view);
        values in the stored basis (`edgekv.rotation`)."""
        compressed = self.num_blocks * self.block_size
        tail = self.tail_k[layer].shape[1]
        k_buf, v_buf = self._scratch_for(compressed + tail)
        if self.num_blocks:
            rows = self.store.get(self.row_ids(layer)).view(self.num_kv_heads, self.num_blocks, -1)
            for h in range(self.num_kv_heads):
                out = (k_buf[h, :compressed].view(self.num_blocks, self.block_size, self.head_dim),
                       v_buf[h, :compressed].view(self.num_blocks, self.block_size, self.head_dim))
                self.codec.decode(rows[h], dtype=self.dtype, out=out)
            positions = torch.arange(compressed, device=self.device)
            k_buf[:, :compressed] = rotate_keys(k_buf[:, :compressed], positions, self.rope_inv_freq)
            k_buf[:, :self.block_size] = self.sink_k[layer]
            v_buf[:, :self.block_size] = self.sink_v[layer]
        k_buf[:, compressed:compressed + tail] = self.tail_k[layer]
        v_buf[:, compressed:compressed + tail] = self.tail_v[layer]
        return k_buf[:, :compressed + tail], v_buf[:, :compressed + tail]

    def _append_tail(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [Hkv, T, D] (v in the stored basis) to layer's exact tail.

        The tail lives in a buffer with room to grow, tail_k/v[layer] being views of its
        first tokens, so a decode step writes its token instead of copying the whole tail
        (two copies of ~100 tokens per layer and step before). A tail that is not such a
        view (commit, import) moves into a new buffer; after a truncate, appends reuse the space
        of the dropped tokens."""
        tail_k, tail_v = self.tail_k[layer], self.tail_v[layer]
        n, t = tail_k.shape[1], k.shape[1]
        buf = self._tail_buffers[layer]
        if (buf is None or n + t > buf[0].shape[1] or tail_k.data_ptr() != buf[0].data_ptr()
                or tail_v.data_ptr() != buf[1].data_ptr()):
            capacity = max(2 * (n + t), self.recent_window + 2 * self.block_size)
            buf = tuple(torch.empty((self.num_kv_heads, capacity, self.head_dim), dtype=k.dtype, device=self.device)
                        for _ in range(2))
            buf[0][:, :n], buf[1][:, :n] = tail_k, tail_v
            self._tail_buffers[layer] = buf
        buf[0][:, n:n + t], buf[1][:, n:n + t] = k, v
        self.tail_k[layer], self.tail_v[layer] = buf[0][:, :n + t], buf[1][:, :n + t]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._append_tail(layer, k, rotate(v, self.value_basis))
        one_query = q.shape[1] == 1  # a decode step: the fused kernel over packed rows
        if one_query:
            t0 = time.perf_counter()
            block_ids = self._selection(layer, q[:, 0])
            if block_ids is None:  # every block
                if self.prefetch_ahead and self.num_blocks and not self.speculating:
                    self.store.prefetch(self.row_ids((layer + 1) % self.num_layers, torch.arange(1, self.num_blocks)))
                block_ids = torch.arange(self.num_blocks, device=self.device).expand(self.num_kv_heads, -1)
            else:
                self.counters.record(layer, block_ids, self.codec.row_bytes)
                self.counters.selected_blocks += int((block_ids >= 0).sum()) if self.adaptive else block_ids.numel()
                self.counters.candidate_blocks += self.num_kv_heads * self.num_blocks
            block_ids = block_ids[:, 1:]  # block 0 (always chosen, first) is the exact sink
            t1 = time.perf_counter()
            if self.compiled.attend is not None:
                out, t2 = self._attend_compiled(layer, q[:, 0], block_ids)  # rotated back in the kernel
            else:
                ids, valid, counts = self._valid_row_ids(layer, block_ids)
                rows = self.store.get(ids)
                if valid is None:
                    rows = rows.view(*block_ids.shape, self.codec.row_bytes)
                else:  # each head's blocks first in its row: the kernel reads counts[h] of them
                    rows = rows.new_zeros(*block_ids.shape, self.codec.row_bytes).index_put_((valid,), rows)
                    block_ids = block_ids.clamp(min=0)
                t2 = time.perf_counter()
                exact_k = torch.cat((self.sink_k[layer], self.tail_k[layer]), dim=1)
                exact_v = torch.cat((self.sink_v[layer], self.tail_v[layer]), dim=1)
                out = rotate(sparse_decode_attention(q[:, 0], rows, self.codec, exact_k, exact_v, num_valid=counts,
                                                     block_ids=block_ids, rope_inv_freq=self.rope_inv_freq,
                                                     backend=self.kernels), self.value_basis, inverse=True)
            seconds = self.counters.seconds
            seconds["select"] += t1 - t0
            seconds["fetch"] += t2 - t1
            seconds["attend"] += time.perf_counter() - t2
            return out[:, None]  # [Hq, 1, D]
        keys, values = self.layer_keys_values(layer)
        return rotate(dense_attention(q, keys, values, q_start=self.length), self.value_basis, inverse=True)

    def commit(self, num_tokens: int) -> None:
        """Advance the length; compress the full blocks that left the recent window."""
        self.length += num_tokens
        exact = self.length - self.num_blocks * self.block_size
        new_blocks = max(0, exact - self.recent_window) // self.block_size
        if not new_blocks:
            return
        n, B = new_blocks, self.block_size
        blocks = torch.arange(self.num_blocks, self.num_blocks + n)
        positions = torch.arange(self.num_blocks * B, (self.num_blocks + n) * B, device=self.device)
        if self.num_blocks == 0:
            self.sink_k = [t[:, :B].clone() for t in self.tail_k]
            self.sink_v = [t[:, :B].clone() for t in self.tail_v]
        # every layer's new blocks in one batch: [layers, Hkv, n*B, D] (the compression and
        # summary ops run once per commit, not once per layer: 30 layers took 35-47 ms apart)
        keys = torch.stack([t[:, : n * B] for t in self.tail_k])
        values = torch.stack([t[:, : n * B] for t in self.tail_v])
        layers = range(self.num_layers)
        self.summaries.write_layers(layers, self.num_blocks, keys)
        keys = rotate_keys(keys, positions, self.rope_inv_freq, inverse=True)
        packed = compress_blocks(keys.flatten(0, 1), values.flatten(0, 1), self.codec,
                                 backend=self.kernels)  # rows [layers*Hkv, n, row_bytes]
        new_ids = torch.cat([self.row_ids(layer, blocks) for layer in layers])
        self.store.put(new_ids, packed.rows.reshape(-1, self.codec.row_bytes))
        self.tail_k = [t[:, n * B:].clone() for t in self.tail_k]
        self.tail_v = [t[:, n * B:].clone() for t in self.tail_v]
        self.num_blocks += n
        # the newest blocks are among the next steps' likeliest reads: copy them to the device
        # cache now, in the background, where that evicts nothing (else a step's first read waits)
        if self.store.device_room() >= len(new_ids):
            self.store.prefetch(new_ids)

    def truncate(self, num_tokens: int) -> int:
        """Keep at most the first `num_tokens` tokens; returns how many were kept.

        Compressed blocks are not decompressed back into the exact tail, so a cut inside
        the compressed part keeps only the whole blocks before it.
        """
        num_tokens = min(num_tokens, self.length)
        compressed = self.num_blocks * self.block_size
        if num_tokens >= compressed:
            keep = num_tokens - compressed
            self.tail_k = [t[:, :keep] for t in self.tail_k]
            self.tail_v = [t[:, :keep] for t in self.tail_v]
        else:
            keep_blocks = num_tokens // self.block_size
            dropped = torch.arange(keep_blocks, self.num_blocks)
            for layer in range(self.num_layers):
                self.store.free(self.row_ids(layer, dropped))
            self.num_blocks = keep_blocks
            if keep_blocks == 0:
                self.sink_k = [t[:, :0] for t in self.sink_k]
                self.sink_v = [t[:, :0] for t in self.sink_v]
            self.tail_k = [t[:, :0] for t in self.tail_k]
            self.tail_v = [t[:, :0] for t in self.tail_v]
            num_tokens = keep_blocks * self.block_size
        self.length = num_tokens
        return num_tokens

    # ---- accounting and persistence -----------------------------------------------------
    def tail_bytes(self) -> int:
        """Bytes of the exact tokens on the device: the recent tails and the sink blocks."""
        return sum(t.numel() * t.element_size() for t in (*self.tail_k, *self.tail_v, *self.sink_k, *self.sink_v))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes per tier now: the exact tail counts as device memory."""
        tiers = self.store.resident_bytes()
        tiers["device"] += self.tail_bytes() + self.summaries.bytes_used(self.num_blocks)
        return tiers

    def export_state(self) -> dict[str, torch.Tensor]:
        """Everything stored, as CPU tensors: rows [layers*Hkv*blocks, row_bytes] + exact tails."""
        ids = torch.cat([self.row_ids(layer) for layer in range(self.num_layers)])
        rows = self.store.get(ids).cpu() if len(ids) else torch.empty((0, self.codec.row_bytes), dtype=torch.uint8)
        return {
            "rows": rows,
            "tail_k": torch.stack(self.tail_k).cpu(),  # [layers, Hkv, tail, D]
            "tail_v": torch.stack(self.tail_v).cpu(),  # values (tail and sink) in the stored basis
            "sink_k": torch.stack(self.sink_k).cpu(),  # [layers, Hkv, 0 or block_size, D]
            "sink_v": torch.stack(self.sink_v).cpu(),
            "length": torch.tensor([self.length, self.num_blocks], dtype=torch.int64),
        }

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with an `export_state` of a cache with the same layout."""
        self.truncate(0)
        length, num_blocks = (int(x) for x in state["length"])
        self.num_blocks = num_blocks
        ids = torch.cat([self.row_ids(layer) for layer in range(self.num_layers)])
        if len(ids):
            self.store.put(ids, state["rows"])
        self.tail_k = [t.to(self.device, self.dtype) for t in state["tail_k"]]
        self.tail_v = [t.to(self.device, self.dtype) for t in state["tail_v"]]
        self.sink_k = [t.to(self.device, self.dtype) for t in state["sink_k"]]
        self.sink_v = [t.to(self.device, self.dtype) for t in state["sink_v"]]
        self.length = length
        if num_blocks:  # summaries come from the stored keys, decoded and rotated
            for layer in range(self.num_layers):
                keys, _ = self.layer_keys_values(layer)
                self.summaries.write(layer, 0, keys[:, : num_blocks * self.block_size])

    def close(self) -> None:
        self.store.close()
