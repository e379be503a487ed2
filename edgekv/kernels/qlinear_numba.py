"""Compiled CPU kernels of `edgekv.kernels.qlinear.qlinear` (numba).

One token (a decode step, bound by reading the weights): `_matvec_kernel` makes one pass
over the packed codes and never writes the weights out, so a 4-bit matrix is read at
its ``nbytes`` (0.56-0.63 bytes/parameter) instead of fp16's 2. The rows are stored in
tiles of 32 side by side (`QuantizedWeight`): per tile and group of ``group_size``
columns, each byte column is 32 rows' codes, unpacked in registers (low nibble, high
nibble) and multiplied by one element of x into 32 running sums, a loop with no
dependence between rows that the compiler vectorizes; then ``acc += scale * sum +
zero * sum(x over the group)`` for the 32 rows: the zero term is one multiply per group,
the group sums of x are made once per call. Scales are read as fp16 words and widened in
registers (`_widen`). Tiles are split into chunks over `kernel_threads` threads.

More tokens: up to `MATVEC_TOKENS` run the matvec once each (the same output for a token
alone or in a chunk); a longer prefill chunk (bound by arithmetic) widens a block of
tiles to fp32 (`_dequant_kernel`; the whole matrix when it widens to at most 64 MB, so
the product writes its output in place: 4 MB blocks, each product copied into a column
slice of the output, took 1.1-1.5x as long at the embedded model's and Qwen2.5-0.5B's
shapes with 1024 tokens) and torch's fp32 matrix product multiplies it: equal up to
fp32 summation order.

Measured before choosing (single-token products, 2 threads and 1, on a 2-core AVX-512
VM shared with other jobs, candidates timed in alternation and compared by their
fastest calls, since the 2-thread medians were set by the scheduler; ratios are fp16
``F.linear`` time over the candidate's, at the embedded model's shapes (576..3072 x 576,
576 x 1536, the 49152 x 576 LM head) and Llama-3.1-8B's (4096 x 4096, 14336 x 4096), each
weight read from DRAM (copies cycled past the L3):

- this kernel, 4 bits, group 64: 2.6-3.0x on the matrices of 1.7M weights and more,
  1.4-2.2x on the embedded model's small ones (576 x 576 .. 576 x 1536: ~10 µs of a
  call are fixed costs, Python and the thread pool); group 32 (the embedded model's
  Q4_1): 2.25-2.8x and 1.4-2.2x; GGUF's Q4_K (integer scales under fp16 super-block
  factors): 2.0-2.1x; 8 bits: 1.6-2.0x and 1.3-1.8x;
- the same kernel over row-major codes (each row's sum reduced per group): 1.1-1.8x
  slower than the tiles (one thread), most at group 32 (a horizontal sum per 32 codes);
- torch's ``_weight_int4pack_mm_for_cpu`` (4 bits, group 32): 2.7-3.8x with bf16
  activations (x, scales, zeros and outputs rounded to bf16: GGUF's fp16 scales do not
  map exactly, no K-quants, no 8 bits), 0.15-0.2x with fp32 activations, 0.05x with
  fp16; ``_weight_int8pack_mm`` (per-row int8, fp32 x): 0.2-0.5x; bitsandbytes 0.50
  (nf4, fp16 x; its fused CPU path needs AVX512-BF16, which this CPU lacks, so it
  dequantizes): 0.1-0.5x. Only torch's bf16 int4 path was faster than this kernel
  (1.2-1.55x at one thread, 0.95-1.45x at two, most on small matrices), at bf16
  precision and without an exact form for GGUF's weights; it is not used.
- x quantized to int8 per group with integer dot products (llama.cpp's way), in a
  row-major prototype: 1.4-1.5x slower than its fp32 sums (numba's compiler does not
  emit VNNI dot products), and x's rounding would leave the fp32 twin's precision.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from numba import njit, prange

from .numba_support import kernel_threads
from .qlinear import TILE, QuantizedWeight, check_linear_args

CHUNKS_PER_THREAD = 4  # row chunks per thread: other work on a shared core delays one chunk, not a whole half
MATVEC_TOKENS = 8  # up to this many tokens run the matvec once each (T=7: 1.0-1.4x as fast as widening)
TILE_FLOATS = 1 << 24  # most fp32 weights widened per block of a multi-token product (64 MB)
NO_ZERO, FLAT_ZERO, SUPER_ZERO = 0, 1, 2


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _widen(words, out):
    """out[i] = the fp32 value of fp16 bit pattern words[i] (u16), exactly for every finite
    pattern: sign and the 15 bits of exponent and mantissa move to their fp32 places and
    a multiplication by 2**112 rebiases the exponent (`numba_support.widen_halves`'
    arithmetic in one pass, the bits reinterpreted by a scalar ``view``, which the
    compiler vectorizes: a 4-bit matvec of 4096 x 4096 at group 32 ran 1.37x as fast,
    one thread). (An fp16 subnormal becomes an fp32 subnormal before the multiplication,
    which the CPU handles in a slow microcode assist: 1.7% of the fp16 values of
    Qwen2.5-Coder-0.5B Q4_K_M are subnormal (none of the embedded model's), and at 0.6%
    a 4096 x 4096 product took 1.1x as long. A branch-free conversion that never makes an
    fp32 subnormal took 1.3-1.45x as long whatever the values, so it was not kept.)"""
    for i in range(out.shape[0]):
        w = np.uint32(words[i])
        bits = np.uint32(((w & np.uint32(0x8000)) << np.uint32(16)) | ((w & np.uint32(0x7FFF)) << np.uint32(13)))
        out[i] = bits.view(np.float32) * np.float32(2.0**112)


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _group_params(t, g, scale, zero, super_scale, super_zero, super_groups, zero_form, s, z, ss, sz):
    """The fp32 scales s [TILE] and zeros z [TILE] of group g of the rows of tile t (see
    QuantizedWeight): fp16 words widened, or integer multipliers times the widened
    super-block factors (ss, sz: [TILE] scratch)."""
    if super_groups == 0:
        _widen(scale[t, g], s)
        if zero_form == FLAT_ZERO:
            _widen(zero[t, g], z)
        return
    if g % super_groups == 0:  # groups run in order within a tile: a super-block's factors are widened once
        _widen(super_scale[t, g // super_groups], ss)
        if zero_form == SUPER_ZERO:
            _widen(super_zero[t, g // super_groups], sz)
    src = scale[t, g]
    for i in range(s.shape[0]):
        s[i] = ss[i] * np.float32(src[i])
    if zero_form == SUPER_ZERO:
        src = zero[t, g]
        for i in range(z.shape[0]):
            z[i] = sz[i] * np.float32(src[i])


@njit(fastmath=True, cache=True, nogil=True)
def _padded_sums(x, groups, group_size):
    """x [k] zero-padded to groups * group_size, and its sum over each group. (A function
    of its own: in the parallel kernel numba would make each array operation a parallel
    region of its own, a thread-pool round trip of a few µs each.)"""
    padded = np.zeros(groups * group_size, np.float32)
    padded[:x.shape[0]] = x
    xsum = np.zeros(groups, np.float32)
    for g in range(groups):
        for j in range(group_size):
            xsum[g] += padded[g * group_size + j]
    return padded, xsum


@functools.cache
def _matvec_kernel(bits: int, group_size: int, super_groups: int, zero_form: int):
    """out[r] = sum_c W[r, c] x[c] for every row r < N of one quantized matrix. Arguments:
    x [in_features] f32, codes [tiles, G, bytes per group, TILE] (u8 nibbles or i8),
    scale/zero [tiles, G, TILE] (u16 fp16 words, or u8/i8 integers),
    super_scale/super_zero [tiles, S, TILE] u16 ([1, 1, 1] when unused), chunks, out [N]
    f32. The loops over a tile's rows have a fixed trip count of 32 and no dependence
    between rows: the compiler vectorizes them."""
    h = group_size // 2

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def matvec(x, codes, scale, zero, super_scale, super_zero, chunks, out):
        tiles, groups = codes.shape[0], codes.shape[1]
        n = out.shape[0]
        padded, xsum = _padded_sums(x, groups, group_size)
        for chunk in prange(chunks):
            low, shift = np.int32(15), np.int32(4)  # (defined outside the prange body they cost 25%)
            s = np.empty(TILE, np.float32)
            z = np.zeros(TILE, np.float32)
            ss = np.empty(TILE, np.float32)
            sz = np.empty(TILE, np.float32)
            part = np.empty(TILE, np.float32)
            acc = np.empty(TILE, np.float32)
            for t in range(chunk * tiles // chunks, (chunk + 1) * tiles // chunks):
                for i in range(TILE):  # (a slice assignment here is a nested parallel loop: 25% slower)
                    acc[i] = 0.0
                for g in range(groups):
                    for i in range(TILE):
                        part[i] = 0.0
                    base = g * group_size
                    if bits == 4:
                        for j in range(h):
                            x_lo = padded[base + j]
                            x_hi = padded[base + h + j]
                            src = codes[t, g, j]
                            for i in range(TILE):
                                b = np.int32(src[i])
                                part[i] += (np.float32(np.int32(b & low)) * x_lo
                                            + np.float32(np.int32(b >> shift)) * x_hi)
                    else:
                        for j in range(0, group_size, 2):  # two columns a step: one a step stayed scalar (3-5x slower)
                            x0, x1 = padded[base + j], padded[base + j + 1]
                            src0, src1 = codes[t, g, j], codes[t, g, j + 1]
                            for i in range(TILE):
                                part[i] += np.float32(np.int32(src0[i])) * x0 + np.float32(np.int32(src1[i])) * x1
                    _group_params(t, g, scale, zero, super_scale, super_zero, super_groups, zero_form, s, z, ss, sz)
                    xs = xsum[g]
                    for i in range(TILE):
                        acc[i] += s[i] * part[i] + z[i] * xs
                for i in range(min(TILE, n - t * TILE)):
                    out[t * TILE + i] = acc[i]

    return matvec


@functools.cache
def _dequant_kernel(bits: int, group_size: int, super_groups: int, zero_form: int):
    """out[c, 32*(t - t0) + i] = W[32t + i, c] in fp32 for tiles t0 <= t < t0 + out.shape[1] / 32
    and columns c < out.shape[0] (the transposed tile a multi-token product multiplies;
    same arguments as `_matvec_kernel`, without x)."""
    h = group_size // 2

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def dequant(codes, scale, zero, super_scale, super_zero, t0, chunks, out):
        tiles, groups = out.shape[1] // TILE, codes.shape[1]
        for chunk in prange(chunks):
            low, shift = np.int32(15), np.int32(4)
            s = np.empty(TILE, np.float32)
            z = np.zeros(TILE, np.float32)
            ss = np.empty(TILE, np.float32)
            sz = np.empty(TILE, np.float32)
            for tt in range(chunk * tiles // chunks, (chunk + 1) * tiles // chunks):
                t = t0 + tt
                for g in range(groups):
                    _group_params(t, g, scale, zero, super_scale, super_zero, super_groups, zero_form, s, z, ss, sz)
                    base = g * group_size
                    if bits == 4:
                        for j in range(h):
                            src = codes[t, g, j]
                            dst_lo, dst_hi = out[base + j, tt * TILE:], out[base + h + j, tt * TILE:]
                            for i in range(TILE):
                                b = np.int32(src[i])
                                dst_lo[i] = s[i] * np.float32(np.int32(b & low)) + z[i]
                                dst_hi[i] = s[i] * np.float32(np.int32(b >> shift)) + z[i]
                    else:
                        for j in range(group_size):
                            src, dst = codes[t, g, j], out[base + j, tt * TILE:]
                            for i in range(TILE):
                                dst[i] = s[i] * np.float32(np.int32(src[i])) + z[i]

    return dequant


def _fp16_words(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def _kernel_args(qw: QuantizedWeight) -> tuple[Callable, Callable, tuple]:
    """The matvec and dequant kernels of ``qw``'s form and its arrays as numpy views,
    made once per weight (kept in ``qw``'s own cache: a call then costs a few µs)."""
    cached = qw.kernel_cache.get("numba")
    if cached is not None:
        return cached
    unused = np.zeros((1, 1, 1), np.uint16)  # super-block factors of a flat weight
    if qw.super_groups:
        scale, zero = qw.scale.numpy(), None if qw.zero is None else qw.zero.numpy()
        zero_form = NO_ZERO if zero is None else SUPER_ZERO
        supers = (_fp16_words(qw.super_scale), unused if qw.super_zero is None else _fp16_words(qw.super_zero))
    else:
        scale, zero = _fp16_words(qw.scale), None if qw.zero is None else _fp16_words(qw.zero)
        zero_form = NO_ZERO if zero is None else FLAT_ZERO
        supers = (unused, unused)
    if zero is None:
        zero = np.zeros((1, 1, 1), scale.dtype)
    key = (qw.bits, qw.group_size, qw.super_groups, zero_form)
    cached = (_matvec_kernel(*key), _dequant_kernel(*key), (qw.codes.numpy(), scale, zero) + supers)
    qw.kernel_cache["numba"] = cached
    return cached


def qlinear_numba(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`qlinear` on CPU tensors with the compiled kernels (same signature and result as
    `qlinear_torch` up to fp32 summation order)."""
    check_linear_args(x, qw, bias)
    if x.device.type != "cpu" or qw.device.type != "cpu":
        raise ValueError("the numba qlinear kernels need CPU tensors")
    return product(x, qw, bias)


def product(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """`qlinear_numba` without its checks (`qlinear` made them)."""
    matvec, dequant, arrays = _kernel_args(qw)
    threads = kernel_threads()
    n, tokens, tiles = qw.out_features, x.shape[0], qw.tiles
    xf = x.detach()
    xf = xf if xf.dtype == torch.float32 and xf.is_contiguous() else xf.float().contiguous()
    if tokens <= MATVEC_TOKENS:
        xs, outs = xf.numpy(), np.empty((tokens, n), np.float32)
        chunks = min(tiles, CHUNKS_PER_THREAD * threads)
        for t in range(tokens):
            matvec(xs[t], *arrays, chunks, outs[t])
        out = torch.from_numpy(outs)
    else:
        width = qw.num_groups * qw.group_size  # in_features rounded up to whole groups
        if width == qw.in_features:
            padded = xf
        else:
            padded = torch.zeros(tokens, width)
            padded[:, :qw.in_features] = xf
        step = max(1, TILE_FLOATS // (width * TILE))  # tiles per widened block
        threads_chunks = CHUNKS_PER_THREAD * threads
        if step >= tiles:  # the whole matrix in one block: the product writes the output itself
            w = torch.empty(width, tiles * TILE)
            dequant(*arrays, 0, min(tiles, threads_chunks), w.numpy())
            out = padded @ w
        else:
            out = torch.empty(tokens, tiles * TILE)
            block = torch.empty(width, step * TILE)
            for t0 in range(0, tiles, step):
                count = min(step, tiles - t0)
                w = block[:, :count * TILE]
                dequant(*arrays, t0, min(count, threads_chunks), w.numpy())
                out[:, t0 * TILE:(t0 + count) * TILE] = padded @ w
        out = out[:, :n]
    if bias is not None:
        out = out + bias.float()
    return out if x.dtype == torch.float32 else out.to(x.dtype)
