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
the same way (unpacking into channel order converts code by code, which measured slower).
The same split did not pay in the attention kernel: there a block's tile is reused by
only a few dot products, and the permuted query, scales, tail and output cost more than
it saved.

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
from .block_score import block_mass_torch, check_combine, query_group, score_blocks_torch
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


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _unpack_nibble_block(src, scale_words, zero_words, num_codes, low, high, scale, zero):
    """A block's 4-bit key codes (num_codes bytes of src) as two fp32 tiles, low nibbles
    (even channels) and high (odd), and its fp16 key scale and zero widened to fp32."""
    for i in range(num_codes):
        low[i] = np.float32(src[i] & 15)
    for i in range(num_codes):
        high[i] = np.float32(src[i] >> 4)
    widen_halves(scale_words, scale)
    widen_halves(zero_words, zero)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _split_query(q, h, g, d, scale, zero, q_even, q_odd):
    """q[h, g] times the key scale, split into even and odd channels like the tiles;
    returns the bias q[h, g] . zero (``q . k[t] = (q * scale) . code[t] + q . zero``)."""
    bias = np.float32(0.0)
    for c in range(d):
        bias += q[h, g, c] * zero[c]
    for i in range(d // 2):
        q_even[i] = q[h, g, 2 * i] * scale[2 * i]
        q_odd[i] = q[h, g, 2 * i + 1] * scale[2 * i + 1]
    return bias


@functools.cache
def _nibble_kernel(d: int, block_size: int):
    """The 4-bit scorer (`_kernel`'s arguments): the codes of token t are bytes k_off + t*D/2 ..
    with channel 2i in the low and 2i+1 in the high nibble of byte i. (Segments are read
    through slices: an index like ``row[k_off + i]`` may be negative for all numba knows,
    and its wraparound check keeps the loops scalar.)"""
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
                _unpack_nibble_block(src, scale_words, zero_words, block_size * width, low, high, scale, zero)
                best = np.float32(-np.inf)
                for g in range(group):
                    bias = _split_query(q, h, g, d, scale, zero, q_even, q_odd)
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

    by_mass = False  # its scores are block maxima, not attention mass

    def __init__(self, key_codec: BlockCodec):
        if key_codec.bits != 4 or key_codec.head_dim % 2:
            raise ValueError(f"the compiled selection scores 4-bit key copies (got {key_codec})")
        layout = tile_layout(key_codec, key_copy=True)
        self.layout = (layout["K_OFF"], layout["KS_OFF"], layout["KZ_OFF"])
        self.kernel = _select_kernel(key_codec.head_dim, key_codec.block_size)

    def __call__(self, q: torch.Tensor, summaries: torch.Tensor, num_blocks: int, k: int,
                 sink_blocks: int, tail_k: torch.Tensor | None = None, tail_len: int = 0,
                 adaptive: bool = False, tail_start: int = 0) -> torch.Tensor:
        """int64 [Hkv, k] ascending block ids (k < num_blocks) for q [Hq, D] over the first
        num_blocks blocks of summaries uint8 [Hkv, >= num_blocks, key_copy_bytes]. Block
        maxima are not comparable across heads: no tail to weigh, no adaptive budget."""
        if adaptive:
            raise ValueError("block-max scores cannot share a budget between heads: use NumbaMassSelector")
        hkv = summaries.shape[0]
        ids = torch.empty(hkv, k, dtype=torch.int64)
        scores = np.empty((hkv, num_blocks), np.float32)
        chunks = min(hkv * num_blocks, CHUNKS_PER_THREAD * kernel_threads())
        rows = summaries.numpy()
        self.kernel(q.float().reshape(hkv, -1, q.shape[-1]).contiguous().numpy(), rows, rows.view(np.uint16),
                    *self.layout, chunks, scores, k, sink_blocks, ids.numpy())
        return ids


# ---- attention mass (`block_mass`) and budgets shared between heads (`adaptive_top_blocks`) ----

@njit(fastmath=True, cache=True, nogil=True)
def exp_nonpositive(x, out, bits, powers):
    """out[i] = exp(x[i]) for x[i] <= 0, relative error below 1e-4 (x below -87: 2**-126).
    2**y as 2**floor(y) by exponent bits times a polynomial in the fraction, so that the
    loop vectorizes (a libm exp per element keeps it scalar). bits: int32 scratch of x's
    length at least, powers: the same memory
    as float32 (``bits.view(np.float32)``, made once by the caller: a view made per
    call cost more than the exponentials of a block)."""
    for i in range(x.shape[0]):
        y = max(x[i] * np.float32(1.4426950408889634), np.float32(-126.0))
        n = np.floor(y)
        f = y - n
        out[i] = np.float32(1.0) + f * (np.float32(0.6931472) + f * (np.float32(0.2402265) + f * (
            np.float32(0.05550411) + f * (np.float32(0.009618129) + f * np.float32(0.0013333558)))))
        bits[i] = (np.int32(n) + np.int32(127)) << 23
    for i in range(x.shape[0]):
        out[i] *= powers[i]


@functools.cache
def _block_lse_kernel(d: int, block_size: int):
    """Per query head and block of 4-bit key copies (layout as `_nibble_kernel`'s): the
    largest score ``best`` and ``sum_t exp(s_t - best)``, s_t = q . k_t with q already
    scaled. Arguments as `_kernel`'s, q [H, G, D]; bmax, bsum [H, G, N] f32 out."""
    width = d // 2

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def block_lse(q, rows, words, k_off, scale_w, zero_w, chunks, bmax, bsum):
        num_heads, group, num_blocks = q.shape[0], q.shape[1], bmax.shape[2]
        items = num_heads * num_blocks
        for chunk in prange(chunks):
            low = np.empty(block_size * width, np.float32)
            high = np.empty(block_size * width, np.float32)
            q_even = np.empty(width, np.float32)
            q_odd = np.empty(width, np.float32)
            scale = np.empty(d, np.float32)
            zero = np.empty(d, np.float32)
            s = np.empty(block_size, np.float32)
            e = np.empty(block_size, np.float32)
            bits = np.empty(block_size, np.int32)
            powers = bits.view(np.float32)
            for item in range(chunk * items // chunks, (chunk + 1) * items // chunks):
                h, n = item // num_blocks, item % num_blocks
                src, scale_words, zero_words = rows[h, n, k_off:], words[h, n, scale_w:], words[h, n, zero_w:]
                _unpack_nibble_block(src, scale_words, zero_words, block_size * width, low, high, scale, zero)
                for g in range(group):
                    bias = _split_query(q, h, g, d, scale, zero, q_even, q_odd)
                    best = np.float32(-np.inf)
                    for t in range(block_size):
                        acc = np.float32(0.0)
                        base = t * width
                        for i in range(width):
                            acc += q_even[i] * low[base + i] + q_odd[i] * high[base + i]
                        s[t] = acc + bias
                        best = max(best, s[t])
                    for t in range(block_size):
                        s[t] -= best
                    exp_nonpositive(s, e, bits, powers)
                    total = np.float32(0.0)
                    for t in range(block_size):
                        total += e[t]
                    bmax[h, g, n] = best
                    bsum[h, g, n] = total

    return block_lse


@njit(fastmath=True, cache=True, nogil=True)
def _mass_from_lse(bmax, bsum, q, tail_k, tail_start, tail_len, out):
    """out [H, N] = sum over the group of each block's share of the softmax over every
    block (bmax, bsum [H, G, N]) and the tail_len exact keys of tail_k [H, >= tail_start +
    tail_len, D] from token tail_start on."""
    num_heads, group, num_blocks = bmax.shape
    d = q.shape[2]
    w = np.empty(num_blocks, np.float32)
    ts = np.empty(max(tail_len, 1), np.float32)
    bits = np.empty(max(num_blocks, tail_len, 1), np.int32)
    powers = bits.view(np.float32)
    out[:] = 0.0
    for h in range(num_heads):
        for g in range(group):
            top = np.float32(-np.inf)
            for t in range(tail_len):
                acc = np.float32(0.0)
                for c in range(d):
                    acc += q[h, g, c] * tail_k[h, tail_start + t, c]
                ts[t] = acc
                top = max(top, acc)
            for n in range(num_blocks):
                top = max(top, bmax[h, g, n])
            for n in range(num_blocks):
                w[n] = bmax[h, g, n] - top
            for t in range(tail_len):
                ts[t] -= top
            exp_nonpositive(w, w, bits, powers)
            exp_nonpositive(ts[:tail_len], ts[:tail_len], bits, powers)
            total = np.float32(0.0)
            for n in range(num_blocks):
                w[n] *= bsum[h, g, n]
                total += w[n]
            for t in range(tail_len):
                total += ts[t]
            for n in range(num_blocks):
                out[h, n] += w[n] / total


@njit(cache=True, nogil=True)
def _adaptive_top(weights, k, sink_blocks, ids):
    """`adaptive_top_blocks` into ids [H, >= N] i64; returns the width used (k_max)."""
    num_heads, num_blocks = weights.shape
    free = num_blocks - sink_blocks
    places = num_heads * (k - sink_blocks)
    flat = np.empty(num_heads * free, np.float32)
    for h in range(num_heads):
        for n in range(free):
            flat[h * free + n] = weights[h, sink_blocks + n]
    threshold = np.inf if places == 0 else np.partition(flat, flat.shape[0] - places)[flat.shape[0] - places]
    ties = places
    for i in range(flat.shape[0]):
        if flat[i] > threshold:
            ties -= 1
    width = 0
    for h in range(num_heads):
        j = 0
        for n in range(num_blocks):
            wn = weights[h, n]
            if n < sink_blocks or wn > threshold or (wn == threshold and ties > 0):
                if n >= sink_blocks and wn == threshold:
                    ties -= 1
                ids[h, j] = n
                j += 1
        for i in range(j, num_blocks):
            ids[h, i] = -1
        width = max(width, j)
    return width


def adaptive_top_blocks_numba(weights: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """`adaptive_top_blocks` on a CPU tensor (k below the block count) with a compiled
    kernel; of blocks tied at the threshold, the first ones (head-major)."""
    ids = torch.empty(weights.shape, dtype=torch.int64)
    width = _adaptive_top(weights.float().contiguous().numpy(), k, sink_blocks, ids.numpy())
    return ids[:, :width]


def block_mass_numba(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor, *,
                     sm_scale: float) -> torch.Tensor:
    """`block_mass` on CPU tensors with a compiled kernel for 4-bit codes (the twin otherwise)."""
    if rows.dim() != 3:
        raise ValueError(f"rows must be [num_kv_heads, num_blocks, width] (got {tuple(rows.shape)})")
    hkv, nb, d = rows.shape[0], rows.shape[1], codec.head_dim
    group = query_group(q, hkv, d)
    if codec.bits != 4 or nb == 0 or d % 2:
        return block_mass_torch(q, rows, codec, tail_k, sm_scale=sm_scale)
    width = rows.shape[-1]
    row_offsets(codec, width)
    rows = aligned_rows(rows, codec, 3, width)
    layout = tile_layout(codec, key_copy=width != codec.row_bytes)
    qs = (q.float().reshape(hkv, group, d) * sm_scale).contiguous().numpy()
    bmax = np.empty((hkv, group, nb), np.float32)
    bsum = np.empty((hkv, group, nb), np.float32)
    chunks = min(hkv * nb, CHUNKS_PER_THREAD * kernel_threads())
    _block_lse_kernel(d, codec.block_size)(qs, rows.numpy(), words(rows), layout["K_OFF"], layout["KS_OFF"],
                                           layout["KZ_OFF"], chunks, bmax, bsum)
    out = torch.empty(hkv, nb, dtype=torch.float32)
    tail = tail_k.float().contiguous().numpy()
    _mass_from_lse(bmax, bsum, qs, tail, 0, tail.shape[1], out.numpy())
    return out


@functools.cache
def _mass_select_kernel(d: int, block_size: int):
    """`_block_lse_kernel`, `_mass_from_lse`, then `_top_blocks` or `_adaptive_top`: one
    call; returns the width of ids used."""
    block_lse = _block_lse_kernel(d, block_size)

    @njit(cache=True, nogil=True)
    def select(q, rows, words, k_off, scale_w, zero_w, chunks, bmax, bsum, tail_k, tail_start, tail_len, mass, k,
               sink_blocks, adaptive, ids):
        block_lse(q, rows, words, k_off, scale_w, zero_w, chunks, bmax, bsum)
        _mass_from_lse(bmax, bsum, q, tail_k, tail_start, tail_len, mass)
        if adaptive:
            return _adaptive_top(mass, k, sink_blocks, ids)
        _top_blocks(mass, k, sink_blocks, ids)
        return k

    return select


class NumbaMassSelector:
    """Selection by `block_mass` for one KV cache's decode steps on the CPU: 4-bit key
    copies scored, the exact tail's share taken out, and the blocks picked (the same
    number per KV head, or a budget shared between heads) in one compiled call. Same
    blocks as ``top_blocks`` / ``adaptive_top_blocks`` over ``block_mass(...)`` with the
    numba backend. No argument checks: the caller hands it its own summaries and tail."""

    by_mass = True

    def __init__(self, key_codec: BlockCodec, sm_scale: float | None = None):
        if key_codec.bits != 4 or key_codec.head_dim % 2:
            raise ValueError(f"the compiled selection scores 4-bit key copies (got {key_codec})")
        layout = tile_layout(key_codec, key_copy=True)
        self.layout = (layout["K_OFF"], layout["KS_OFF"], layout["KZ_OFF"])
        self.sm_scale = key_codec.head_dim**-0.5 if sm_scale is None else sm_scale
        self.kernel = _mass_select_kernel(key_codec.head_dim, key_codec.block_size)

    def __call__(self, q: torch.Tensor, summaries: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                 tail_k: torch.Tensor, tail_len: int, adaptive: bool, tail_start: int = 0) -> torch.Tensor:
        """int64 [Hkv, k] ascending block ids (k < num_blocks) for q [Hq, D] over the first
        num_blocks blocks of summaries uint8 [Hkv, >= num_blocks, key_copy_bytes] and the
        tail_len keys of tail_k [Hkv, >= tail_start + tail_len, D] from tail_start on (a
        contiguous buffer is read in place); adaptive: [Hkv, k_max], -1 after each head's
        blocks (`adaptive_top_blocks`)."""
        hkv, d = summaries.shape[0], q.shape[-1]
        group = q.shape[0] // hkv
        qs = (q.float().reshape(hkv, group, d) * self.sm_scale).contiguous().numpy()
        bmax = np.empty((hkv, group, num_blocks), np.float32)
        bsum = np.empty((hkv, group, num_blocks), np.float32)
        mass = np.empty((hkv, num_blocks), np.float32)
        ids = torch.empty(hkv, num_blocks if adaptive else k, dtype=torch.int64)
        chunks = min(hkv * num_blocks, CHUNKS_PER_THREAD * kernel_threads())
        rows = summaries.numpy()
        width = self.kernel(qs, rows, rows.view(np.uint16), *self.layout, chunks, bmax, bsum,
                            tail_k.float().contiguous().numpy(), tail_start, tail_len, mass, k, sink_blocks, adaptive,
                            ids.numpy())
        return ids[:, :width]
