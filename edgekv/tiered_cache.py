"""The offloaded KV cache: compressed blocks in the tier store, exact tokens on the device.

Per layer, the sequence is laid out as

    [ block 0 | block 1 | … | block C-1 ][ exact tail: recent tokens, model dtype ]
      compressed rows in the TierStore      between recent_window and
      (one row per KV head per block)       recent_window + block_size - 1 tokens

Block 0 also stays exact on the device (the attention sink: the first tokens draw a
large share of every query's attention, so their quantization error weighs most); its
row is kept for the persistent state but attention reads the exact copy. The exact
tokens (sink and tail) live in `edgekv.kvstate.ExactKV`.

A token stays exact until it is `recent_window` tokens old and its whole block is; then
the block is compressed (`compress_blocks`: packed rows in the `BlockCodec` layout) from
its keys *before RoPE* (the model hands them over beside the rotated ones: per-channel
4-bit grids fit un-rotated keys much better, see `kernels/rope.py`), summarized for
selection (`edgekv.selection`, from the rotated keys queries see) and put in the store
(device cache → RAM → disk). Below 16 bits every value the cache holds (rows, sink and
tail) is in the Hadamard-rotated basis of `edgekv.rotation`; attention outputs come back
in the model's basis.

This cache owns the data and the policy of a decode step — how many blocks it may attend
(`budget_blocks`), which layers attend every block — and hands the step's KV work to its
decode backend (`edgekv.backends`, one per device): select blocks, attend them and the
exact tokens. A prefill chunk attends densely (`edgekv.attention`, flash-style) over the
decoded rows: on the CPU they are kept decoded across the chunks of a prefill
(`DecodedPast`, while they fit the RAM budget), so each chunk decodes only the blocks
compressed since the chunk before; else each chunk decodes every row into a scratch
buffer again. Row ids: `KVLayout.row_ids`.

With a `RecomputePlan`, a share of the blocks (`KVLayout.recomputed`) keep their layer
inputs instead of K/V rows (`edgekv.recompute.Recompute`, which owns them and makes
their K/V rows again when they are read); the budgets are split between the two stores.
"""

from __future__ import annotations

import torch

from .attention import dense_attention
from .backends import backend_class
from .errors import BudgetError
from .kernels import compress_blocks
from .kernels.rope import rotate_keys
from .kvstate import ExactKV, KVLayout
from .quant import BlockCodec
from .recompute import Recompute, RecomputePlan, recompute_pattern, split_budgets
from .rotation import rotate, value_rotation
from .selection import SCORERS, BlockSummaries, budget_blocks
from .sizes import format_size
from .tiers import TierStore, check_budgets


