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
its cosine and sine; the kernel reads them per block start (a table row per block) and
per offset t and combines them by the angle-sum formulas, so no transcendental runs per
token. Same result as the twin up to fp32 rounding (the twin rounds ``position *
inv_freq`` to fp32 before its cosine, this kernel the two parts separately).

Blocks are read through slot indices into a row pool (``pool[slots[h, j]]``), so a KV
cache can hand over its device cache as it lies instead of a gathered copy.

Two entry points share the kernel. `sparse_decode_attention_numba` is the checked
per-call function: it makes the table rows of the selected blocks each call and reads
``rows`` as a pool of its own. `NumbaSparseAttention` is what a KV cache builds once for
its decode steps: the table of every block start is made at construction, the exact
sink and tail are passed as arrays (the tail as its growable buffer and a length)
instead of being concatenated each step, and the rows are read in the device cache
(`edgekv bench kernels` and `edgekv bench speed` have the figures).

Each KV head's blocks are split into `kernel_threads` runs, attended in parallel, each
with its own running softmax (the exact tail goes with the first run), and the runs'
partial results merged per head (flash-decoding's split): a 10% selection at 8K has
only 3 KV heads of work on the embedded model, too few to spread over threads by head.
Scales and zeros are read as fp16 words in place (`numba_support`).

16-bit rows and head dims that codes straddle go to the twin.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit, prange

from edgekv.quant import BlockCodec

from ._backend import aligned_rows, tile_layout
from .numba_support import kernel_threads, widen_halves, words
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


@njit(fastmath=True, cache=True, nogil=True)
def fold_exact(q, sm_scale, h, keys, values, length, s, m, total, acc):
    """Fold the first `length` exact tokens of keys, values [H, >= length, D] of head h into
    the running softmax."""
    group, d = q.shape[1], q.shape[2]
    chunk = s.shape[1]
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        for g in range(group):
            for t in range(n):
                dot = np.float32(0.0)
                for c in range(d):
                    dot += q[h, g, c] * keys[h, start + t, c]
                s[g, t] = dot * sm_scale
        fold(s, values[h, start:], n, m, total, acc)


@njit(fastmath=True, cache=True, nogil=True)
def merge(part_max, part_sum, part_acc, out):
    """out [H, G, D] = the softmax-weighted merge of per-run partials (max, sum [H, R, G], acc [H, R, G, D])."""
    num_heads, runs, group = part_max.shape
    d = out.shape[2]
    for h in range(num_heads):
        for g in range(group):
            top = np.float32(-np.inf)
            for r in range(runs):
                top = max(top, part_max[h, r, g])
            total = np.float32(0.0)
            out[h, g, :] = 0.0
            for r in range(runs):
                if part_max[h, r, g] == -np.inf:
                    continue
                w = np.float32(np.exp(part_max[h, r, g] - top))
                total += w * part_sum[h, r, g]
                for c in range(d):
                    out[h, g, c] += w * part_acc[h, r, g, c]
            for c in range(d):
                out[h, g, c] = out[h, g, c] / total if total > 0 else np.float32(0.0)


@functools.cache
def _kernel(bits: int, d: int, block_size: int, num_groups: int):
    """The attention kernel for one row layout: bit width, head dim, block size and value
    groups are compile-time constants (so the unpacking loops unroll and the loops over a
    token's channels have fixed trip counts)."""
    cpb, mask = 8 // bits, (1 << bits) - 1
    half, value_group = d // 2, d // num_groups

    @njit(fastmath=True, cache=True, nogil=True, parallel=True)
    def attend(q, sm_scale, pool, words, slots, off, num_valid, rotate, start_index, cos_start, sin_start,
               cos_offset, sin_offset, sink_k, sink_v, tail_k, tail_v, tail_len, runs, basis, out):
        """q [H, G, D] f32 (scores are sm_scale * q . k); pool [P, W] u8 and words, the same
        bytes as u16: block j of head h is row slots[h, j] (i64 [H, K]); off: byte offsets
        of the K and V codes, word offsets of K scale, K zero, V scale, V zero (fp16 [D],
        [D], [B, NG], [B, NG]); num_valid [H] i64; when rotate, block j of head h starts at
        the angles of row start_index[h, j] of cos/sin_start [P, D/2], and cos/sin_offset
        [B, D/2] hold those of offsets 0..B-1; sink_k, sink_v [H, S, D] and the first
        tail_len tokens of tail_k, tail_v [H, >= tail_len, D] f32: the exact tokens; runs:
        blocks of a head split into this many parallel runs; basis f32 [D, D] or [0, 0]:
        when given, every output row x becomes x @ basis; out [H, G, D]."""
        num_heads, group = q.shape[0], q.shape[1]
        k_off, v_off, ks_w, kz_w, vs_w, vz_w = off[0], off[1], off[2], off[3], off[4], off[5]
        part_max = np.empty((num_heads, runs, group), np.float32)
        part_sum = np.zeros((num_heads, runs, group), np.float32)
        part_acc = np.zeros((num_heads, runs, group, d), np.float32)
        for item in prange(num_heads * runs):
            h, r = item // runs, item % runs
            k = np.empty((block_size, d), np.float32)
            v = np.empty((block_size, d), np.float32)
            s = np.empty((group, max(block_size, 64)), np.float32)
            k_scale_f, k_zero_f = np.empty(d, np.float32), np.empty(d, np.float32)
            v_scale_f = np.empty(block_size * num_groups, np.float32)
            v_zero_f = np.empty(block_size * num_groups, np.float32)
            m, total, acc = part_max[h, r], part_sum[h, r], part_acc[h, r]
            m[:] = -np.inf
            if r == 0:
                fold_exact(q, sm_scale, h, sink_k, sink_v, sink_k.shape[1], s, m, total, acc)
                fold_exact(q, sm_scale, h, tail_k, tail_v, tail_len, s, m, total, acc)
            for j in range(r * num_valid[h] // runs, (r + 1) * num_valid[h] // runs):
                row = slots[h, j]
                k_codes, v_codes = pool[row, k_off:], pool[row, v_off:]  # slices: see block_score_numba._nibble_kernel
                k_scale, k_zero = words[row, ks_w:], words[row, kz_w:]
                v_scale, v_zero = words[row, vs_w:], words[row, vz_w:]
                for t in range(block_size):  # keys: codes of token t, lowest bits first
                    for i in range(d // cpb):
                        byte = k_codes[t * (d // cpb) + i]
                        for b in range(cpb):
                            k[t, i * cpb + b] = np.float32((byte >> (bits * b)) & mask)
                widen_halves(k_scale, k_scale_f)
                widen_halves(k_zero, k_zero_f)
                for t in range(block_size):
                    for c in range(d):
                        k[t, c] = k[t, c] * k_scale_f[c] + k_zero_f[c]
                if rotate:
                    cos_b, sin_b = cos_start[start_index[h, j]], sin_start[start_index[h, j]]
                    for t in range(block_size):
                        for c in range(half):
                            cb, sb = cos_b[c], sin_b[c]
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
                        s[g, t] = dot * sm_scale
                widen_halves(v_scale, v_scale_f)
                widen_halves(v_zero, v_zero_f)
                for t in range(block_size):  # values: codes, then per token and channel group
                    for i in range(d // cpb):
                        byte = v_codes[t * (d // cpb) + i]
                        for b in range(cpb):
                            v[t, i * cpb + b] = np.float32((byte >> (bits * b)) & mask)
                    for grp in range(num_groups):
                        scale, zero = v_scale_f[t * num_groups + grp], v_zero_f[t * num_groups + grp]
                        for c in range(grp * value_group, (grp + 1) * value_group):
                            v[t, c] = v[t, c] * scale + zero
                fold(s, v, block_size, m, total, acc)
        merge(part_max, part_sum, part_acc, out)
        if basis.shape[0]:
            change_basis(out, basis)

    return attend


@njit(fastmath=True, cache=True, nogil=True)
def change_basis(out, basis):
    """out [H, G, D]: every row x replaced by x @ basis (f32 [D, D]), as sums of basis rows."""
    num_heads, group, d = out.shape
    x = np.empty(d, np.float32)
    for h in range(num_heads):
        for g in range(group):
            x[:] = out[h, g]
            out[h, g, :] = 0.0
            for j in range(d):
                xj = x[j]
                for c in range(d):
                    out[h, g, c] += xj * basis[j, c]


_NO_BASIS = np.zeros((0, 0), np.float32)


@functools.cache
def _layout(codec: BlockCodec) -> np.ndarray:
    """The kernel's ``off`` argument for rows of ``codec`` (read-only: shared by every call)."""
    t = tile_layout(codec)
    off = np.array([t[name] for name in ("K_OFF", "V_OFF", "KS_OFF", "KZ_OFF", "VS_OFF", "VZ_OFF")], dtype=np.int64)
    off.flags.writeable = False
    return off


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
    mask = valid_block_mask(num_valid, hkv, ksel, rows.device)  # the twin's check and meaning
    valid = torch.full((hkv,), ksel, dtype=torch.int64) if mask is None else mask.sum(dim=1)  # blocks per head
    if block_ids is not None:  # one table row per selected block
        cos_start, sin_start = rope_cos_sin(block_ids.to(torch.int64).reshape(-1) * b, rope_inv_freq)
        start_index = torch.arange(hkv * ksel).view(hkv, ksel)
        cos_offset, sin_offset = rope_cos_sin(torch.arange(b), rope_inv_freq)  # [B, D/2]
    else:
        cos_start = sin_start = cos_offset = sin_offset = torch.zeros(1, d // 2)
        start_index = torch.zeros(hkv, ksel, dtype=torch.int64)
    empty = torch.empty(hkv, 0, d)
    pool = aligned_rows(rows, codec, 3).reshape(hkv * ksel, codec.row_bytes)  # block j of head h: row h*ksel + j
    out = _attend(codec, q, d**-0.5 if sm_scale is None else sm_scale, pool, torch.arange(hkv * ksel).view(hkv, ksel),
                  valid.numpy(), block_ids is not None, start_index, cos_start, sin_start, cos_offset, sin_offset,
                  (empty, empty, tail_k, tail_v), tail_k.shape[1], _NO_BASIS)
    return out.view(hkv * group, d).to(q.dtype)


def _attend(codec: BlockCodec, q: torch.Tensor, sm_scale: float, pool: torch.Tensor, slots: torch.Tensor,
            num_valid: np.ndarray, rotate: bool, start_index: torch.Tensor, cos_start: torch.Tensor,
            sin_start: torch.Tensor, cos_offset: torch.Tensor, sin_offset: torch.Tensor,
            exact: tuple[torch.Tensor, ...], tail_len: int, basis: np.ndarray) -> torch.Tensor:
    """Run the kernel (arguments as `_kernel`'s, as tensors); returns [H, G, D] fp32."""
    hkv, d = slots.shape[0], codec.head_dim
    out = torch.empty(hkv, q.shape[0] // hkv, d, dtype=torch.float32)
    sink_k, sink_v, tail_k, tail_v = (t.float().contiguous().numpy() for t in exact)
    kernel = _kernel(codec.bits, d, codec.block_size, codec.num_groups)
    kernel(q.float().reshape(out.shape).contiguous().numpy(), sm_scale, pool.numpy(), words(pool),
           slots.contiguous().numpy(), _layout(codec), num_valid, rotate, start_index.contiguous().numpy(),
           cos_start.contiguous().numpy(), sin_start.contiguous().numpy(), cos_offset.contiguous().numpy(),
           sin_offset.contiguous().numpy(), sink_k, sink_v, tail_k, tail_v, tail_len, kernel_threads(), basis,
           out.numpy())
    return out


class NumbaSparseAttention:
    """`sparse_decode_attention` for one KV cache's decode steps on the CPU: pre-RoPE rows of
    ``codec`` at blocks below ``max_blocks``, with the rotation angles of every block start
    made once (the per-call wrapper makes those of the selected blocks each call) and the
    exact sink and tail passed apart (no concatenation per step); the blocks are read where
    they lie in a row pool (the store's device cache: no gathered copy). With
    ``value_basis`` R (values stored as v @ R, `edgekv.rotation`), outputs come back
    as out @ R.T, in the model's basis: done in the kernel, which is cheaper than a torch
    matmul per layer. No argument checks: the
    caller hands it rows from its own store."""

    def __init__(self, codec: BlockCodec, rope_inv_freq: torch.Tensor, max_blocks: int,
                 value_basis: torch.Tensor | None = None):
        if codec.bits == 16 or codec.head_dim % codec.codes_per_byte or codec.head_dim % 2:
            raise ValueError(f"no compiled sparse attention for {codec}")
        b, self.codec = codec.block_size, codec
        self.sm_scale = codec.head_dim**-0.5
        self.cos_start, self.sin_start = rope_cos_sin(torch.arange(max_blocks) * b, rope_inv_freq.cpu())
        self.cos_offset, self.sin_offset = rope_cos_sin(torch.arange(b), rope_inv_freq.cpu())
        self.basis = _NO_BASIS if value_basis is None else value_basis.T.float().cpu().contiguous().numpy()

    def __call__(self, q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, block_ids: torch.Tensor,
                 sink_k: torch.Tensor, sink_v: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
                 tail_len: int | None = None, num_valid: torch.Tensor | None = None) -> torch.Tensor:
        """q [Hq, D]; pool uint8 [P, row_bytes] (contiguous) holds block block_ids[h, j] of KV
        head h in row slots[h, j] (both int64 [Hkv, k]); sink_k/v [Hkv, S, D] and the first
        tail_len (default: all) tokens of tail_k/v [Hkv, >= tail_len, D]: the exact tokens
        (a tail buffer with room to grow is read in place). num_valid: int64 [Hkv], blocks
        attended per head, the first of its row (default: all k; the rest of a row, slots
        and ids alike, is never read). Returns [Hq, D] in q's dtype."""
        hkv, ksel = block_ids.shape
        valid = np.full(hkv, ksel, np.int64) if num_valid is None else num_valid.to(torch.int64).numpy()
        out = _attend(self.codec, q, self.sm_scale, pool, slots, valid, True, block_ids,
                      self.cos_start, self.sin_start, self.cos_offset, self.sin_offset, (sink_k, sink_v, tail_k, tail_v),
                      tail_k.shape[1] if tail_len is None else tail_len, self.basis)
        return out.view(q.shape).to(q.dtype)
