"""Triton kernels of `edgekv.kernels.block_score` (same signatures as the torch twins).

`score_blocks_triton`: grid ``(num_kv_heads, ceil(num_blocks / BLOCKS_PER_PROG))``, the
whole layer in one launch. A program holds its KV head's query group ``[BLOCK_H, D]``
(padded to 16 rows for ``tl.dot``) and, per block, reads only the K codes and K
scale/zero of the row (whole row or key copy), dequantizes them in registers, takes
``q @ k^T`` and reduces it to one fp32 number.

`bound_scores_triton`: grid ``(num_kv_heads, ceil(num_blocks / BLOCK_B))``;
``relu(q) @ kmax^T + min(q, 0) @ kmin^T`` on ``BLOCK_B`` blocks per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgekv.quant import BlockCodec

from ._backend import (FP_FUSION, aligned_rows, check_triton_device, dot_dtype, is_interpreted, next_pow2, row_offsets,
                       tile_layout)
from ._tl_blocks import load_k_tile, mma
from .block_score import check_bound_args, check_combine, query_group

BLOCKS_PER_PROG = 4  # blocks scored by one program of the key scorer
BOUND_BLOCKS = 32  # blocks scored by one program of the bound scorer


@triton.jit(do_not_specialize=["num_blocks"])
def _score_kernel(q_ptr, rows_ptr, out_ptr, num_blocks, stride_qh, stride_rh, stride_rb, stride_oh,
                  GROUP_Q: tl.constexpr, COMBINE_MAX: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  BITS: tl.constexpr, CPB: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  VGROUP: tl.constexpr, NUM_VGROUPS: tl.constexpr, CODE_BYTES: tl.constexpr,
                  K_OFF: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr, KZ_OFF: tl.constexpr,
                  VS_OFF: tl.constexpr, VZ_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_DJ: tl.constexpr):
    h = tl.program_id(0)
    first = tl.program_id(1) * BLOCKS_PER_PROG
    g = tl.arange(0, BLOCK_H)
    g_mask = g < GROUP_Q
    c = tl.arange(0, BLOCK_D)
    c_mask = c < HEAD_DIM
    q = tl.load(q_ptr + (h * GROUP_Q + g)[:, None] * stride_qh + c[None, :],
                mask=g_mask[:, None] & c_mask[None, :], other=0.0)
    t = tl.arange(0, BLOCK_T)
    t_mask = t < BLOCK_SIZE
    for i in tl.static_range(BLOCKS_PER_PROG):
        b = first + i
        if b < num_blocks:
            row = rows_ptr + h.to(tl.int64) * stride_rh + b.to(tl.int64) * stride_rb
            k = load_k_tile(row, t, t_mask, c, c_mask, BITS, CPB, HEAD_DIM, K_OFF, KS_OFF, KZ_OFF,
                            BLOCK_T, BLOCK_DJ)  # [BLOCK_T, BLOCK_D] fp32
            s = mma(q, tl.trans(k), DOT_DTYPE, IEEE)  # [BLOCK_H, BLOCK_T]
            if COMBINE_MAX:
                per_token = tl.max(tl.where(g_mask[:, None], s, float("-inf")), axis=0)
            else:
                per_token = tl.sum(s, axis=0)  # padded query rows are 0
            per_token = tl.where(t_mask, per_token, float("-inf"))
            tl.store(out_ptr + h * stride_oh + b, tl.max(per_token, axis=0))


@triton.jit(do_not_specialize=["num_blocks"])
def _bound_kernel(q_ptr, kmin_ptr, kmax_ptr, out_ptr, num_blocks, stride_qh, stride_nh, stride_nb,
                  stride_xh, stride_xb, stride_oh, GROUP_Q: tl.constexpr, COMBINE_MAX: tl.constexpr,
                  HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    h = tl.program_id(0)
    bb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = bb < num_blocks
    g = tl.arange(0, BLOCK_H)
    g_mask = g < GROUP_Q
    c = tl.arange(0, BLOCK_D)
    c_mask = c < HEAD_DIM
    q = tl.load(q_ptr + (h * GROUP_Q + g)[:, None] * stride_qh + c[None, :],
                mask=g_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    m2 = b_mask[:, None] & c_mask[None, :]
    hb = h.to(tl.int64)
    kmin = tl.load(kmin_ptr + hb * stride_nh + bb[:, None] * stride_nb + c[None, :], mask=m2, other=0.0)
    kmax = tl.load(kmax_ptr + hb * stride_xh + bb[:, None] * stride_xb + c[None, :], mask=m2, other=0.0)
    s = mma(tl.maximum(q, 0.0), tl.trans(kmax), DOT_DTYPE, IEEE)  # [BLOCK_H, BLOCK_B]
    s += mma(tl.minimum(q, 0.0), tl.trans(kmin), DOT_DTYPE, IEEE)
    if COMBINE_MAX:
        out = tl.max(tl.where(g_mask[:, None], s, float("-inf")), axis=0)
    else:
        out = tl.sum(s, axis=0)
    tl.store(out_ptr + h * stride_oh + bb, out, mask=b_mask)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def score_blocks_triton(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, *,
                        combine: str = "max") -> torch.Tensor:
    """Triton twin of `edgekv.kernels.block_score.score_blocks_torch` (one launch)."""
    check_combine(combine)
    width = rows.shape[-1] if rows.dim() else 0
    row_offsets(codec, width)  # whole rows or key copies, else a clear error
    rows = aligned_rows(rows, codec, 3, width)
    hkv, nb = rows.shape[0], rows.shape[1]
    group = query_group(q, hkv, codec.head_dim)
    check_triton_device(_score_kernel, q, rows)
    q = _last_contiguous(q)
    out = torch.empty(hkv, nb, dtype=torch.float32, device=q.device)
    if nb == 0:
        return out
    layout = tile_layout(codec, key_copy=width != codec.row_bytes)
    dot = dot_dtype(q.dtype, is_interpreted(_score_kernel))
    grid = (hkv, triton.cdiv(nb, BLOCKS_PER_PROG))
    _score_kernel[grid](
        q, rows, out, nb, q.stride(0), rows.stride(0), rows.stride(1), out.stride(0),
        GROUP_Q=group, COMBINE_MAX=combine == "max", BLOCKS_PER_PROG=BLOCKS_PER_PROG,
        DOT_DTYPE=dot, IEEE=dot == tl.float32, BLOCK_H=max(16, next_pow2(group)),
        BLOCK_D=layout["BLOCK_DJ"] * layout["CPB"], **layout, enable_fp_fusion=FP_FUSION)
    return out


def bound_scores_triton(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *,
                        combine: str = "max") -> torch.Tensor:
    """Triton twin of `edgekv.kernels.block_score.bound_scores_torch` (one launch)."""
    hkv, nb, d, group = check_bound_args(q, kmin, kmax, combine)
    check_triton_device(_bound_kernel, q, kmin, kmax)
    q, kmin, kmax = (_last_contiguous(x) for x in (q, kmin, kmax))
    out = torch.empty(hkv, nb, dtype=torch.float32, device=q.device)
    if nb == 0:
        return out
    dot = tl.float16 if q.dtype == kmin.dtype == kmax.dtype == torch.float16 else tl.float32
    grid = (hkv, triton.cdiv(nb, BOUND_BLOCKS))
    _bound_kernel[grid](
        q, kmin, kmax, out, nb, q.stride(0), kmin.stride(0), kmin.stride(1), kmax.stride(0),
        kmax.stride(1), out.stride(0), GROUP_Q=group, COMBINE_MAX=combine == "max", HEAD_DIM=d,
        DOT_DTYPE=dot, IEEE=dot == tl.float32, BLOCK_H=max(16, next_pow2(group)),
        BLOCK_D=max(16, next_pow2(d)), BLOCK_B=BOUND_BLOCKS, enable_fp_fusion=FP_FUSION)
    return out