class DecodedPast:
    """Every layer's compressed blocks decoded during a prefill and kept across its chunks:
    per layer K and V [num_kv_heads, capacity, head_dim] in the cache's dtype (keys rotated,
    values in the stored basis) and how many blocks are decoded there. Decoding every
    stored row again for each chunk made a long prompt's prefill quadratic in its blocks
    (the 4-bit tiers prefilled 16K tokens at 0.55x their 1K rate on the 32K model).

    `max_bytes` bounds what all layers' buffers may take; `fits` says whether a length does."""

    def __init__(self, layout: KVLayout, max_bytes: int):
        self.layout, self.max_bytes = layout, max_bytes
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layout.num_layers
        self.blocks = [0] * layout.num_layers  # decoded blocks per layer (block 0, the sink, is never decoded)

    def _bytes(self, tokens: int) -> int:
        lay = self.layout
        return 2 * lay.num_layers * lay.num_kv_heads * tokens * lay.head_dim * lay.dtype.itemsize

    def fits(self, tokens: int) -> bool:
        return self._bytes(tokens) <= self.max_bytes

    def layer(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's K and V buffers holding at least `tokens` positions (grown keeping the
        decoded blocks)."""
        held = self.buffers[layer]
        if held is None or held[0].shape[1] < tokens:
            lay = self.layout
            capacity = max(tokens, 2 * held[0].shape[1] if held else 0, 256)
            if not self.fits(capacity):
                capacity = tokens
            shape = (lay.num_kv_heads, capacity, lay.head_dim)
            grown = tuple(torch.empty(shape, dtype=lay.dtype, device=lay.device) for _ in range(2))
            if held is not None:
                done = self.blocks[layer] * lay.block_size
                grown[0][:, :done], grown[1][:, :done] = held[0][:, :done], held[1][:, :done]
            self.buffers[layer] = held = grown
        return held

    def forget_from(self, block: int) -> None:
        """Blocks from `block` on are no longer the stored ones (the cache was cut back)."""
        self.blocks = [min(n, block) for n in self.blocks]


class TieredKVCache:
    """The `KVCache` protocol of `model.py`, backed by a `TierStore` of compressed blocks."""

    persistent = True  # export_state / import_state: the document cache keeps it

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_context: int,
                 block_size: int, kv_bits: int, recent_window: int, device_cache_bytes: int,
                 ram_bytes: int, disk_dir: str | None, disk_bytes: int, dtype: torch.dtype,
                 device: torch.device, rope_inv_freq: torch.Tensor, scorer: str = "keys4",
                 backend: str = "torch", recompute: RecomputePlan | None = None):
        codec = BlockCodec(bits=kv_bits, block_size=block_size, head_dim=head_dim)
        max_blocks = -(-max_context // block_size)
        self.layout = lay = KVLayout(
            num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
            max_blocks=max_blocks, codec=codec, dtype=dtype, device=device,
            rope_inv_freq=rope_inv_freq.to(device=device, dtype=torch.float32),
            value_basis=value_rotation(head_dim, kv_bits, device),
            recomputed=None if recompute is None else recompute_pattern(recompute.share, max_blocks))
        self.recent_window = recent_window
        kind = backend_class(backend)
        options = kind.store_options(lay)
        layer_rows = num_kv_heads * (lay.max_blocks - lay.num_recomputed)  # K/V rows one layer stores
        act_row = 0 if recompute is None else Recompute.act_row_bytes(recompute, lay)
        act_bytes = lay.num_recomputed * act_row
        kv_budgets, act_budgets = split_budgets(layer_rows * codec.row_bytes, act_bytes, act_row,
                                                device=device_cache_bytes, ram=ram_bytes, disk=disk_bytes)
        check_budgets(codec.row_bytes, min_ram_rows=layer_rows + -(-act_bytes // codec.row_bytes),
                      device_cache_bytes=device_cache_bytes, ram_bytes=ram_bytes, disk_bytes=disk_bytes,
                      has_disk=disk_dir is not None)
        device_rows = layer_rows + options.get("scratch_rows", 0)
        if kv_budgets["device"] < device_rows * codec.row_bytes:
            need = -(-device_rows * codec.row_bytes * device_cache_bytes // max(kv_budgets["device"], 1))
            raise BudgetError(f"device cache budget {format_size(device_cache_bytes)} is too small: one layer's "
                              f"KV blocks at full context need {format_size(need)}; raise --device-cache to at least that")
        self.store = TierStore(codec.row_bytes, device_cache_bytes=kv_budgets["device"], ram_bytes=kv_budgets["ram"],
                               disk_dir=disk_dir, disk_bytes=kv_budgets["disk"], device=device, **options)
        self.recompute = Recompute(lay, self.store, recompute, budgets=act_budgets, disk_dir=disk_dir,
                                   kernels=kind.kernels)
        self.exact = ExactKV(num_layers, num_kv_heads, head_dim, dtype=dtype, device=device,
                             min_capacity=2 * (recent_window + 2 * block_size),
                             hidden=recompute.hidden if self.recompute.active else 0)
        self.summaries = BlockSummaries(SCORERS[scorer], codec, num_layers=num_layers, num_kv_heads=num_kv_heads,
                                        max_blocks=lay.max_blocks, device=device, backend=kind.kernels)
        self.backend = kind(lay, self.store, self.summaries, self.exact, self.recompute)
        self.num_blocks = 0  # compressed blocks per layer (and KV head)
        self.length = 0
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # [Hkv, capacity, D] each
        # a prefill's decoded rows, kept across its chunks: on the CPU within the RAM budget
        self._past_bytes = ram_bytes if lay.device.type == "cpu" else 0
        self._past: DecodedPast | None = None
        self.configure_selection(budget="all", sink_blocks=1, dense_layers=0, speculate=False, head_budget="uniform")
        self.backend.warm_up()

    @property
    def codec(self) -> BlockCodec:
        return self.layout.codec

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
        self.speculating = speculate and budget != "all"
        self.backend.counters.pending.clear()

    def reset_counters(self) -> None:
        self.backend.reset_counters()
        self.recompute.reset_counters()

    def decode_stats(self, decode_steps: int) -> dict:
        """Traffic per tier and selection figures over `decode_steps` steps (stats keys,
        fetch_bytes among them: K/V row bytes the steps read); recompute_blocks /
        recompute_bytes: (layer, block) pairs recomputed and activation bytes read per step."""
        return self.backend.stats(decode_steps) | self.recompute.stats(decode_steps)

    # ---- selection --------------------------------------------------------------------
    def _blocks_to_attend(self, layer: int) -> int | None:
        """Compressed blocks per KV head a decode step of `layer` attends (None: every one)."""
        nb = self.num_blocks
        if self.budget == "all" or layer < self.dense_layers or nb == 0:
            return None
        tail = self.exact.tail_lens[layer]
        k = budget_blocks(self.budget, context=nb * self.layout.block_size + tail, tail=tail,
                          block_size=self.layout.block_size, num_blocks=nb, sink_blocks=self.sink_blocks)
        return None if k >= nb else k

    def selection(self, layer: int, q: torch.Tensor) -> torch.Tensor | None:
        """The blocks [Hkv, k] a decode query q [Hq, D] of `layer` would attend now (block 0
        first; -1 padded when heads share the budget), or None: every block. Not counted."""
        k = self._blocks_to_attend(layer)
        return None if k is None else self.backend.pick(layer, q, self.num_blocks, k, self.sink_blocks, self.adaptive)

    def speculate(self, layer: int, q: torch.Tensor) -> None:
        """Request the blocks an approximate query q [Hq, D] of `layer` selects (layer-ahead prefetch)."""
        if layer >= self.layout.num_layers:
            return
        k = self._blocks_to_attend(layer)
        if k is not None:
            self.backend.speculate(layer, q, self.num_blocks, k, self.sink_blocks, self.adaptive)

    # ---- attention --------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_pre: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The `KVCache` protocol: store the new tokens, attend over everything stored."""
        self.exact.append(layer, k, k_pre, rotate(v, self.layout.value_basis), h)
        if q.shape[1] > 1:  # a prefill chunk: dense over the decoded rows and the exact tokens
            keys, values = self.layer_keys_values(layer)
            return rotate(dense_attention(q, keys, values, q_start=self.length), self.layout.value_basis, inverse=True)
        self._past = None  # the prefill is over: free its decoded rows
        nb, k_blocks = self.num_blocks, self._blocks_to_attend(layer)
        block_ids = None
        if k_blocks is not None:
            block_ids = self.backend.select(layer, q[:, 0], nb, k_blocks, self.sink_blocks, self.adaptive)[:, 1:]
        out = self.backend.attend(layer, q[:, 0], block_ids, nb)  # block 0 is the exact sink
        if layer == self.layout.num_layers - 1:
            self.backend.end_step()
        return out[:, None]  # [Hq, 1, D]

    def _scratch_for(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None or self._scratch[0].shape[1] < tokens:
            capacity = max(tokens, 2 * (self._scratch[0].shape[1] if self._scratch else 0), 256)
            shape = (self.layout.num_kv_heads, capacity, self.layout.head_dim)
            dtype, device = self.layout.dtype, self.layout.device
            self._scratch = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        return self._scratch

    def layer_keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored K and V of `layer` in position order, decoded: each [num_kv_heads,
        length, head_dim] (views of a buffer the next call may overwrite); keys rotated,
        values in the stored basis. Within the budget of `DecodedPast` the blocks decoded
        by an earlier call are kept and only the newer ones decoded."""
        lay, nb, B = self.layout, self.num_blocks, self.layout.block_size
        sink_k, sink_v = self.exact.sink(layer)
        tail_k, _, tail_v = self.exact.tail(layer)
        compressed, tail = nb * B, tail_k.shape[1]
        if self._past is None and self._past_bytes:
            self._past = DecodedPast(lay, self._past_bytes)
        past = self._past if self._past is not None and self._past.fits(compressed + tail) else None
        if past is not None:
            k_buf, v_buf = past.layer(layer, compressed + tail)
            first = max(past.blocks[layer], 1)  # block 0 comes from the exact sink
            past.blocks[layer] = max(nb, past.blocks[layer])
        else:
            k_buf, v_buf = self._scratch_for(compressed + tail)
            first = 1
        if nb > first:
            rows = self.recompute.rows(lay.row_ids(layer, torch.arange(first, nb))).view(lay.num_kv_heads, nb - first, -1)
            start = first * B
            for h in range(lay.num_kv_heads):
                out = (k_buf[h, start:compressed].view(nb - first, B, lay.head_dim),
                       v_buf[h, start:compressed].view(nb - first, B, lay.head_dim))
                self.codec.decode(rows[h], dtype=lay.dtype, out=out)
            positions = torch.arange(start, compressed, device=lay.device)
            k_buf[:, start:compressed] = rotate_keys(k_buf[:, start:compressed], positions, lay.rope_inv_freq)
        if nb:
            k_buf[:, :B], v_buf[:, :B] = sink_k, sink_v
        k_buf[:, compressed:compressed + tail] = tail_k
        v_buf[:, compressed:compressed + tail] = tail_v
        return k_buf[:, :compressed + tail], v_buf[:, :compressed + tail]

    def commit(self, num_tokens: int) -> None:
        """Advance the length; compress the full blocks that left the recent window."""
        self.length += num_tokens
        exact = self.length - self.num_blocks * self.layout.block_size
        n = max(0, exact - self.recent_window) // self.layout.block_size
        if not n:
            return
        lay, B = self.layout, self.layout.block_size
        layers = range(lay.num_layers)
        blocks = torch.arange(self.num_blocks, self.num_blocks + n)
        tails = [self.exact.tail(layer) for layer in layers]
        # every layer's new blocks in one batch: [layers, Hkv, n*B, D] (the compression and
        # summary ops run once per commit, not once per layer)
        keys = torch.stack([k[:, :n * B] for k, _, _ in tails])
        self.summaries.write_layers(layers, self.num_blocks, keys)
        kept = ~self.recompute.recomputed(blocks)  # the blocks whose K/V rows are stored
        tokens = kept.repeat_interleave(B).to(lay.device)
        keys_pre = torch.stack([k_pre[:, :n * B][:, tokens] for _, k_pre, _ in tails])
        values = torch.stack([v[:, :n * B][:, tokens] for _, _, v in tails])
        rows = compress_blocks(keys_pre.flatten(0, 1), values.flatten(0, 1), lay.codec,
                               backend=self.backend.kernels)  # [layers*Hkv, kept, row_bytes]
        new_ids = torch.cat([lay.row_ids(layer, blocks[kept]) for layer in layers])
        self.store.put(new_ids, rows.reshape(-1, lay.codec.row_bytes))
        self.recompute.put(layers, blocks, [self.exact.tail_inputs(layer) for layer in layers])
        self.exact.drop(n * B, keep_first=B if self.num_blocks == 0 else 0)  # block 0 stays: the sink
        self.num_blocks += n
        self.backend.blocks_added(new_ids)

    def truncate(self, num_tokens: int) -> int:
        """Keep at most the first `num_tokens` tokens; returns how many were kept.

        Compressed blocks are not decompressed back into the exact tail: the cut keeps the
        blocks a fresh prefill of `num_tokens` tokens would have compressed (those at least
        `recent_window` tokens old), so once the caller runs the tokens after the returned
        count again, the last `recent_window` tokens are exact as after a fresh prefill.
        """
        num_tokens = min(num_tokens, self.length)
        B = self.layout.block_size
        keep_blocks = min(self.num_blocks, max(0, num_tokens - self.recent_window) // B)
        if keep_blocks == self.num_blocks:
            self.exact.truncate(num_tokens - keep_blocks * B)
        else:
            dropped = torch.arange(keep_blocks, self.num_blocks)
            for layer in range(self.layout.num_layers):
                self.store.free(self.layout.row_ids(layer, self.recompute.stored(dropped)))
                self.recompute.free(layer, dropped)
            self.num_blocks = keep_blocks
            self.exact.truncate(0, sink_len=B if keep_blocks else 0)
            num_tokens = keep_blocks * B
            if self._past is not None:
                self._past.forget_from(keep_blocks)
        self.length = num_tokens
        return num_tokens

    # ---- accounting and persistence -----------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Bytes per tier now: the exact tokens and block summaries count as device memory."""
        tiers = self.store.resident_bytes()
        for tier, nbytes in self.recompute.resident_bytes().items():
            tiers[tier] += nbytes
        tiers["device"] += self.exact.nbytes() + self.summaries.bytes_used(self.num_blocks)
        return tiers

    def _all_row_ids(self) -> torch.Tensor:
        blocks = self.recompute.stored(torch.arange(self.num_blocks))
        return torch.cat([self.layout.row_ids(layer, blocks) for layer in range(self.layout.num_layers)])

    def export_state(self) -> dict[str, torch.Tensor]:
        """Everything stored, as CPU tensors: rows [layers*Hkv*blocks, row_bytes] (the
        stored blocks) + the exact tokens (+ the activation rows of recompute blocks)."""
        ids = self._all_row_ids()
        rows = self.store.get(ids).cpu() if len(ids) else torch.empty((0, self.codec.row_bytes), dtype=torch.uint8)
        return {"rows": rows, **self.exact.export(), **self.recompute.export(self.num_blocks),
                "length": torch.tensor([self.length, self.num_blocks], dtype=torch.int64)}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with an `export_state` of a cache with the same layout."""
        self.truncate(0)
        self._past = None
        length, num_blocks = (int(x) for x in state["length"])
        self.num_blocks = num_blocks
        ids = self._all_row_ids()
        if len(ids):
            self.store.put(ids, state["rows"])
        self.recompute.load(state, num_blocks)
        self.exact.load(state)
        self.length = length
        if num_blocks:  # summaries come from the stored keys, decoded and rotated
            for layer in range(self.layout.num_layers):
                keys, _ = self.layer_keys_values(layer)
                self.summaries.write(layer, 0, keys[:, : num_blocks * self.layout.block_size])

    def close(self) -> None:
        self._past = None
        self.backend.close()
        self.store.close()
        self.recompute.close()
