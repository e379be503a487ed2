"""Compiled CPU kernel of `edgekv.kernels.block_score.score_blocks` (numba).

The torch twin scores a layer in a few dozen tensor operations, each a pass over
memory; this kernel makes one pass: per (KV head, block) it unpacks the block's key
codes into a small fp32 tile, folds the key scale into each query of the group and the
key zero into a bias (``q . k[t] = (q * scale) . code[t] + q . zero``, as the twin does)
and keeps the running maximum. Nothing of size ``num_blocks * block_size`` is ever
materialized. Same scores as the twin up to fp32 summation order.

At 4 bits (the default) a block's bytes are split into two tiles, low nibbles (even
channels) and high nibbles (odd channels), by two plain passes that the compiler
vectorizes, and the query is split the same way; unpacking into channel order converts
code by code and made the scorer about 1.4x slower (0.41 vs 0.29 ms for 3 KV heads x
250 blocks of 32 tokens at head_dim 64, one thread). The same split did not pay in the
attention kernel (0.33 vs 0.29 ms: there a block's tile is reused by only a few dot
products, and the permuted query, scales, tail and output cost more than it saved).

Compiled on first use (cached on disk by numba); 16-bit rows have no codes
to unpack and go to the twin.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit

from edgekv.quant import BlockCodec

from ._backend import aligned_rows, row_offsets
from .block_score import check_combine, query_group, score_blocks_torch


@njit(fastmath=True, cache=True, nogil=True)
def _score_nibbles(q, codes, scale, zero, block_size, out):
    """The 4-bit scorer: `_kernel`'s arguments; the codes of token t are bytes t*D/2 .. with
    channel 2i in the low and 2i+1 in the high nibble of byte i."""
    num_heads, group, d = q.shape
    num_blocks = codes.shape[1]
    width = d // 2  # code bytes per token
    low = np.empty(block_size * width, np.float32)
    high = np.empty(block_size * width, np.float32)
    q_even = np.empty(width, np.float32)
    q_odd = np.empty(width, np.float32)
    for h in range(num_heads):
        for n in range(num_blocks):
            src = codes[h, n]
            for i in range(block_size * width):
                low[i] = np.float32(src[i] & 15)
            for i in range(block_size * width):
                high[i] = np.float32(src[i] >> 4)
            best = np.float32(-np.inf)
            for g in range(group):
                bias = np.float32(0.0)
                for c in range(d):
                    bias += q[h, g, c] * zero[h, n, c]
                for i in range(width):
                    q_even[i] = q[h, g, 2 * i] * scale[h, n, 2 * i]
                    q_odd[i] = q[h, g, 2 * i + 1] * scale[h, n, 2 * i + 1]
                for t in range(block_size):
                    acc = np.float32(0.0)
                    base = t * width
                    for i in range(width):
                        acc += q_even[i] * low[base + i] + q_odd[i] * high[base + i]
                    if acc + bias > best:
                        best = acc + bias
            out[h, n] = best


@functools.cache
def _kernel(bits: int):
    """The scorer for one bit width (bits, codes per byte and mask are compile-time constants)."""
    if bits == 4:
        return _score_nibbles
    cpb, mask = 8 // bits, (1 << bits) - 1

    @njit(fastmath=True, cache=True, nogil=True)
    def score(q, codes, scale, zero, block_size, out):
        """q [H, G, D] f32; codes [H, N, >= B*D/cpb] u8; scale, zero [H, N, D] f32; out [H, N] f32."""
        num_heads, group, d = q.shape
        num_blocks = codes.shape[1]
        k = np.empty((block_size, d), np.float32)
        qs = np.empty(d, np.float32)
        for h in range(num_heads):
            for n in range(num_blocks):
                for t in range(block_size):
                    for i in range(d // cpb):  # token t's codes: bytes t*D/cpb .., lowest bits first
                        byte = codes[h, n, t * (d // cpb) + i]
                        for j in range(cpb):
                            k[t, i * cpb + j] = np.float32((byte >> (bits * j)) & mask)
                best = np.float32(-np.inf)
                for g in range(group):
                    bias = np.float32(0.0)
                    for c in range(d):
                        qs[c] = q[h, g, c] * scale[h, n, c]
                        bias += q[h, g, c] * zero[h, n, c]
                    for t in range(block_size):
                        acc = np.float32(0.0)
                        for c in range(d):
                            acc += qs[c] * k[t, c]
                        if acc + bias > best:
                            best = acc + bias
                out[h, n] = best

    return score


def score_blocks_numba(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, *,
                       combine: str = "max") -> torch.Tensor:
    """`score_blocks` on CPU tensors with a compiled kernel (same signature and result as the twin)."""
    check_combine(combine)
    if rows.dim() != 3:
        raise ValueError(f"rows must be [num_kv_heads, num_blocks, width] (got {tuple(rows.shape)})")
    hkv, nb = rows.shape[0], rows.shape[1]
    d = codec.head_dim
    group = query_group(q, hkv, d)
    if codec.bits == 16 or nb == 0 or d % codec.codes_per_byte:  # no codes, or codes across tokens
        return score_blocks_torch(q, rows, codec, combine=combine)
    off = row_offsets(codec, rows.shape[-1])
    rows = aligned_rows(rows, codec, 3, rows.shape[-1])
    qg = q.float().reshape(hkv, group, d)
    if combine == "sum":  # sum_g q_g . k == (sum_g q_g) . k
        qg = qg.sum(dim=1, keepdim=True)
    scale = rows[..., slice(*off["k_scale"])].view(torch.float16).float()  # [hkv, nb, D]
    zero = rows[..., slice(*off["k_zero"])].view(torch.float16).float()
    out = torch.empty(hkv, nb, dtype=torch.float32)
    _kernel(codec.bits)(qg.contiguous().numpy(), rows[..., slice(*off["k"])].numpy(), scale.numpy(),
                        zero.numpy(), codec.block_size, out.numpy())
    return out
