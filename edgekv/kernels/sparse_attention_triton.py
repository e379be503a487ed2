r"""Triton flash-decoding over packed blocks + exact tail (`sparse_decode_attention_triton`).

Two launches: partials, then a log-sum-exp merge. Grid of the first: ``(num_kv_heads,
R + T)`` programs; the ``group`` query heads of KV head ``h`` are handled together
(padded to ``BLOCK_H >= 16`` rows for ``tl.dot``)::

    KV head h:   selected packed rows (sink + top-k)                 exact tail (model dtype)
                 [ blk 0 | blk 1 | blk 2 | blk 3 | ... | blk k-1 ]   [ t0 ............ tL-1 ]
                 |--- split 0 ---|--- split 1 ---| ... |- split R-1 -|  |- split R -|- R+1 -| ...
                         |               |                  |                |          |
    program (h, s):  for each of its blocks (s < R; blocks >= num_valid[h] skipped) or
                     tiles of BLOCK_T tail tokens (s >= R):
                     bytes -> codes -> k, v in registers (fp32) -> scores = q k^T (log2 units)
                     -> online softmax: running max m, sum l, acc = sum p v        (fp32)
                     keys before RoPE (block_ids, rope_inv_freq given; rows only, the tail
                     is rotated): row j's k as halves k1 = k[:, :H], k2 = k[:, H:] (H =
                     head_dim / 2), angles a[t, c] = (block_ids[h, j] * B + t) * inv_freq[c],
                     cos/sin in registers -> scores = q[:, :H] (k1 cos a - k2 sin a)^T
                                                    + q[:, H:] (k2 cos a + k1 sin a)^T
                         |               |                  |                |          |
                         v               v                  v                v          v
    fp32 scratch:    (o_0, lse_0)    (o_1, lse_1)   ...  (o_R-1, ..)      (o_R, ..)   (..)
                     o_s = acc / l,  lse_s = m + log2 l   (-1e30 when the split saw no token)
                         \_______________\_________________|________________/__________/
                                                           |
    merge (one program per query head):  M = max_s lse_s,  w_s = 2^(lse_s - M)
                                         out = sum_s w_s o_s / sum_s w_s   -> q's dtype

No dequantized copy of K or V is ever written to memory; accumulation is fp32. Dot
operands are fp32 (IEEE) for fp32 queries, fp16/bf16 (tensor cores, fp32 accumulate)
for half-precision queries (bf16 runs fp32 operands under the interpreter).

RoPE in the kernel needs each half of the head to start on a code byte: ``head_dim`` a
multiple of 2 * codes-per-byte (8 at 2 bits, 4 at 4 bits, 2 at 8/16 bits; every real
head dim is); other head dims raise ValueError (use the torch twin). cos/sin take the
twin's fp32 angle ``position * inv_freq``, reduced to ``[-pi, pi]`` first (`_cos_sin`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from edgekv.quant import BlockCodec

from ._backend import (FP_FUSION, aligned_rows, check_triton_device, dot_dtype, is_interpreted, next_pow2, num_sms,
                       tile_layout)
from ._tl_blocks import load_k_channels, load_k_tile, load_v_tile, mma
from .sparse_attention import check_attention_args, check_pooled_args

LOG2E = 1.4426950408889634
MERGE_SPLITS = 32  # splits read per step of the merge loop
# 2*pi = _TWO_PI_HI + _TWO_PI_LO (+ ~1e-15): the nearest fp32 and the fp32 remainder
_INV_TWO_PI = tl.constexpr(0.15915494309189535)
_TWO_PI_HI = tl.constexpr(6.2831854820251465)
_TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)


@triton.jit
def _cos_sin(a):
    """fp32 ``cos(a), sin(a)`` of fp32 angles ``a >= 0``, reduced to about ``[-pi, pi]``
    first: ``r = a - n * 2pi`` by two fused multiply-adds (the first is exact: ``a`` and
    ``n * HI`` are multiples of HI's ulp and ``|r| < 4``), within ~1.2e-7 of ``a mod 2pi``
    for angles up to ~4e6 (measured). On NVIDIA ``tl.cos``/``tl.sin`` are libdevice's
    accurate cosf/sinf, which take a slow (Payne-Hanek, local memory) branch above
    ``|x| ~ 1e5``, i.e. from position ~1e5 on; the reduced angle keeps them on the fast path."""
    n = tl.floor(a * _INV_TWO_PI + 0.5)
    r = tl.fma(-n, _TWO_PI_HI, a)
    r = tl.fma(-n, _TWO_PI_LO, r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _attend_tile(q, k, v, t_mask, m, l, acc, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over a tile of tokens.

    q: [BLOCK_H, BLOCK_D] (pre-scaled by sm_scale * log2 e, so scores are in log2 units);
    k, v: [BLOCK_T, BLOCK_D] (fp32 dequantized rows, or the tail's dtype); t_mask:
    [BLOCK_T]; m, l: [BLOCK_H] fp32; acc: [BLOCK_H, BLOCK_D] fp32.
    """
    s = mma(q, tl.trans(k), DOT_DTYPE, IEEE)  # [BLOCK_H, BLOCK_T]
    return _softmax_step(s, v, t_mask, m, l, acc, DOT_DTYPE, IEEE)


@triton.jit
def _softmax_step(s, v, t_mask, m, l, acc, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """The online-softmax update for scores ``s: [BLOCK_H, BLOCK_T]`` (log2 units) of a
    tile whose values are ``v``; see `_attend_tile`."""
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p, v, DOT_DTYPE, IEEE)
    return m_new, l, acc


@triton.jit(do_not_specialize=["k_selected", "tail_len", "num_row_splits", "split_blocks",
                               "tail_tiles", "nv_all"])
def _partial_kernel(q_ptr, rows_ptr, tk_ptr, tv_ptr, nv_ptr, o_ptr, lse_ptr, bid_ptr, freq_ptr,
                    slot_ptr, host_ptr,
                    k_selected, tail_len, num_row_splits, split_blocks, tail_tiles, nv_all, qk_scale,
                    stride_qh, stride_rh, stride_rb, stride_kh, stride_kt, stride_vh, stride_vt,
                    stride_oh, stride_os, stride_og, stride_lh, stride_ls, stride_bh, stride_bj,
                    stride_sh, stride_sj, stride_pool,
                    GROUP_Q: tl.constexpr, PER_HEAD_NV: tl.constexpr, SLOTS: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
                    BLOCK_HALF: tl.constexpr,
                    BITS: tl.constexpr, CPB: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    VGROUP: tl.constexpr, NUM_VGROUPS: tl.constexpr, CODE_BYTES: tl.constexpr,
                    K_OFF: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr, KZ_OFF: tl.constexpr,
                    VS_OFF: tl.constexpr, VZ_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_DJ: tl.constexpr):
    h = tl.program_id(0)
    split = tl.program_id(1)
    hb = h.to(tl.int64)
    g = tl.arange(0, BLOCK_H)
    g_mask = g < GROUP_Q
    c = tl.arange(0, BLOCK_D)
    c_mask = c < HEAD_DIM
    q = tl.load(q_ptr + (h * GROUP_Q + g)[:, None] * stride_qh + c[None, :],
                mask=g_mask[:, None] & c_mask[None, :], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(DOT_DTYPE)
    if ROPE:  # the query's halves (pre-rotated keys are dotted half by half) and inv_freq
        ch = tl.arange(0, BLOCK_HALF)
        ch_mask = ch < HALF
        q_half = q_ptr + (h * GROUP_Q + g)[:, None] * stride_qh + ch[None, :]
        qh_mask = g_mask[:, None] & ch_mask[None, :]
        q1 = (tl.load(q_half, mask=qh_mask, other=0.0).to(tl.float32) * qk_scale).to(DOT_DTYPE)
        q2 = (tl.load(q_half + HALF, mask=qh_mask, other=0.0).to(tl.float32) * qk_scale).to(DOT_DTYPE)
        inv_freq = tl.load(freq_ptr + ch, mask=ch_mask, other=0.0)
    m = tl.full([BLOCK_H], -1e30, tl.float32)  # finite start: a fully masked tile gives p = 0
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    t = tl.arange(0, BLOCK_T)
    if split < num_row_splits:
        if PER_HEAD_NV:
            nv = tl.minimum(tl.load(nv_ptr + h), k_selected)
        else:
            nv = tl.minimum(nv_all, k_selected)
        start = split * split_blocks
        end = tl.minimum(start + split_blocks, nv)
        t_mask = t < BLOCK_SIZE
        row = rows_ptr + hb * stride_rh + start.to(tl.int64) * stride_rb
        if ROPE:
            bid = bid_ptr + hb * stride_bh + start.to(tl.int64) * stride_bj  # block_ids[h, start]
        for j in range(start, end):
            if SLOTS:  # row j of head h is device-pool row slot, or host-pool row -1 - slot
                slot = tl.load(slot_ptr + hb * stride_sh + j * stride_sj).to(tl.int64)
                if slot >= 0:
                    row = rows_ptr + slot * stride_pool
                else:
                    row = host_ptr + (-1 - slot) * stride_pool
            if ROPE:
                k1 = load_k_channels(row, t, t_mask, ch, ch_mask, 0, HALF, BITS, CPB, HEAD_DIM, K_OFF,
                                     KS_OFF, KZ_OFF, BLOCK_T, BLOCK_HALF // CPB)  # [BLOCK_T, BLOCK_HALF]
                k2 = load_k_channels(row, t, t_mask, ch, ch_mask, HALF, HALF, BITS, CPB, HEAD_DIM, K_OFF,
                                     KS_OFF, KZ_OFF, BLOCK_T, BLOCK_HALF // CPB)
                v = load_v_tile(row, t, t_mask, c, c_mask, BITS, CPB, HEAD_DIM, V_OFF, VS_OFF, VZ_OFF,
                                VGROUP, NUM_VGROUPS, BLOCK_T, BLOCK_DJ)
                pos = (tl.load(bid).to(tl.int64) * BLOCK_SIZE + t).to(tl.float32)  # positions [BLOCK_T]
                cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :])  # [BLOCK_T, BLOCK_HALF]
                s = mma(q1, tl.trans(k1 * cos - k2 * sin), DOT_DTYPE, IEEE)
                s += mma(q2, tl.trans(k2 * cos + k1 * sin), DOT_DTYPE, IEEE)
                m, l, acc = _softmax_step(s, v, t_mask, m, l, acc, DOT_DTYPE, IEEE)
                bid += stride_bj
            else:
                k = load_k_tile(row, t, t_mask, c, c_mask, BITS, CPB, HEAD_DIM, K_OFF, KS_OFF, KZ_OFF,
                                BLOCK_T, BLOCK_DJ)
                v = load_v_tile(row, t, t_mask, c, c_mask, BITS, CPB, HEAD_DIM, V_OFF, VS_OFF, VZ_OFF,
                                VGROUP, NUM_VGROUPS, BLOCK_T, BLOCK_DJ)
                m, l, acc = _attend_tile(q, k, v, t_mask, m, l, acc, DOT_DTYPE, IEEE)
            row += stride_rb
    else:
        first = (split - num_row_splits) * tail_tiles * BLOCK_T
        for i in range(tail_tiles):
            tt = first + i * BLOCK_T + t
            t_mask = tt < tail_len
            m2 = t_mask[:, None] & c_mask[None, :]
            k = tl.load(tk_ptr + hb * stride_kh + tt[:, None] * stride_kt + c[None, :], mask=m2, other=0.0)
            v = tl.load(tv_ptr + hb * stride_vh + tt[:, None] * stride_vt + c[None, :], mask=m2, other=0.0)
            m, l, acc = _attend_tile(q, k, v, t_mask, m, l, acc, DOT_DTYPE, IEEE)
    seen = l > 0
    l_safe = tl.where(seen, l, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, m + tl.log2(l_safe), -1e30)
    base = hb * stride_oh + split * stride_os
    tl.store(o_ptr + base + g[:, None] * stride_og + c[None, :], o, mask=g_mask[:, None] & c_mask[None, :])
    tl.store(lse_ptr + hb * stride_lh + split * stride_ls + g, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(o_ptr, lse_ptr, out_ptr, num_splits, stride_oh, stride_os, stride_og,
                  stride_lh, stride_ls, stride_out, GROUP_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    hq = tl.program_id(0)
    h = hq // GROUP_Q
    g = hq % GROUP_Q
    c = tl.arange(0, BLOCK_D)
    c_mask = c < HEAD_DIM
    ss = tl.arange(0, BLOCK_S)
    lse_row = lse_ptr + h.to(tl.int64) * stride_lh + g
    o_row = o_ptr + h.to(tl.int64) * stride_oh + g * stride_og
    top = tl.max(tl.full([BLOCK_S], -1e30, tl.float32), axis=0)
    for s0 in range(0, num_splits, BLOCK_S):
        lse = tl.load(lse_row + (s0 + ss) * stride_ls, mask=s0 + ss < num_splits, other=float("-inf"))
        top = tl.maximum(top, tl.max(lse, axis=0))
    den = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_mask = s0 + ss < num_splits
        lse = tl.load(lse_row + (s0 + ss) * stride_ls, mask=s_mask, other=float("-inf"))
        w = tl.exp2(lse - top)  # [BLOCK_S]; empty splits: 2^(-1e30 - top) = 0 unless all are empty
        o = tl.load(o_row + (s0 + ss)[:, None] * stride_os + c[None, :],
                    mask=s_mask[:, None] & c_mask[None, :], other=0.0)
        den += tl.sum(w, axis=0)
        acc += tl.sum(w[:, None] * o, axis=0)
    tl.store(out_ptr + hq * stride_out + c, (acc / den).to(out_ptr.dtype.element_ty), mask=c_mask)


def default_split_blocks(k_selected: int, num_kv_heads: int, device: torch.device) -> int:
    """Blocks per split so that all splits together give about two programs per SM."""
    target = max(1, math.ceil(2 * num_sms(device) / max(1, num_kv_heads)))
    return max(1, math.ceil(k_selected / target))


def sparse_decode_attention_triton(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec,
                                   tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                                   num_valid: int | torch.Tensor | None = None,
                                   sm_scale: float | None = None,
                                   split_blocks: int | None = None, block_ids: torch.Tensor | None = None,
                                   rope_inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `edgekv.kernels.sparse_attention.sparse_decode_attention_torch`."""
    check_attention_args(q, rows, codec, tail_k, tail_v, block_ids, rope_inv_freq)
    rows = aligned_rows(rows, codec, 3)
    check_triton_device(_partial_kernel, rows)
    return _attend(q, codec, tail_k, tail_v, rows.shape[0], rows.shape[1], (rows, rows.stride(0), rows.stride(1)),
                   None, num_valid=num_valid, sm_scale=sm_scale, split_blocks=split_blocks, block_ids=block_ids,
                   rope_inv_freq=rope_inv_freq)


def pooled_decode_attention_triton(q: torch.Tensor, device_rows: torch.Tensor, host_rows: torch.Tensor,
                                   slots: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor,
                                   tail_v: torch.Tensor, *, num_valid: int | torch.Tensor | None = None,
                                   sm_scale: float | None = None, split_blocks: int | None = None,
                                   block_ids: torch.Tensor | None = None,
                                   rope_inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `edgekv.kernels.sparse_attention.pooled_decode_attention_torch`: each
    selected row read where it lies, in the device pool or (on a GPU, over the bus) in the
    pinned host pool."""
    check_pooled_args(device_rows, host_rows, slots, codec)
    check_triton_device(_partial_kernel, device_rows, slots)
    check_triton_device(_partial_kernel, host_rows, host_ok=True)
    hkv, ksel = slots.shape
    return _attend(q, codec, tail_k, tail_v, hkv, ksel, (device_rows, 0, 0), (slots, host_rows),
                   num_valid=num_valid, sm_scale=sm_scale, split_blocks=split_blocks, block_ids=block_ids,
                   rope_inv_freq=rope_inv_freq)


def _attend(q: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor, tail_v: torch.Tensor, hkv: int, ksel: int,
            rows: tuple, pooled: tuple | None, *, num_valid, sm_scale, split_blocks, block_ids,
            rope_inv_freq) -> torch.Tensor:
    """Launch the two kernels. rows: (tensor, head stride, block stride) of the rows as a
    [Hkv, ksel] grid, or of the device pool (strides unused) when pooled = (slots [Hkv,
    ksel] int, host pool) names each block's row."""
    if q.dim() != 2 or q.shape[0] % hkv:
        raise ValueError(f"q must be [num_heads, {codec.head_dim}] with num_heads a multiple of {hkv}")
    group = q.shape[0] // hkv
    rope = rope_inv_freq is not None
    if rope:
        if block_ids.dtype not in (torch.int32, torch.int64):
            block_ids = block_ids.to(torch.int64)
        rope_inv_freq = rope_inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    check_triton_device(_partial_kernel, q, tail_k, tail_v, *((block_ids, rope_inv_freq) if rope else ()))
    q, tail_k, tail_v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, tail_k, tail_v))
    tail_len = tail_k.shape[1]
    d = codec.head_dim
    layout = tile_layout(codec)
    if rope and d % (2 * layout["CPB"]):
        raise ValueError(f"keys before RoPE need head_dim ({d}) to be a multiple of {2 * layout['CPB']} in the "
                         f"Triton kernel at {codec.bits} bits (each half starts on a code byte); use backend='torch'")
    block_t = layout["BLOCK_T"]
    if split_blocks is None:
        split_blocks = default_split_blocks(ksel, hkv, q.device)
    if split_blocks < 1:
        raise ValueError(f"split_blocks must be >= 1 (got {split_blocks})")
    # a tail split covers about as many tokens as a row split, in whole tiles
    tail_tiles = max(1, split_blocks * codec.block_size // block_t)
    num_row_splits = triton.cdiv(ksel, split_blocks)
    num_tail_splits = triton.cdiv(tail_len, tail_tiles * block_t)
    if num_row_splits + num_tail_splits == 0:
        num_row_splits = 1  # one empty split: the merge writes zeros
    num_splits = num_row_splits + num_tail_splits

    per_head = isinstance(num_valid, torch.Tensor)
    if per_head:
        if num_valid.shape != (hkv,):
            raise ValueError(f"num_valid must be a [{hkv}] int tensor (got {tuple(num_valid.shape)})")
        nv_tensor = num_valid.to(device=q.device, dtype=torch.int32)
    nv_all = ksel if num_valid is None or per_head else int(num_valid)

    o_part = torch.empty(hkv, num_splits, group, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(hkv, num_splits, group, dtype=torch.float32, device=q.device)
    out = torch.empty(hkv * group, d, dtype=q.dtype, device=q.device)
    scale = d**-0.5 if sm_scale is None else sm_scale
    block_d = layout["BLOCK_DJ"] * layout["CPB"]
    dot = dot_dtype(q.dtype, is_interpreted(_partial_kernel))
    row_tensor, stride_rh, stride_rb = rows
    slots, host = pooled if pooled is not None else (lse, lse)
    _partial_kernel[(hkv, num_splits)](
        q, row_tensor, tail_k, tail_v, nv_tensor if per_head else lse, o_part, lse,
        block_ids if rope else lse, rope_inv_freq if rope else lse, slots, host,
        ksel, tail_len, num_row_splits, split_blocks, tail_tiles, nv_all, scale * LOG2E,
        q.stride(0), stride_rh, stride_rb, tail_k.stride(0), tail_k.stride(1),
        tail_v.stride(0), tail_v.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), *(block_ids.stride() if rope else (0, 0)),
        *(slots.stride() if pooled is not None else (0, 0)), codec.row_bytes,
        GROUP_Q=group, PER_HEAD_NV=per_head, SLOTS=pooled is not None, DOT_DTYPE=dot, IEEE=dot == tl.float32,
        BLOCK_H=max(16, next_pow2(group)), BLOCK_D=block_d, ROPE=rope, HALF=d // 2 if rope else 0,
        BLOCK_HALF=max(16, next_pow2(d // 2)) if rope else 16, **layout, enable_fp_fusion=FP_FUSION)
    _merge_kernel[(hkv * group,)](
        o_part, lse, out, num_splits, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), GROUP_Q=group, HEAD_DIM=d,
        BLOCK_D=max(16, next_pow2(d)), BLOCK_S=MERGE_SPLITS, enable_fp_fusion=FP_FUSION)
    return out
