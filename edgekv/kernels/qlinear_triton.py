r"""Triton kernels of `edgekv.kernels.qlinear.qlinear` (CUDA; Triton's interpreter on a CPU).

A few tokens (a decode step, bound by reading the weights): `_qmatmul_kernel`, one
program per tile of 32 rows and block of ``BLOCK_M`` tokens, walks the groups of the
input dimension and decodes the tile's codes in registers; nothing is written back but
the output::

    for each group g of group_size columns:
        x_lo, x_hi = x[:, g*gs : g*gs + gs/2], x[:, g*gs + gs/2 : (g+1)*gs]   [BLOCK_M, gs/2]
        codes      = tile's bytes of group g                                   [gs/2, 32]
        w_lo = (codes & 15) * scale + zero,  w_hi = (codes >> 4) * scale + zero   [gs/2, 32]
        acc += x_lo @ w_lo + x_hi @ w_hi                                       [BLOCK_M, 32] fp32
    (8 bits: one [gs, 32] tile of signed codes; K-quant forms: scale = super_scale * scale_int)

More tokens (a prefill chunk, bound by arithmetic): `_dequant_kernel` decodes the matrix
once into the activations' dtype and torch's matrix product (cuBLAS) multiplies it.
Dot operands are the activations' dtype (tensor cores for fp16/bf16), accumulation fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import FP_FUSION, check_triton_device, dot_dtype, is_interpreted
from ._tl_blocks import mma
from .qlinear import TILE, QuantizedWeight, check_linear_args

MATMUL_TOKENS = 16  # up to this many tokens run the fused kernel; more widen the weights


@triton.jit
def _group_params(scale_ptr, zero_ptr, sscale_ptr, szero_ptr, t, g, lanes, G, S,
                  SUPER: tl.constexpr, HAS_ZERO: tl.constexpr, SUPER_GROUPS: tl.constexpr):
    """fp32 scale and zero [32] of tile t, group g (zero 0 when symmetric)."""
    base = (t * G + g) * 32
    scale = tl.load(scale_ptr + base + lanes).to(tl.float32)
    zero = tl.zeros([32], tl.float32)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + base + lanes).to(tl.float32)
    if SUPER:
        sbase = (t * S + g // SUPER_GROUPS) * 32
        scale = scale * tl.load(sscale_ptr + sbase + lanes).to(tl.float32)
        if HAS_ZERO:
            zero = zero * tl.load(szero_ptr + sbase + lanes).to(tl.float32)
    return scale, zero


@triton.jit
def _qmatmul_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, sscale_ptr, szero_ptr, out_ptr,
                    T, N, K, G, S, stride_xt, stride_ot,
                    BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_ZERO: tl.constexpr,
                    SUPER_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # row tile
    mb = tl.program_id(1)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < T
    lanes = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_M, 32], tl.float32)
    if BITS == 4:
        j = tl.arange(0, GROUP // 2)
        for g in range(G):
            scale, zero = _group_params(scale_ptr, zero_ptr, sscale_ptr, szero_ptr, t, g, lanes, G, S,
                                        SUPER, HAS_ZERO, SUPER_GROUPS)
            codes = tl.load(codes_ptr + ((t * G + g) * (GROUP // 2) + j)[:, None] * 32 + lanes[None, :])  # [gs/2, 32]
            w_lo = (codes & 15).to(tl.float32) * scale[None, :] + zero[None, :]
            w_hi = (codes >> 4).to(tl.float32) * scale[None, :] + zero[None, :]
            col = g * GROUP + j
            x_lo = tl.load(x_ptr + m[:, None] * stride_xt + col[None, :],
                           mask=m_mask[:, None] & (col < K)[None, :], other=0.0)
            x_hi = tl.load(x_ptr + m[:, None] * stride_xt + (col + GROUP // 2)[None, :],
                           mask=m_mask[:, None] & (col + GROUP // 2 < K)[None, :], other=0.0)
            acc += mma(x_lo.to(DOT_DTYPE), w_lo.to(DOT_DTYPE), DOT_DTYPE, IEEE)
            acc += mma(x_hi.to(DOT_DTYPE), w_hi.to(DOT_DTYPE), DOT_DTYPE, IEEE)
    else:
        j = tl.arange(0, GROUP)
        for g in range(G):
            scale, zero = _group_params(scale_ptr, zero_ptr, sscale_ptr, szero_ptr, t, g, lanes, G, S,
                                        SUPER, HAS_ZERO, SUPER_GROUPS)
            codes = tl.load(codes_ptr + ((t * G + g) * GROUP + j)[:, None] * 32 + lanes[None, :])  # [GROUP, 32] i8
            w = codes.to(tl.float32) * scale[None, :] + zero[None, :]
            col = g * GROUP + j
            xg = tl.load(x_ptr + m[:, None] * stride_xt + col[None, :],
                         mask=m_mask[:, None] & (col < K)[None, :], other=0.0)
            acc += mma(xg.to(DOT_DTYPE), w.to(DOT_DTYPE), DOT_DTYPE, IEEE)
    n = t * 32 + lanes
    tl.store(out_ptr + m[:, None] * stride_ot + n[None, :], acc, mask=m_mask[:, None] & (n < N)[None, :])


@triton.jit
def _dequant_kernel(codes_ptr, scale_ptr, zero_ptr, sscale_ptr, szero_ptr, w_ptr, N, K, G, S, stride_wn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_ZERO: tl.constexpr,
                    SUPER_GROUPS: tl.constexpr):
    """W[n, k] (in w's dtype) of tile t, group g: program (t, g)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lanes = tl.arange(0, 32)
    n = t * 32 + lanes
    scale, zero = _group_params(scale_ptr, zero_ptr, sscale_ptr, szero_ptr, t, g, lanes, G, S,
                                SUPER, HAS_ZERO, SUPER_GROUPS)
    if BITS == 4:
        j = tl.arange(0, GROUP // 2)
        codes = tl.load(codes_ptr + ((t * G + g) * (GROUP // 2) + j)[:, None] * 32 + lanes[None, :])
        col = g * GROUP + j
        mask = (col < K)[:, None] & (n < N)[None, :]
        out = w_ptr + n[None, :] * stride_wn
        tl.store(out + col[:, None], ((codes & 15).to(tl.float32) * scale[None, :] + zero[None, :])
                 .to(w_ptr.dtype.element_ty), mask=mask)
        mask_hi = (col + GROUP // 2 < K)[:, None] & (n < N)[None, :]
        tl.store(out + (col + GROUP // 2)[:, None], ((codes >> 4).to(tl.float32) * scale[None, :] + zero[None, :])
                 .to(w_ptr.dtype.element_ty), mask=mask_hi)
    else:
        j = tl.arange(0, GROUP)
        codes = tl.load(codes_ptr + ((t * G + g) * GROUP + j)[:, None] * 32 + lanes[None, :])
        col = g * GROUP + j
        tl.store(w_ptr + n[None, :] * stride_wn + col[:, None],
                 (codes.to(tl.float32) * scale[None, :] + zero[None, :]).to(w_ptr.dtype.element_ty),
                 mask=(col < K)[:, None] & (n < N)[None, :])


def _weight_args(qw: QuantizedWeight) -> tuple[tuple, dict]:
    """The weight's tensors (stand-ins where absent) and the form's constants."""
    zero = qw.zero if qw.zero is not None else qw.scale
    sscale = qw.super_scale if qw.super_scale is not None else qw.scale
    szero = qw.super_zero if qw.super_zero is not None else sscale
    supers = qw.super_scale.shape[1] if qw.super_scale is not None else 1
    return ((qw.codes, qw.scale, zero, sscale, szero), supers,
            dict(BITS=qw.bits, GROUP=qw.group_size, SUPER=qw.super_groups > 0, HAS_ZERO=qw.zero is not None,
                 SUPER_GROUPS=max(qw.super_groups, 1)))


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W [out_features, in_features]`` in ``dtype``, decoded by `_dequant_kernel`."""
    tensors, supers, form = _weight_args(qw)
    check_triton_device(_dequant_kernel, *tensors)
    w = torch.empty(qw.out_features, qw.in_features, dtype=dtype, device=qw.device)
    _dequant_kernel[(qw.tiles, qw.num_groups)](*tensors, w, qw.out_features, qw.in_features, qw.num_groups,
                                                 supers, w.stride(0), **form, enable_fp_fusion=FP_FUSION)
    return w


def qlinear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `edgekv.kernels.qlinear.qlinear_torch`: up to `MATMUL_TOKENS` tokens
    through the fused kernel, more through the decoded matrix and torch's product."""
    check_linear_args(x, qw, bias)
    tokens = x.shape[0]
    if tokens > MATMUL_TOKENS:
        w = dequantize_triton(qw, x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32)
        y = F.linear(x.to(w.dtype), w).float()
    else:
        tensors, supers, form = _weight_args(qw)
        check_triton_device(_qmatmul_kernel, x, *tensors)
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = torch.empty(tokens, qw.out_features, dtype=torch.float32, device=x.device)
        dot = dot_dtype(x.dtype, is_interpreted(_qmatmul_kernel))
        block_m = 16
        _qmatmul_kernel[(qw.tiles, triton.cdiv(tokens, block_m))](
            x, *tensors, y, tokens, qw.out_features, qw.in_features, qw.num_groups, supers,
            x.stride(0), y.stride(0), **form, BLOCK_M=block_m, DOT_DTYPE=dot, IEEE=dot == tl.float32,
            enable_fp_fusion=FP_FUSION)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


__all__ = ["MATMUL_TOKENS", "TILE", "dequantize_triton", "qlinear_triton"]
