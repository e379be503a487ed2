"""Triton kernel of `edgekv.kernels.compress` (`compress_blocks_triton`).

Grid ``(num_kv_heads, n)``: a program loads one block's K and V ``[BLOCK_T, BLOCK_D]``
(fp32 in registers), and writes its row::

    K: per-channel min/max over tokens ─> zero = min rounded down, scale ─> packed K codes
    V: per-token min/max over each group of VGROUP channels ─> scale, zero ─> packed V codes
    row = [ K codes | V codes | K scale | K zero | V scale | V zero ]   (16 bits: [K | V] fp16)

Bit-exact with `BlockCodec.encode`: the same fp16 rounding of zero (down) and scale
(nearest, bumped up if the grid falls short), IEEE division for the codes, round half
to even. One difference is possible in principle: a channel whose minimum is a signed
zero may get the other sign of zero than torch's ``amin`` picks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgekv.quant import BlockCodec

from ._backend import FP_FUSION, check_triton_device, tile_layout
from ._tl_blocks import quant_codes, quant_grid
from .compress import check_blocks


@triton.jit
def _store_codes(seg_ptr, codes, t_mask, BITS: tl.constexpr, CPB: tl.constexpr, DJ: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_DJ: tl.constexpr):
    """Pack int32 ``codes: [BLOCK_T, BLOCK_DJ * CPB]`` lowest bits first, ``CPB`` per byte,
    and store the ``DJ`` bytes of each unmasked token at ``seg_ptr + t * DJ``."""
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_DJ)
    if CPB == 1:
        packed = codes
    else:
        shifts = tl.arange(0, CPB) * BITS
        packed = tl.sum(tl.reshape(codes, [BLOCK_T, BLOCK_DJ, CPB]) << shifts[None, None, :], axis=2)
    tl.store(seg_ptr + t[:, None] * DJ + j[None, :], packed.to(tl.uint8),
             mask=t_mask[:, None] & (j < DJ)[None, :])


@triton.jit
def _compress_kernel(k_ptr, v_ptr, rows_ptr,
                     stride_kh, stride_kt, stride_vh, stride_vt, stride_rh, stride_rb,
                     QMAX: tl.constexpr, BLOCK_D: tl.constexpr,
                     BITS: tl.constexpr, CPB: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     VGROUP: tl.constexpr, NUM_VGROUPS: tl.constexpr, CODE_BYTES: tl.constexpr,
                     K_OFF: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr, KZ_OFF: tl.constexpr,
                     VS_OFF: tl.constexpr, VZ_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_DJ: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    t_mask = t < BLOCK_SIZE
    c = tl.arange(0, BLOCK_D)
    c_mask = c < HEAD_DIM
    m2 = t_mask[:, None] & c_mask[None, :]
    tok = b * BLOCK_SIZE + t
    k = tl.load(k_ptr + h * stride_kh + tok[:, None] * stride_kt + c[None, :], mask=m2, other=0.0)
    v = tl.load(v_ptr + h * stride_vh + tok[:, None] * stride_vt + c[None, :], mask=m2, other=0.0)
    k = k.to(tl.float32)
    v = v.to(tl.float32)

    # keys: per-channel range over the block's tokens
    lo = tl.where(c_mask, tl.min(tl.where(m2, k, float("inf")), axis=0), 0.0)  # [BLOCK_D]
    hi = tl.where(c_mask, tl.max(tl.where(m2, k, float("-inf")), axis=0), 0.0)

    row = rows_ptr + h * stride_rh + b * stride_rb
    row16 = row.to(tl.pointer_type(tl.float16))
    if BITS == 16:
        tl.store(row16 + K_OFF // 2 + t[:, None] * HEAD_DIM + c[None, :], k.to(tl.float16), mask=m2)
        tl.store(row16 + V_OFF // 2 + t[:, None] * HEAD_DIM + c[None, :], v.to(tl.float16), mask=m2)
    else:
        # keys: one (scale, zero) per channel
        k_scale, k_zero = quant_grid(lo, hi, QMAX)  # [BLOCK_D] fp16
        k_codes = quant_codes(k, k_scale[None, :], k_zero[None, :], QMAX)
        _store_codes(row + K_OFF, k_codes, t_mask, BITS, CPB, HEAD_DIM // CPB, BLOCK_T, BLOCK_DJ)
        tl.store(row16 + KS_OFF + c, k_scale, mask=c_mask)
        tl.store(row16 + KZ_OFF + c, k_zero, mask=c_mask)
        # values: one (scale, zero) per token and group of VGROUP channels
        v_scale = tl.zeros([BLOCK_T, BLOCK_D], tl.float16)
        v_zero = tl.zeros([BLOCK_T, BLOCK_D], tl.float16)
        for gi in tl.static_range(NUM_VGROUPS):
            in_group = (c // VGROUP == gi) & c_mask
            mg = t_mask[:, None] & in_group[None, :]
            g_lo = tl.where(t_mask, tl.min(tl.where(mg, v, float("inf")), axis=1), 0.0)  # [BLOCK_T]
            g_hi = tl.where(t_mask, tl.max(tl.where(mg, v, float("-inf")), axis=1), 0.0)
            g_scale, g_zero = quant_grid(g_lo, g_hi, QMAX)
            tl.store(row16 + VS_OFF + t * NUM_VGROUPS + gi, g_scale, mask=t_mask)
            tl.store(row16 + VZ_OFF + t * NUM_VGROUPS + gi, g_zero, mask=t_mask)
            v_scale = tl.where(in_group[None, :], g_scale[:, None], v_scale)
            v_zero = tl.where(in_group[None, :], g_zero[:, None], v_zero)
        v_codes = quant_codes(v, v_scale, v_zero, QMAX)
        _store_codes(row + V_OFF, v_codes, t_mask, BITS, CPB, HEAD_DIM // CPB, BLOCK_T, BLOCK_DJ)
        if CODE_BYTES > BLOCK_SIZE * (HEAD_DIM // CPB):  # the even-length pad byte of each code segment
            pad = BLOCK_SIZE * (HEAD_DIM // CPB) + tl.arange(0, 2)
            zeros = tl.zeros([2], tl.uint8)
            tl.store(row + K_OFF + pad, zeros, mask=pad < CODE_BYTES)
            tl.store(row + V_OFF + pad, zeros, mask=pad < CODE_BYTES)


def compress_blocks_triton(k: torch.Tensor, v: torch.Tensor, codec: BlockCodec) -> torch.Tensor:
    """Triton twin of `edgekv.kernels.compress.compress_blocks_torch` (one launch)."""
    hkv, n = check_blocks(k, v, codec)
    check_triton_device(_compress_kernel, k, v)
    rows = torch.empty(hkv, n, codec.row_bytes, dtype=torch.uint8, device=k.device)
    if n == 0:
        return rows
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    layout = tile_layout(codec)
    _compress_kernel[(hkv, n)](
        k, v, rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1), rows.stride(0), rows.stride(1),
        QMAX=(1 << codec.bits) - 1, BLOCK_D=layout["BLOCK_DJ"] * layout["CPB"], **layout, enable_fp_fusion=FP_FUSION)
    return rows
