"""Triton helpers shared by the kernels: reading and writing `BlockCodec` rows in registers.

A row is addressed through two pointers to the same bytes: ``row_ptr`` (uint8, for the
packed codes) and ``row_ptr`` cast to fp16 (for the scale/zero segments and raw 16-bit
rows). The layout constants (``K_OFF`` … ``VZ_OFF``, ``CPB``, ``BLOCK_DJ``) come from
`edgekv.kernels._backend.tile_layout`.

Codes of one token are unpacked as a ``[BLOCK_DJ, CPB]`` grid of (byte, slot) pairs and
reshaped row-major to ``BLOCK_DJ * CPB`` channels: channel ``c = byte * CPB + slot``,
which is exactly the codec's order (code ``i`` lives in byte ``i // CPB`` at bit
``BITS * (i % CPB)``) because each token's codes start on a byte boundary
(``head_dim % CPB == 0``). A range of key channels starting at a multiple of ``CPB``
(`load_k_channels`, e.g. one half of the head for RoPE) is the same grid started
``C0 // CPB`` bytes into each token's codes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_codes(seg_ptr, t, t_mask, BITS: tl.constexpr, CPB: tl.constexpr, DJ: tl.constexpr,
                 NJ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DJ: tl.constexpr):
    """Codes of tokens ``t: [BLOCK_T]`` of one packed segment, as fp32
    ``[BLOCK_T, BLOCK_DJ * CPB]``: ``NJ`` bytes per token starting at ``seg_ptr`` (uint8;
    the segment's start, or a byte inside each token's codes for a channel range), tokens
    ``DJ`` bytes apart; masked tokens and padding channels read 0."""
    j = tl.arange(0, BLOCK_DJ)
    m = t_mask[:, None] & (j < NJ)[None, :]
    b = tl.load(seg_ptr + t[:, None] * DJ + j[None, :], mask=m, other=0).to(tl.int32)
    if CPB == 1:
        codes = b
    else:
        shifts = tl.arange(0, CPB) * BITS
        codes = (b[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, [BLOCK_T, BLOCK_DJ * CPB])
    return codes.to(tl.float32)


@triton.jit
def load_k_tile(row_ptr, t, t_mask, c, c_mask,
                BITS: tl.constexpr, CPB: tl.constexpr, HEAD_DIM: tl.constexpr, K_OFF: tl.constexpr,
                KS_OFF: tl.constexpr, KZ_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_DJ: tl.constexpr):
    """Keys of tokens ``t`` of one row, dequantized: fp32 ``[BLOCK_T, BLOCK_D]``
    (``k = code * k_scale[c] + k_zero[c]``; raw fp16 at 16 bits); masked entries are 0."""
    return load_k_channels(row_ptr, t, t_mask, c, c_mask, 0, HEAD_DIM, BITS, CPB, HEAD_DIM, K_OFF,
                           KS_OFF, KZ_OFF, BLOCK_T, BLOCK_DJ)


@triton.jit
def load_k_channels(row_ptr, t, t_mask, c, c_mask, C0: tl.constexpr, NC: tl.constexpr,
                    BITS: tl.constexpr, CPB: tl.constexpr, HEAD_DIM: tl.constexpr, K_OFF: tl.constexpr,
                    KS_OFF: tl.constexpr, KZ_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_DJ: tl.constexpr):
    """Key channels ``C0 .. C0 + NC - 1`` of tokens ``t`` of one row, dequantized: fp32
    ``[BLOCK_T, BLOCK_DJ * CPB]`` whose column ``c`` is channel ``C0 + c`` (``c_mask``:
    ``c < NC``); masked entries are 0. ``C0`` and ``NC`` must be multiples of ``CPB``
    (whole code bytes)."""
    row16 = row_ptr.to(tl.pointer_type(tl.float16))
    if BITS == 16:
        m = t_mask[:, None] & c_mask[None, :]
        k = tl.load(row16 + K_OFF // 2 + C0 + t[:, None] * HEAD_DIM + c[None, :], mask=m, other=0.0)
        k = k.to(tl.float32)
    else:
        codes = unpack_codes(row_ptr + K_OFF + C0 // CPB, t, t_mask, BITS, CPB, HEAD_DIM // CPB, NC // CPB,
                             BLOCK_T, BLOCK_DJ)
        ks = tl.load(row16 + KS_OFF + C0 + c, mask=c_mask, other=0.0).to(tl.float32)
        kz = tl.load(row16 + KZ_OFF + C0 + c, mask=c_mask, other=0.0).to(tl.float32)
        k = codes * ks[None, :] + kz[None, :]
    return k


@triton.jit
def load_v_tile(row_ptr, t, t_mask, c, c_mask,
                BITS: tl.constexpr, CPB: tl.constexpr, HEAD_DIM: tl.constexpr, V_OFF: tl.constexpr,
                VS_OFF: tl.constexpr, VZ_OFF: tl.constexpr, VGROUP: tl.constexpr,
                NUM_VGROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DJ: tl.constexpr):
    """Values of tokens ``t`` of one row, dequantized: fp32 ``[BLOCK_T, BLOCK_D]``
    (``v = code * v_scale[t, c // VGROUP] + v_zero[t, c // VGROUP]``); masked entries 0."""
    row16 = row_ptr.to(tl.pointer_type(tl.float16))
    m = t_mask[:, None] & c_mask[None, :]
    if BITS == 16:
        v = tl.load(row16 + V_OFF // 2 + t[:, None] * HEAD_DIM + c[None, :], mask=m, other=0.0)
        v = v.to(tl.float32)
    else:
        codes = unpack_codes(row_ptr + V_OFF, t, t_mask, BITS, CPB, HEAD_DIM // CPB, HEAD_DIM // CPB,
                             BLOCK_T, BLOCK_DJ)
        g = t[:, None] * NUM_VGROUPS + (c // VGROUP)[None, :]
        vs = tl.load(row16 + VS_OFF + g, mask=m, other=0.0).to(tl.float32)
        vz = tl.load(row16 + VZ_OFF + g, mask=m, other=0.0).to(tl.float32)
        v = codes * vs + vz
    return v


# ---- fp16 rounding, bit-exact with edgekv.quant --------------------------------------------


@triton.jit
def f16_step(h, DIRECTION: tl.constexpr):
    """The fp16 neighbour of each finite ``h`` one step toward +inf (``DIRECTION=1``) or
    -inf (``-1``), by integer arithmetic on the bits (the codec's ``f16_step``)."""
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    order = tl.where(bits < 0, -(bits & 0x7FFF), bits) + DIRECTION
    out = tl.where(order < 0, -order - 32768, order)
    return out.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def round_down_f16(x):
    """fp32 -> the largest fp16 not above it."""
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) > x, f16_step(h, -1), h)


@triton.jit
def quant_grid(lo, hi, QMAX: tl.constexpr):
    """fp16 ``(scale, zero)`` of the codec for slices with fp32 range ``[lo, hi]``.

    ``zero`` = ``lo`` rounded down to fp16; ``scale`` = nearest fp16 to
    ``(hi - zero) / QMAX`` (IEEE division), one step up if ``scale * QMAX + zero < hi``
    (that product is exact in fp32 for ``QMAX <= 255``, so a fused multiply-add gives the
    same answer as the codec's two roundings).
    """
    zero = round_down_f16(lo)
    zf = zero.to(tl.float32)
    scale = tl.fdiv(hi - zf, QMAX + 0.0, ieee_rounding=True).to(tl.float16)
    short = scale.to(tl.float32) * QMAX + zf < hi
    scale = tl.where(short, f16_step(scale, 1), scale)
    return scale, zero


@triton.jit
def quant_codes(x, scale, zero, QMAX: tl.constexpr):
    """int32 codes ``round_half_even((x - zero) / scale)`` clamped to ``[0, QMAX]``
    (``scale == 0``, a constant slice, divides by 1); ``scale``/``zero`` fp16 broadcast
    against fp32 ``x``."""
    sf = scale.to(tl.float32)
    safe = tl.where(sf > 0, sf, 1.0)
    y = tl.fdiv(x - zero.to(tl.float32), safe, ieee_rounding=True)
    f = tl.floor(y)
    frac = y - f  # exact for y >= 0
    fi = f.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fi & 1) == 1))
    r = fi + up.to(tl.int32)
    return tl.minimum(tl.maximum(r, 0), QMAX)


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` with both operands cast to ``DOT_DTYPE`` and fp32 accumulation.

    ``IEEE`` (set for fp32 operands) asks for exact fp32 products instead of TF32;
    half-precision operands take the target's default (tensor cores).
    """
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
