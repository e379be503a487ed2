"""Compiled CPU kernel of `edgekv.kernels.sparse_attention.sparse_decode_attention` (numba).

One pass per KV head, block by block, with an online softmax (running max, sum and
weighted value sum per query head of the group), so the decoded keys and values of a
block live only in two small fp32 tiles:

    for each selected block j < num_valid[h]:
        k = code * k_scale + k_zero                    [B, D]   (per channel)
        k = rotate(k, positions of block_ids[h, j])    when the rows hold pre-RoPE keys
        v = code * v_scale[t, grp] + v_zero[t, grp]    [B, D]   (per token and group)
        s = sm_scale * q . k                           [G, B]   fold into (max, sum, acc)
    then the exact tail, the same way;  out = acc / sum

The rotation angle of token t of block b is ``(b*B + t) * inv_freq``, applied through
its cosine and sine; the wrapper gives them per block start and per offset t and the
kernel combines them by the angle-sum formulas, so no transcendental runs per token.
Same result as the twin up to fp32 rounding (the twin rounds ``position * inv_freq`` to
fp32 before its cosine, this kernel the two parts separately).

16-bit rows and head dims that codes straddle go to the twin.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit

from edgekv.quant import BlockCodec

from ._backend import aligned_rows
from .rope import rope_cos_sin
from .sparse_attention import check_attention_args, sparse_decode_attention_torch, valid_block_mask


@njit(fastmath=True, cache=True, nogil=True)
def fold(s, v, length, m, total, acc):
    """Fold scores s [G, >= length] and values v [>= length, D] into the running softmax."""
    group, d = s.shape[0], v.shape[1]
    for g in range(group):
        top = m[g]
        for t in range(length):
            top = max(top, s[g, t])
        if top == -np.inf:
            continue
        alpha = np.float32(np.exp(m[g] - top)) if m[g] != -np.inf else np.float32(0.0)
        total[g] *= alpha
        for c in range(d):
            acc[g, c] *= alpha
        for t in range(length):
            p = np.float32(np.exp(s[g, t] - top))
            total[g] += p
            for c in range(d):
                acc[g, c] += p * v[t, c]
        m[g] = top


@functools.cache
def _kernel(bits: int):
    """The attention kernel for one bit width (bits, codes per byte and mask are
    compile-time constants, so the unpacking loops unroll)."""
    cpb, mask = 8 // bits, (1 << bits) - 1

    @njit(fastmath=True, cache=True, nogil=True)
    def attend(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, num_valid, rotate,
               cos_block, sin_block, cos_offset, sin_offset, tail_k, tail_v, out):
        """q [H, G, D] f32 (pre-scaled); *_codes [H, K, >= B*D/cpb] u8; k_scale, k_zero [H, K, D];
        v_scale, v_zero [H, K, B, NG]; num_valid [H] i64; cos/sin_block [H, K, D/2] and
        cos/sin_offset [B, D/2] (used when rotate); tail_k, tail_v [H, L, D] f32; out [H, G, D]."""
        num_heads, group, d = q.shape
        block_size, half = cos_offset.shape[0], d // 2
        num_groups = v_scale.shape[3]
        value_group = d // num_groups
        k = np.empty((block_size, d), np.float32)
        v = np.empty((block_size, d), np.float32)
        s = np.empty((group, max(block_size, 64)), np.float32)
        m = np.empty(group, np.float32)
        total = np.empty(group, np.float32)
        acc = np.empty((group, d), np.float32)
        for h in range(num_heads):
            m[:] = -np.inf
            total[:] = 0.0
            acc[:] = 0.0
            for j in range(num_valid[h]):
                for t in range(block_size):  # keys: codes of token t, lowest bits first
                    for i in range(d // cpb):
                        byte = k_codes[h, j, t * (d // cpb) + i]
                        for b in range(cpb):
                            c = i * cpb + b
                            k[t, c] = np.float32((byte >> (bits * b)) & mask) * k_scale[h, j, c] + k_zero[h, j, c]
                if rotate:
                    for t in range(block_size):
                        for c in range(half):
                            cb, sb = cos_block[h, j, c], sin_block[h, j, c]
                            co, so = cos_offset[t, c], sin_offset[t, c]
                            ca, sa = cb * co - sb * so, sb * co + cb * so
                            x1, x2 = k[t, c], k[t, c + half]
                            k[t, c] = x1 * ca - x2 * sa
                            k[t, c + half] = x2 * ca + x1 * sa
                for g in range(group):
                    for t in range(block_size):
                        dot = np.float32(0.0)
                        for c in range(d):
                            dot += q[h, g, c] * k[t, c]
                        s[g, t] = dot
                for t in range(block_size):  # values: codes, then per token and channel group
                    for i in range(d // cpb):
                        byte = v_codes[h, j, t * (d // cpb) + i]
                        for b in range(cpb):
                            v[t, i * cpb + b] = np.float32((byte >> (bits * b)) & mask)
                    for grp in range(num_groups):
                        sc, zr = v_scale[h, j, t, grp], v_zero[h, j, t, grp]
                        for c in range(grp * value_group, (grp + 1) * value_group):
                            v[t, c] = v[t, c] * sc + zr
                fold(s, v, block_size, m, total, acc)
            chunk = s.shape[1]
            for start in range(0, tail_k.shape[1], chunk):
                n = min(chunk, tail_k.shape[1] - start)
                for g in range(group):
                    for t in range(n):
                        dot = np.float32(0.0)
                        for c in range(d):
                            dot += q[h, g, c] * tail_k[h, start + t, c]
                        s[g, t] = dot
                fold(s, tail_v[h, start:], n, m, total, acc)
            for g in range(group):
                for c in range(d):
                    out[h, g, c] = acc[g, c] / total[g] if total[g] > 0 else np.float32(0.0)

    return attend


def sparse_decode_attention_numba(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec,
                                  tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                                  num_valid: int | torch.Tensor | None = None,
                                  sm_scale: float | None = None,
                                  split_blocks: int | None = None, block_ids: torch.Tensor | None = None,
                                  rope_inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """`sparse_decode_attention` on CPU tensors with a compiled kernel (same signature and
    result as the twin; ``split_blocks`` is ignored)."""
    group = check_attention_args(q, rows, codec, tail_k, tail_v, block_ids, rope_inv_freq)
    hkv, ksel = rows.shape[0], rows.shape[1]
    b, d = codec.block_size, codec.head_dim
    if codec.bits == 16 or d % codec.codes_per_byte or d % 2:
        return sparse_decode_attention_torch(q, rows, codec, tail_k, tail_v, num_valid=num_valid, sm_scale=sm_scale,
                                             block_ids=block_ids, rope_inv_freq=rope_inv_freq)
    scale = d**-0.5 if sm_scale is None else sm_scale
    mask = valid_block_mask(num_valid, hkv, ksel, rows.device)  # the twin's check and meaning
    valid = torch.full((hkv,), ksel, dtype=torch.int64) if mask is None else mask.sum(dim=1)  # blocks per head
    rows = aligned_rows(rows, codec, 3)
    seg = {name: rows[..., s:e] for name, (s, e) in codec.offsets.items()}
    v_meta = (hkv, ksel, b, codec.num_groups)
    if block_ids is not None:
        cos_block, sin_block = rope_cos_sin(block_ids.to(torch.int64) * b, rope_inv_freq)  # [hkv, ksel, D/2]
        cos_offset, sin_offset = rope_cos_sin(torch.arange(b), rope_inv_freq)  # [B, D/2]
    else:
        cos_block = sin_block = torch.zeros(hkv, ksel, d // 2)
        cos_offset = sin_offset = torch.zeros(b, d // 2)
    out = torch.empty(hkv, group, d, dtype=torch.float32)
    _kernel(codec.bits)(
        (q.float().reshape(hkv, group, d) * scale).contiguous().numpy(),
        seg["k"].numpy(), seg["v"].numpy(),
        seg["k_scale"].view(torch.float16).float().numpy(), seg["k_zero"].view(torch.float16).float().numpy(),
        seg["v_scale"].view(torch.float16).float().reshape(v_meta).numpy(),
        seg["v_zero"].view(torch.float16).float().reshape(v_meta).numpy(),
        valid.numpy(), block_ids is not None,
        cos_block.contiguous().numpy(), sin_block.contiguous().numpy(),
        cos_offset.contiguous().numpy(), sin_offset.contiguous().numpy(),
        tail_k.float().contiguous().numpy(), tail_v.float().contiguous().numpy(), out.numpy())
    return out.view(hkv * group, d).to(q.dtype)
