"""Compiled CPU kernel of `edgekv.kernels.block_score.score_blocks` (numba).

The torch twin scores a layer in a few dozen tensor operations, each a pass over
memory; this kernel makes one pass: per (KV head, block) it unpacks the block's key
codes into a small fp32 tile, folds the key scale into each query of the group and the
key zero into a bias (``q . k[t] = (q * scale) . code[t] + q . zero``, as the twin does)
and keeps the running maximum. Nothing of size ``num_blocks * block_size`` is ever
materialized. Same scores as the twin up to fp32 summation order.

The (KV head, block) pairs are split into chunks over `kernel_threads` threads; scales
and zeros are read as fp16 words in place (`numba_support`). At 4 bits (the default) a
block's bytes are split into two tiles, low nibbles (even channels) and high nibbles
(odd channels), by two plain passes that the compiler vectorizes, and the query is split
the same way; unpacking into channel order converts code by code and made the scorer
about 1.4x slower (0.41 vs 0.29 ms for 3 KV heads x 250 blocks of 32 tokens at head_dim
64, one thread). The same split did not pay in the attention kernel (0.33 vs 0.29 ms:
there a block's tile is reused by only a few dot products, and the permuted query,
scales, tail and output cost more than it saved).

Compiled on first use (cached on disk by numba); 16-bit rows have no codes
to unpack and go to the twin. `NumbaBlockSelector` is what a KV cache builds once for
its decode steps: scoring and top-k (`_top_blocks`) in one compiled call over the
summaries as they lie, without the per-call checks of `score_blocks`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit, prange

from edgekv.quant import BlockCodec

from ._backend import aligned_rows, row_offsets, tile_layout
from .block_score import check_combine, query_group, score_blocks_torch
from .numba_support import kernel_threads, widen_halves, words


CHUNKS_PER_THREAD = 4  # work chunks per thread: blocks of one chunk may be cheaper than another's


@functools.cache
def _kernel(bits: int, d: int, block_size: int):
    """The scorer for one bit width, head dim and block size, all compile-time constants
    (so the loops over a token's codes have fixed trip counts: 15-20% faster than with
    the sizes read at run time). Arguments: q [H, G, D] f32; rows [H, >= N, W] u8 (key
    codes from byte k_off) and words, the same bytes as u16 (scale and zero fp16 [D] from
    word scale_w, zero_w); chunks: parallel work items; out [H, N] f32: the scores of the
    first N blocks."""
    if bits == 4:
        return _nibble_kernel(d, block_size)
    cpb, mask = 8 // bits, (1 << bits) - 1

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def score(q, rows, words, k_off, scale_w, zero_w, chunks, out):
        num_heads, group = q.shape[0], q.shape[1]
        num_blocks = out.shape[1]
        items = num_heads * num_blocks
        for chunk in prange(chunks):
            k = np.empty((block_size, d), np.float32)
            qs = np.empty(d, np.float32)
            scale = np.empty(d, np.float32)
            zero = np.empty(d, np.float32)
            for item in range(chunk * items // chunks, (chunk + 1) * items // chunks):
                h, n = item // num_blocks, item % num_blocks
                src, scale_words, zero_words = rows[h, n, k_off:], words[h, n, scale_w:], words[h, n, zero_w:]
                for t in range(block_size):
                    for i in range(d // cpb):  # token t's codes: bytes t*D/cpb .., lowest bits first
                        byte = src[t * (d // cpb) + i]
                        for j in range(cpb):
                            k[t, i * cpb + j] = np.float32((byte >> (bits * j)) & mask)
                widen_halves(scale_words, scale)
                widen_halves(zero_words, zero)
                best = np.float32(-np.inf)
                for g in range(group):
                    bias = np.float32(0.0)
                    for c in range(d):
                        qs[c] = q[h, g, c] * scale[c]
                        bias += q[h, g, c] * zero[c]
                    for t in range(block_size):
                        acc = np.float32(0.0)
                        for c in range(d):
                            acc += qs[c] * k[t, c]
                        if acc + bias > best:
                            best = acc + bias
                out[h, n] = best

    return score


@functools.cache
def _nibble_kernel(d: int, block_size: int):
    """The 4-bit scorer (`_kernel`'s arguments): the codes of token t are bytes k_off + t*D/2 ..
    with channel 2i in the low and 2i+1 in the high nibble of byte i. (Segments are read
    through slices: an index like ``row[k_off + i]`` may be negative for all numba knows,
    and its wraparound check kept the loops scalar, 3-4x slower.)"""
    width = d // 2  # code bytes per token

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def score(q, rows, words, k_off, scale_w, zero_w, chunks, out):
        num_heads, group = q.shape[0], q.shape[1]
        num_blocks = out.shape[1]
        items = num_heads * num_blocks
        for chunk in prange(chunks):
            low = np.empty(block_size * width, np.float32)
            high = np.empty(block_size * width, np.float32)
            q_even = np.empty(width, np.float32)
            q_odd = np.empty(width, np.float32)
            scale = np.empty(d, np.float32)
            zero = np.empty(d, np.float32)
            for item in range(chunk * items // chunks, (chunk + 1) * items // chunks):
                h, n = item // num_blocks, item % num_blocks
                src, scale_words, zero_words = rows[h, n, k_off:], words[h, n, scale_w:], words[h, n, zero_w:]
                for i in range(block_size * width):
                    low[i] = np.float32(src[i] & 15)
                for i in range(block_size * width):
                    high[i] = np.float32(src[i] >> 4)
                widen_halves(scale_words, scale)
                widen_halves(zero_words, zero)
                best = np.float32(-np.inf)
                for g in range(group):
                    bias = np.float32(0.0)
                    for c in range(d):
                        bias += q[h, g, c] * zero[c]
                    for i in range(width):
                        q_even[i] = q[h, g, 2 * i] * scale[2 * i]
                        q_odd[i] = q[h, g, 2 * i + 1] * scale[2 * i + 1]
                    for t in range(block_size):
                        acc = np.float32(0.0)
                        base = t * width
                        for i in range(width):
                            acc += q_even[i] * low[base + i] + q_odd[i] * high[base + i]
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
    width = rows.shape[-1]
    row_offsets(codec, width)  # whole rows or key copies, else a clear error
    rows = aligned_rows(rows, codec, 3, width)
    layout = tile_layout(codec, key_copy=width != codec.row_bytes)
    qg = q.float().reshape(hkv, group, d)
    if combine == "sum":  # sum_g q_g . k == (sum_g q_g) . k
        qg = qg.sum(dim=1, keepdim=True)
    out = torch.empty(hkv, nb, dtype=torch.float32)
    chunks = min(hkv * nb, CHUNKS_PER_THREAD * kernel_threads())
    _kernel(codec.bits, d, codec.block_size)(qg.contiguous().numpy(), rows.numpy(), words(rows), layout["K_OFF"],
                                             layout["KS_OFF"], layout["KZ_OFF"], chunks, out.numpy())
    return out


@njit(cache=True, nogil=True)
def _top_blocks(scores, k, sink_blocks, out):
    """out [H, k] i64: per row of scores [H, N] f32 the sinks, then the k best, ascending."""
    num_blocks = scores.shape[1]
    row = np.empty(num_blocks, np.float32)
    for h in range(scores.shape[0]):
        for n in range(num_blocks):
            row[n] = np.inf if n < sink_blocks else scores[h, n]
        threshold = np.partition(row, num_blocks - k)[num_blocks - k]  # the k-th best (on a copy)
        ties = k
        for n in range(num_blocks):
            if row[n] > threshold:
                ties -= 1
        j = 0
        for n in range(num_blocks):
            if row[n] > threshold or (row[n] == threshold and ties > 0):
                if row[n] == threshold:
                    ties -= 1
                out[h, j] = n
                j += 1


def top_blocks_numba(scores: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """`top_blocks` on a CPU tensor (k below the block count) with a compiled kernel; of
    blocks tied at the k-th score, the first ones."""
    out = torch.empty(scores.shape[0], k, dtype=torch.int64)
    _top_blocks(scores.float().contiguous().numpy(), k, sink_blocks, out.numpy())
    return out


@functools.cache
def _select_kernel(d: int, block_size: int):
    """The 4-bit scorer into scores [H, N], then `_top_blocks` into ids [H, k]: one call."""
    score = _nibble_kernel(d, block_size)

    @njit(cache=True, nogil=True)
    def select(q, rows, words, k_off, scale_w, zero_w, chunks, scores, k, sink_blocks, ids):
        score(q, rows, words, k_off, scale_w, zero_w, chunks, scores)
        _top_blocks(scores, k, sink_blocks, ids)

    return select


class NumbaBlockSelector:
    """Selection for one KV cache's decode steps on the CPU: 4-bit key copies scored
    (combine max) and the top blocks picked in one compiled call, the layout made once.
    Same blocks as ``top_blocks(score_blocks(...), k, sink_blocks)`` with the numba
    backend. No argument checks: the caller hands it its own summaries."""

    def __init__(self, key_codec: BlockCodec):
        if key_codec.bits != 4 or key_codec.head_dim % 2:
            raise ValueError(f"the compiled selection scores 4-bit key copies (got {key_codec})")
        layout = tile_layout(key_codec, key_copy=True)
        self.layout = (layout["K_OFF"], layout["KS_OFF"], layout["KZ_OFF"])
        self.kernel = _select_kernel(key_codec.head_dim, key_codec.block_size)

    def __call__(self, q: torch.Tensor, summaries: torch.Tensor, num_blocks: int, k: int,
                 sink_blocks: int) -> torch.Tensor:
        """int64 [Hkv, k] ascending block ids (k < num_blocks) for q [Hq, D] over the first
        num_blocks blocks of summaries uint8 [Hkv, >= num_blocks, key_copy_bytes]."""
        hkv = summaries.shape[0]
        ids = torch.empty(hkv, k, dtype=torch.int64)
        scores = np.empty((hkv, num_blocks), np.float32)
        chunks = min(hkv * num_blocks, CHUNKS_PER_THREAD * kernel_threads())
        rows = summaries.numpy()
        self.kernel(q.float().reshape(hkv, -1, q.shape[-1]).contiguous().numpy(), rows, rows.view(np.uint16),
                    *self.layout, chunks, scores, k, sink_blocks, ids.numpy())
        return ids
