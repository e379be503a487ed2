"""Sparse paged decode attention over selected compressed blocks plus the exact tail.

One decode token: each query head attends to the tokens of its KV head's selected
blocks (sink blocks + top-k blocks, as packed `BlockCodec` rows) followed by the exact
recent tail, with one softmax over all of them:

    keys of KV head h:  [ selected block 0 | block 1 | … | block k-1 ][ tail t0 … tL-1 ]
                          packed rows, dequantized on the fly            model dtype

    out[g] = softmax(q[g] . K^T * sm_scale) @ V      for query head g of KV head h

GQA: query heads ``h*group .. h*group+group-1`` share KV head ``h``. Block order does
not matter (softmax is permutation-invariant), so "sink + top-k" can come in any order.

Three implementations with one signature:
- `sparse_decode_attention_torch` (the twin): decodes the rows with `BlockCodec.decode`
  to fp32 and does exact softmax attention in fp32; the reference.
- `sparse_decode_attention_numba` (`sparse_attention_numba.py`): the same in one
  compiled pass per KV head with an online softmax; the CPU production path.
- `sparse_decode_attention_triton` (`sparse_attention_triton.py`): flash-decoding,
  dequantizing in registers; see the picture there.

Keys before rotary embedding (`rope.py`): with ``rope_inv_freq`` given, the rows hold
un-rotated keys and ``block_ids[h, j]`` names the block that selected row ``j`` of KV
head ``h`` is, so its token ``t`` sits at position ``block_ids[h, j] * block_size + t``;
each dequantized key is rotated to that position before the dot product (the tail's
keys are already rotated).

``num_valid`` lets a caller keep a fixed-size selection buffer: blocks at index
``>= num_valid[h]`` of KV head ``h`` are ignored (their bytes are never read by the
kernel). It is ``None`` (all valid), an int, or an int tensor ``[num_kv_heads]`` on the
rows' device (no host sync in the kernel).
"""

from __future__ import annotations

import torch

from edgekv.quant import BlockCodec

from ._backend import dispatch
from .block_score import query_group
from .rope import block_token_positions, rotate_keys


