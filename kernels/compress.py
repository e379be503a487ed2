"""Compress-and-summarize completed blocks of K/V: packed rows plus per-block key bounds.

Input: the K and V of ``n`` completed blocks of every KV head of one layer,
``k, v: [num_kv_heads, n * block_size, head_dim]`` (fp32/fp16/bf16; any head and token
strides, e.g. a slice of the engine's exact tail). Token ``i`` of block ``j`` is
position ``j * block_size + i``.

Output (`CompressedBlocks`):
- ``rows: [num_kv_heads, n, row_bytes] uint8`` — byte-identical to
  ``codec.encode(k_h_blocks, v_h_blocks)`` (rows of KV head ``h`` in block order,
  head-major, as the engine stores them);
- ``kmin, kmax: [num_kv_heads, n, head_dim] fp16`` — the Quest block summary: each
  channel's minimum over the block's tokens rounded DOWN to fp16 and maximum rounded UP,
  so ``kmin <= k <= kmax`` holds exactly for the original keys (below 16 bits ``kmin``
  equals the row's K zero point).

`compress_blocks_torch` is `BlockCodec.encode` plus the summary; the Triton kernel does
both in one launch (grid ``(num_kv_heads, n)``, one block per program) and writes the
same bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from edgekv.quant import BlockCodec

from ._backend import dispatch


class CompressedBlocks(NamedTuple):
    rows: torch.Tensor  # [num_kv_heads, n, row_bytes] uint8
    kmin: torch.Tensor  # [num_kv_heads, n, head_dim] fp16, rounded down
    kmax: torch.Tensor  # [num_kv_heads, n, head_dim] fp16, rounded up


def compress_blocks(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec, *,
                    backend: str = "auto") -> CompressedBlocks:
    """Pack ``n`` completed blocks of every KV head and summarize their keys.

    k, v: [num_kv_heads, n * block_size, head_dim]. Returns `CompressedBlocks`.
    """
    fn = dispatch(backend, compress_blocks_torch, "compress_triton", "compress_blocks_triton", (k, v))
    return fn(k, v, codec)


def check_blocks(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec) -> tuple[int, int]:
    """``(num_kv_heads, n)`` after checking the shapes of ``k`` and ``v``."""
    b, d = codec.block_size, codec.head_dim
    if k.dim() != 3 or k.shape != v.shape or k.shape[2] != d or k.shape[1] % b:
        raise ValueError(f"k and v must both be [num_kv_heads, n * {b}, {d}] "
                         f"(got {tuple(k.shape)} and {tuple(v.shape)})")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"k and v must be floating point (got {k.dtype} and {v.dtype})")
    return k.shape[0], k.shape[1] // b


def empty_blocks(num_kv_heads: int, codec: BlockCodec, device: torch.device) -> CompressedBlocks:
    """`CompressedBlocks` of zero blocks."""
    summary = torch.empty(num_kv_heads, 0, codec.head_dim, dtype=torch.float16, device=device)
    rows = torch.empty(num_kv_heads, 0, codec.row_bytes, dtype=torch.uint8, device=device)
    return CompressedBlocks(rows, summary, summary.clone())


def _f16_neighbour(h: torch.Tensor, direction: int) -> torch.Tensor:
    """The fp16 next to each finite ``h`` toward +inf (``+1``) or -inf (``-1``)."""
    bits = h.view(torch.int16).int()
    order = torch.where(bits < 0, -(bits & 0x7FFF), bits) + direction  # monotonic in h
    return torch.where(order < 0, -order - 32768, order).to(torch.int16).view(torch.float16)


def round_down_f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the largest fp16 not above it."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, _f16_neighbour(h, -1), h)


def round_up_f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the smallest fp16 not below it."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _f16_neighbour(h, +1), h)


def compress_blocks_torch(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec) -> CompressedBlocks:
    """The twin: `BlockCodec.encode` of every (head, block) plus the fp32 min/max summary."""
    hkv, n = check_blocks(k, v, codec)
    b, d = codec.block_size, codec.head_dim
    if n == 0:
        return empty_blocks(hkv, codec, k.device)
    kb = k.reshape(hkv * n, b, d)  # [H, n*B, D] -> [H*n, B, D], head-major
    rows = codec.encode(kb, v.reshape(hkv * n, b, d)).view(hkv, n, codec.row_bytes)
    kf = kb.float()
    kmin = round_down_f16(kf.amin(dim=1)).view(hkv, n, d)
    kmax = round_up_f16(kf.amax(dim=1)).view(hkv, n, d)
    return CompressedBlocks(rows, kmin, kmax)
