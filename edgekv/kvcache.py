"""The paged KV cache of one sequence, dense and in the model's precision.

Keys and values live in fixed-size blocks of `block_size` tokens inside one pool per
layer; a block table maps the sequence's logical blocks to pool slots:

    pool (one layer)   [num_kv_heads, capacity_blocks, block_size, head_dim]
    block table        logical block i  ->  pool slot table[i]
    sequence           [ block 0 | block 1 | … | last block (partly filled) ]

Slots are handed out lowest-free-first, so a sequence that grows and is cut back from its
end keeps an in-order table and attention reads the pool as one strided view; any other
table is gathered with `index_select`. The pool grows by doubling (amortised copies).
"""

from __future__ import annotations

import torch

from .attention import dense_attention


class PagedKVCache:
    """Dense paged KV storage + dense attention (the `KVCache` protocol of `model.py`)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, initial_blocks: int = 16):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, device
        shape = (num_kv_heads, initial_blocks, block_size, head_dim)
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_table: list[int] = []
        self.free_slots: list[int] = list(range(initial_blocks))  # kept sorted
        self.length = 0  # tokens stored in every layer

    @property
    def capacity_blocks(self) -> int:
        return self.k_pool[0].shape[1]

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of K and V held for the sequence (whole blocks, all layers): all on the device."""
        per_block = 2 * self.num_kv_heads * self.block_size * self.head_dim * self.k_pool[0].element_size()
        return {"device": per_block * len(self.block_table) * self.num_layers}

    def _ensure_blocks(self, num_tokens: int) -> None:
        needed = -(-num_tokens // self.block_size) - len(self.block_table)
        if needed <= 0:
            return
        if needed > len(self.free_slots):
            self._grow(self.capacity_blocks + needed - len(self.free_slots))
        self.block_table.extend(self.free_slots[:needed])
        del self.free_slots[:needed]

    def _grow(self, min_blocks: int) -> None:
        old = self.capacity_blocks
        new = max(min_blocks, 2 * old)
        for pools in (self.k_pool, self.v_pool):
            for i, pool in enumerate(pools):
                grown = torch.zeros((self.num_kv_heads, new, self.block_size, self.head_dim), dtype=self.dtype, device=self.device)
                grown[:, :old] = pool
                pools[i] = grown
        self.free_slots = sorted(self.free_slots + list(range(old, new)))

    def _contiguous(self) -> bool:
        return self.block_table == list(range(len(self.block_table)))

    def _tokens(self, pool: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[num_kv_heads, num_tokens, head_dim] view (in-order table) or gathered copy."""
        nblocks = -(-num_tokens // self.block_size)
        if self._contiguous():
            blocks = pool[:, :nblocks]
        else:
            table = torch.tensor(self.block_table[:nblocks], device=self.device)
            blocks = pool.index_select(1, table)
        return blocks.reshape(self.num_kv_heads, nblocks * self.block_size, self.head_dim)[:, :num_tokens]

    def _write(self, pool: torch.Tensor, start: int, x: torch.Tensor) -> None:
        """Write x [num_kv_heads, T, head_dim] at token positions start .. start+T-1."""
        pos, T, B = start, x.shape[1], self.block_size
        done = 0
        while done < T:
            block, offset = divmod(pos, B)
            n = min(B - offset, T - done)
            pool[:, self.block_table[block], offset:offset + n] = x[:, done:done + n]
            pos, done = pos + n, done + n

    persistent = False  # the dense reference is not kept in the document cache

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_pre: torch.Tensor | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """Store the rotated k and v of the new tokens, attend with q (k_pre and h are not needed)."""
        end = self.length + k.shape[1]
        self._ensure_blocks(end)
        self._write(self.k_pool[layer], self.length, k)
        self._write(self.v_pool[layer], self.length, v)
        keys = self._tokens(self.k_pool[layer], end)
        values = self._tokens(self.v_pool[layer], end)
        return dense_attention(q, keys, values, q_start=self.length)

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, num_tokens: int) -> int:
        """Keep only the first `num_tokens` tokens (returned); freed blocks return to the pool."""
        num_tokens = min(num_tokens, self.length)
        keep = -(-num_tokens // self.block_size)
        freed = self.block_table[keep:]
        del self.block_table[keep:]
        self.free_slots = sorted(self.free_slots + freed)
        self.length = num_tokens
        return num_tokens

    def close(self) -> None:
        """Nothing to release beyond memory."""

    def decode_stats(self, decode_steps: int) -> dict:
        """No traffic between tiers and no selection to report."""
        return {}

    def reset_counters(self) -> None:
        """No counters."""

    def export_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("the dense reference cache is not persisted")

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError("the dense reference cache is not persisted")

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K and V of `layer`: each [num_kv_heads, length, head_dim]."""
        return self._tokens(self.k_pool[layer], self.length), self._tokens(self.v_pool[layer], self.length)