def sparse_decode_attention(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec,
                            tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                            num_valid: int | torch.Tensor | None = None, sm_scale: float | None = None,
                            split_blocks: int | None = None, block_ids: torch.Tensor | None = None,
                            rope_inv_freq: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of one decode token over selected packed blocks + the exact tail.

    q: [num_heads, head_dim] fp32/fp16/bf16.
    rows: [num_kv_heads, k_selected, row_bytes] uint8 in ``codec``'s layout
        (bits 2, 4, 8 or 16); k_selected may be 0.
    tail_k, tail_v: [num_kv_heads, tail_len, head_dim] fp32/fp16/bf16; tail_len may be 0.
    num_valid: None | int | int tensor [num_kv_heads]: blocks used per KV head.
    sm_scale: softmax scale (default 1/sqrt(head_dim)).
    split_blocks: blocks per split of the Triton kernel (default: enough splits to fill
        the GPU); the twin ignores it.
    block_ids: int tensor [num_kv_heads, k_selected] on the rows' device, with
        rope_inv_freq: fp32 [head_dim // 2]: the rows hold keys before RoPE (see above);
        both None: the rows hold rotated keys.
    Returns [num_heads, head_dim] in q's dtype (zeros for a head with no tokens).
    """
    fn = dispatch(backend, sparse_decode_attention_torch, "sparse_attention_triton",
                  "sparse_decode_attention_triton", (q, rows, tail_k, tail_v),
                  numba_kernel=("sparse_attention_numba", "sparse_decode_attention_numba"))
    return fn(q, rows, codec, tail_k, tail_v, num_valid=num_valid, sm_scale=sm_scale,
              split_blocks=split_blocks, block_ids=block_ids, rope_inv_freq=rope_inv_freq)


def pooled_decode_attention(q: torch.Tensor, device_rows: torch.Tensor, host_rows: torch.Tensor,
                            slots: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                            num_valid: int | torch.Tensor | None = None, sm_scale: float | None = None,
                            split_blocks: int | None = None, block_ids: torch.Tensor | None = None,
                            rope_inv_freq: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """`sparse_decode_attention` with each selected row read where it lies in one of two pools:

        slots[h, j] >= 0:  row j of KV head h is device_rows[slots[h, j]]
        slots[h, j] <  0:  it is host_rows[-1 - slots[h, j]]   (on a GPU: pinned host memory,
                                                               read in place over the bus)

    device_rows, host_rows: uint8 [P, row_bytes] (the store's device cache and RAM home);
    slots: int [num_kv_heads, k_selected] on the device. Other arguments as
    `sparse_decode_attention`'s (rows [Hkv, k, row_bytes] there are the gathered pools
    here). Entries at index >= num_valid[h] are never read.
    """
    fn = dispatch(backend, pooled_decode_attention_torch, "sparse_attention_triton",
                  "pooled_decode_attention_triton", (q, device_rows, slots, tail_k, tail_v))
    return fn(q, device_rows, host_rows, slots, codec, tail_k, tail_v, num_valid=num_valid, sm_scale=sm_scale,
              split_blocks=split_blocks, block_ids=block_ids, rope_inv_freq=rope_inv_freq)


def check_pooled_args(device_rows: torch.Tensor, host_rows: torch.Tensor, slots: torch.Tensor,
                      codec: BlockCodec) -> None:
    for name, pool in (("device_rows", device_rows), ("host_rows", host_rows)):
        if pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != codec.row_bytes or not pool.is_contiguous():
            raise ValueError(f"{name} must be a contiguous uint8 [P, {codec.row_bytes}] pool "
                             f"(got {tuple(pool.shape)} {pool.dtype})")
    if slots.dim() != 2 or slots.is_floating_point():
        raise ValueError(f"slots must be an int tensor [num_kv_heads, k_selected] (got {tuple(slots.shape)} {slots.dtype})")


def pooled_decode_attention_torch(q: torch.Tensor, device_rows: torch.Tensor, host_rows: torch.Tensor,
                                  slots: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor,
                                  tail_v: torch.Tensor, **kwargs) -> torch.Tensor:
    """The twin: gather each row from its pool, then `sparse_decode_attention_torch`."""
    check_pooled_args(device_rows, host_rows, slots, codec)
    slots = slots.to(torch.int64)

    def gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [Hkv, k, row_bytes]
        if not pool.shape[0]:
            return torch.zeros(*index.shape, pool.shape[1], dtype=torch.uint8, device=slots.device)
        return pool[index.to(pool.device)].to(slots.device)

    rows = torch.where((slots >= 0)[..., None], gather(device_rows, slots.clamp(min=0)),
                       gather(host_rows, (-1 - slots).clamp(min=0)))
    return sparse_decode_attention_torch(q, rows, codec, tail_k, tail_v, **kwargs)


def check_attention_args(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec,
                         tail_k: torch.Tensor, tail_v: torch.Tensor, block_ids: torch.Tensor | None = None,
                         rope_inv_freq: torch.Tensor | None = None) -> int:
    """Validate shapes; return the query group size (query heads per KV head)."""
    if (block_ids is None) != (rope_inv_freq is None):
        raise ValueError("block_ids and rope_inv_freq go together: give both (keys before RoPE) or neither")
    if block_ids is not None:
        if block_ids.shape != rows.shape[:2] or block_ids.is_floating_point():
            raise ValueError(f"block_ids must be an int tensor [{rows.shape[0]}, {rows.shape[1]}] "
                             f"(got {tuple(block_ids.shape)} {block_ids.dtype})")
        if rope_inv_freq.shape != (codec.head_dim // 2,) or codec.head_dim % 2:
            raise ValueError(f"rope_inv_freq must be [{codec.head_dim // 2}] (got {tuple(rope_inv_freq.shape)})")
    if rows.dtype != torch.uint8 or rows.dim() != 3 or rows.shape[2] != codec.row_bytes:
        raise ValueError(f"rows must be uint8 [num_kv_heads, k_selected, {codec.row_bytes}] "
                         f"(got {tuple(rows.shape)} {rows.dtype})")
    hkv, d = rows.shape[0], codec.head_dim
    if tail_k.dim() != 3 or tail_k.shape != tail_v.shape or tail_k.shape[0] != hkv or tail_k.shape[2] != d:
        raise ValueError(f"tail_k and tail_v must both be [{hkv}, tail_len, {d}] "
                         f"(got {tuple(tail_k.shape)} and {tuple(tail_v.shape)})")
    return query_group(q, hkv, d)


def valid_block_mask(num_valid: int | torch.Tensor | None, num_kv_heads: int, k_selected: int,
                     device: torch.device) -> torch.Tensor | None:
    """bool [num_kv_heads, k_selected]: True for blocks to attend (None: all of them)."""
    if num_valid is None:
        return None
    if isinstance(num_valid, torch.Tensor):
        if num_valid.shape != (num_kv_heads,):
            raise ValueError(f"num_valid must be a [{num_kv_heads}] int tensor (got {tuple(num_valid.shape)})")
        nv = num_valid.to(device=device, dtype=torch.int64)
    else:
        nv = torch.full((num_kv_heads,), int(num_valid), dtype=torch.int64, device=device)
    return torch.arange(k_selected, device=device)[None, :] < nv[:, None]


def sparse_decode_attention_torch(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec,
                                  tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                                  num_valid: int | torch.Tensor | None = None,
                                  sm_scale: float | None = None,
                                  split_blocks: int | None = None, block_ids: torch.Tensor | None = None,
                                  rope_inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """The twin: `BlockCodec.decode` to fp32, then exact fp32 softmax attention.

    The selected tokens and the tail are scored separately and share one softmax
    (a common max, then exp and sums per part), with no concatenated copy of scores or
    K/V. ``split_blocks`` is accepted and ignored.
    """
    group = check_attention_args(q, rows, codec, tail_k, tail_v, block_ids, rope_inv_freq)
    hkv, ksel = rows.shape[0], rows.shape[1]
    b, d = codec.block_size, codec.head_dim
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.float().view(hkv, group, d) * scale
    parts = []  # (scores [hkv, group, n], values [hkv, n, D])
    if ksel:
        k, v = codec.decode(rows.reshape(hkv * ksel, -1), torch.float32)
        k, v = k.view(hkv, ksel * b, d), v.view(hkv, ksel * b, d)
        if block_ids is not None:
            k = rotate_keys(k, block_token_positions(block_ids, b), rope_inv_freq)
        s = torch.bmm(qg, k.transpose(1, 2))  # [hkv, group, D] @ [hkv, D, ksel*B] -> [hkv, group, ksel*B]
        valid = valid_block_mask(num_valid, hkv, ksel, s.device)
        if valid is not None:
            s.masked_fill_(~valid.repeat_interleave(b, dim=1)[:, None, :], float("-inf"))
        parts.append((s, v))
    if tail_k.shape[1]:
        # [hkv, group, D] @ [hkv, D, L] -> [hkv, group, L]
        parts.append((torch.bmm(qg, tail_k.float().transpose(1, 2)), tail_v.float()))
    out = torch.zeros(hkv, group, d, dtype=torch.float32, device=q.device)
    if parts:
        top = torch.stack([s.amax(dim=2) for s, _ in parts]).amax(dim=0)[..., None]  # [hkv, group, 1]
        top = top.masked_fill(top.isinf(), 0.0)  # an all-masked head: exp gives 0 everywhere
        total = torch.zeros(hkv, group, 1, dtype=torch.float32, device=q.device)
        for s, v in parts:  # [hkv, group, n] @ [hkv, n, D] -> [hkv, group, D]
            e = s.sub_(top).exp_()
            total += e.sum(dim=2, keepdim=True)
            out.baddbmm_(e, v)
        out = (out / total).nan_to_num_(0.0)  # all-masked head -> 0
    return out.view(hkv * group, d).to(q.dtype)
