"""Compress completed blocks of K/V into packed rows.

Input: the K and V of ``n`` completed blocks of every KV head of one layer,
``k, v: [num_kv_heads, n * block_size, head_dim]`` (fp32/fp16/bf16; any head and token
strides, e.g. a slice of the engine's exact tail). Token ``i`` of block ``j`` is
position ``j * block_size + i``.

Output: ``rows: [num_kv_heads, n, row_bytes] uint8``, byte-identical to
``codec.encode(k_h_blocks, v_h_blocks)`` (rows of KV head ``h`` in block order,
head-major, as the engine stores them).

`compress_blocks_torch` is `BlockCodec.encode`; the Triton kernel does the same in one
launch (grid ``(num_kv_heads, n)``, one block per program) and writes the same bytes.
"""

from __future__ import annotations

import torch

from edgekv.quant import BlockCodec

from ._backend import dispatch


def compress_blocks(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec, *,
                    backend: str = "auto") -> torch.Tensor:
    """Pack ``n`` completed blocks of every KV head.

    k, v: [num_kv_heads, n * block_size, head_dim]. Returns uint8 [num_kv_heads, n, row_bytes].
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


def compress_blocks_torch(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec) -> torch.Tensor:
    """The twin: `BlockCodec.encode` of every (head, block)."""
    hkv, n = check_blocks(k, v, codec)
    b, d = codec.block_size, codec.head_dim
    if n == 0:
        return torch.empty(hkv, 0, codec.row_bytes, dtype=torch.uint8, device=k.device)
    # [H, n*B, D] -> [H*n, B, D], head-major
    return codec.encode(k.reshape(hkv * n, b, d), v.reshape(hkv * n, b, d)).view(hkv, n, codec.row_bytes)
