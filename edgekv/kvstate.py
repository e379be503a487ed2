"""What an offloaded KV cache holds besides its compressed rows: its layout and its exact tokens.

`KVLayout` is fixed for a cache's life (sizes, the row codec, where each row's id comes
from); `ExactKV` holds the tokens that stay uncompressed on the device. Both are read by
the cache (`edgekv.tiered_cache`) and by its decode backend (`edgekv.backends`), which
never copy them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import BlockCodec


@dataclass(frozen=True, eq=False)
class KVLayout:
    """Sizes and formats of one offloaded cache.

    Row ids (one compressed block of one KV head of one layer per row):

        row(layer, kv_head, block) = (layer * num_kv_heads + kv_head) * max_blocks + block

    rope_inv_freq: fp32 [head_dim // 2] on the device (rows hold keys before RoPE);
    value_basis: fp32 [head_dim, head_dim] or None: the rotation every held value is in
    (`edgekv.rotation`); dtype: the exact tokens' and activations' dtype.
    recomputed: bool [max_blocks] on the host, or None (no block): the blocks whose K/V
    are recomputed from stored layer inputs (`edgekv.recompute`), the same in every layer
    and KV head; their row ids name no row in the store.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    max_blocks: int
    codec: BlockCodec
    dtype: torch.dtype
    device: torch.device
    rope_inv_freq: torch.Tensor
    value_basis: torch.Tensor | None
    recomputed: torch.Tensor | None = None

    @property
    def num_recomputed(self) -> int:
        """Recompute blocks below max_blocks (0 without recomputation)."""
        return 0 if self.recomputed is None else int(self.recomputed.sum())

    @property
    def num_rows(self) -> int:
        """Size of the row id space."""
        return self.num_layers * self.num_kv_heads * self.max_blocks

    def first_row(self, layer: int) -> int:
        """Row id of (layer, KV head 0, block 0)."""
        return layer * self.num_kv_heads * self.max_blocks

    def row_ids(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """int64 ids, head-major, of `blocks` (on `blocks`' device): [n] the same blocks of
        every KV head -> [num_kv_heads * n]; [num_kv_heads, n] per KV head ->
        [num_kv_heads * n] (entries of -1 give negative ids: mask them)."""
        heads = torch.arange(self.num_kv_heads, device=blocks.device)[:, None] * self.max_blocks
        return (heads + (blocks + self.first_row(layer))).reshape(-1)


class ExactKV:
    """The exact tokens of every layer, in the model's dtype, on the device.

    Per layer, three buffers [num_kv_heads, capacity, head_dim] with room to grow::

        [ sink: block 0, once compressed | recent tail: tail_len tokens | room ... ]
          `sink_len` tokens                 appended one forward pass at a time

        keys      rotated to their positions: what attention reads
        keys_pre  before RoPE (the rope scale applied): what compression stores
        values    in the stored basis (`edgekv.rotation`)

    Sink and tail sit side by side, so attention reads them as one exact segment
    (`exact`) with no copy; a decode step writes its token in place. When blocks leave
    the tail (`drop`), the tokens after them move down; block 0 stays as the sink.

    With `hidden` > 0 each layer also keeps its tokens' normed inputs h in `inputs`
    [1, capacity, hidden] (the same positions): what a recompute block stores instead of
    its K/V when it leaves the tail (`edgekv.recompute`). hidden 0: nothing is kept.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, min_capacity: int, hidden: int = 0):
        self.num_layers, self.shape, self.hidden = num_layers, (num_kv_heads, head_dim), hidden
        self.dtype, self.device, self.min_capacity = dtype, device, min_capacity
        self.sink_len = 0
        self.tail_lens = [0] * num_layers  # layers ahead in a forward pass hold its new tokens
        self.buffers = [self._alloc(min_capacity) for _ in range(num_layers)]
        self.inputs = [self._alloc_inputs(min_capacity) for _ in range(num_layers)]

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, d = self.shape
        return tuple(torch.empty((h, capacity, d), dtype=self.dtype, device=self.device) for _ in range(3))

    def _alloc_inputs(self, capacity: int) -> torch.Tensor:
        return torch.empty((1, capacity if self.hidden else 0, self.hidden), dtype=self.dtype, device=self.device)

    @property
    def tail_len(self) -> int:
        """Tail tokens of the last layer: every layer's count between forward passes."""
        return self.tail_lens[-1]

    def append(self, layer: int, k: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor,
               h: torch.Tensor | None = None) -> None:
        """Append T new tokens to layer's tail: k, k_pre, v [num_kv_heads, T, head_dim];
        h [T, hidden]: their normed inputs (needed with hidden > 0, else ignored)."""
        n, t = self.sink_len + self.tail_lens[layer], k.shape[1]
        buffers = self.buffers[layer]
        if n + t > buffers[0].shape[1]:
            capacity = max(2 * (n + t), self.min_capacity)
            grown, inputs = self._alloc(capacity), self._alloc_inputs(capacity)
            for new, old in zip((*grown, inputs), (*buffers, self.inputs[layer])):
                new[:, :n] = old[:, :n]
            self.buffers[layer], self.inputs[layer] = grown, inputs
            buffers = grown
        for buf, x in zip(buffers, (k, k_pre, v)):
            buf[:, n:n + t] = x
        if self.hidden:
            if h is None:
                raise ValueError("this cache recomputes K/V from layer inputs: attend needs h [T, hidden]")
            self.inputs[layer][0, n:n + t] = h
        self.tail_lens[layer] += t

    def exact(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [num_kv_heads, sink_len + tail_len, head_dim]: views."""
        n = self.sink_len + self.tail_lens[layer]
        keys, _, values = self.buffers[layer]
        return keys[:, :n], values[:, :n]

    def tail(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tail's keys, pre-RoPE keys and values [num_kv_heads, tail_len, head_dim]: views."""
        s, n = self.sink_len, self.sink_len + self.tail_lens[layer]
        return tuple(buf[:, s:n] for buf in self.buffers[layer])

    def tail_inputs(self, layer: int) -> torch.Tensor:
        """The tail's normed inputs [tail_len, hidden] (a view; [0, 0] with hidden 0)."""
        s, n = self.sink_len, self.sink_len + self.tail_lens[layer]
        return self.inputs[layer][0, s:n]

    def sink(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sink's rotated keys and values [num_kv_heads, sink_len, head_dim]: views."""
        keys, _, values = self.buffers[layer]
        return keys[:, :self.sink_len], values[:, :self.sink_len]

    def drop(self, num_tokens: int, *, keep_first: int = 0) -> None:
        """The first `num_tokens` tail tokens of every layer were compressed: they leave the
        tail, except the first `keep_first`, which become the sink (block 0)."""
        for layer, buffers in enumerate(self.buffers):
            s, n = self.sink_len, self.sink_len + self.tail_lens[layer]
            keep_to = s + keep_first
            for buf in (*buffers, self.inputs[layer]):
                buf[:, keep_to:n - num_tokens + keep_first] = buf[:, s + num_tokens:n].clone()
            self.tail_lens[layer] -= num_tokens
        self.sink_len += keep_first

    def truncate(self, tail_len: int, *, sink_len: int | None = None) -> None:
        """Keep `tail_len` tail tokens of every layer (and `sink_len` sink tokens when given;
        a smaller sink drops the tail with it)."""
        if sink_len is not None and sink_len != self.sink_len:
            self.sink_len, tail_len = sink_len, 0
        self.tail_lens = [min(n, tail_len) for n in self.tail_lens]

    def nbytes(self) -> int:
        """Bytes of the exact tokens held (sink and tail, keys and values, every layer; the
        tail's normed inputs too)."""
        h, d = self.shape
        size = torch.empty(0, dtype=self.dtype).element_size()
        return (2 * h * d * size * sum(self.sink_len + n for n in self.tail_lens)
                + self.hidden * size * sum(self.tail_lens))

    def export(self) -> dict[str, torch.Tensor]:
        """CPU tensors: sink_k/sink_v [layers, Hkv, sink_len, D]; tail_k, tail_k_pre, tail_v
        [layers, Hkv, tail_len, D] (every layer's tail the same length); with hidden > 0
        also tail_h [layers, tail_len, hidden]."""
        sinks = [self.sink(layer) for layer in range(self.num_layers)]
        tails = [self.tail(layer) for layer in range(self.num_layers)]
        out = {"sink_k": torch.stack([k for k, _ in sinks]).cpu(), "sink_v": torch.stack([v for _, v in sinks]).cpu(),
               "tail_k": torch.stack([t[0] for t in tails]).cpu(),
               "tail_k_pre": torch.stack([t[1] for t in tails]).cpu(),
               "tail_v": torch.stack([t[2] for t in tails]).cpu()}
        if self.hidden:
            out["tail_h"] = torch.stack([self.tail_inputs(layer) for layer in range(self.num_layers)]).cpu()
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with an `export` of the same shape."""
        self.sink_len, self.tail_lens = 0, [0] * self.num_layers
        sink_len = state["sink_k"].shape[2]
        for layer in range(self.num_layers):
            k = torch.cat((state["sink_k"][layer], state["tail_k"][layer]), dim=1)
            k_pre = torch.cat((state["sink_k"][layer], state["tail_k_pre"][layer]), dim=1)  # sink: not compressed again
            v = torch.cat((state["sink_v"][layer], state["tail_v"][layer]), dim=1)
            h = None
            if self.hidden:  # the sink's inputs are never read again: zeros in front
                tail_h = state["tail_h"][layer]
                h = torch.cat((tail_h.new_zeros(sink_len, self.hidden), tail_h)).to(self.device, self.dtype)
            self.append(layer, *(x.to(self.device, self.dtype) for x in (k, k_pre, v)), h)
            self.tail_lens[layer] -= sink_len
        self.sink_len = sink_len
