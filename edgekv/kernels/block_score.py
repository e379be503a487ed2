"""Block scoring: which blocks of a layer matter to the next token's query.

Three scorers, each a torch twin with compiled kernels of the same signature
(`score_blocks`: Triton and numba; `bound_scores`: Triton; `block_mass`: numba, and on
CUDA its twin runs as torch ops):

- `score_blocks` reads the 4-bit KEY part of the packed rows (the low-bit key copy: K
  codes, K scale, K zero; the V part of a row is never read) and returns, per KV head
  and block, the largest query-key product over the block's tokens:

      score[h, b] = max_t  combine_{g < group} ( q[h*group + g] . k[h, b, t] )

  with ``combine`` = ``max`` (default) or ``sum`` over the query heads sharing KV head
  ``h`` (GQA). Unscaled dot products (no ``1/sqrt(head_dim)``), fp32.
- `bound_scores` is the Quest upper bound on a per-block summary ``kmin``/``kmax``:

      bound[h, b] = combine_g  sum_c max(q[g, c] * kmin[h, b, c], q[g, c] * kmax[h, b, c])

  computed as ``relu(q) . kmax + min(q, 0) . kmin``. Kept for comparison: on the
  embedded model it loses needles the key-copy scorer keeps (see MEASURED.md).
- `block_mass` reads the same 4-bit key copies and estimates the share of each query
  head's attention that falls on each block (softmax over every block's tokens and the
  exact tail ``tail_k``), summed over the query heads of a GQA group:

      mass[h, b] = sum_g  sum_{t in b} exp(s_gt) / (sum_{all blocks, t} exp(s_gt) + sum_{tail} exp(s_gt)),
      s_gt = sm_scale * q[h*group + g] . k[h, t]

  Masses of a KV head sum to at most ``group``; unlike a block's largest product they
  are comparable across heads, which `adaptive_top_blocks` needs.
- `top_blocks` keeps the same number of blocks per KV head; `adaptive_top_blocks`
  shares one budget between the KV heads of a layer by their block weights (Ada-KV).

Shapes: ``q: [num_heads, head_dim]`` (one decode token; ``num_heads`` a multiple of
``num_kv_heads``), ``rows: [num_kv_heads, num_blocks, width] uint8`` (head-major, as the
engine fetches a layer) where ``width`` is ``codec.row_bytes`` (whole rows) or
``key_copy_bytes(codec)`` (compact key copies made by `key_copy`, the form to keep on
the GPU), ``kmin, kmax: [num_kv_heads, num_blocks, head_dim] fp16``.
Results: ``[num_kv_heads, num_blocks] fp32`` on q's device.
"""

from __future__ import annotations

import torch

from edgekv.quant import BlockCodec

from ._backend import aligned_rows, dispatch, key_copy_bytes, key_copy_offsets, resolve_backend, row_offsets

__all__ = ["adaptive_top_blocks", "block_mass", "bound_scores", "decode_keys", "key_copy", "key_copy_bytes",
           "key_copy_offsets", "score_blocks"]

COMBINES = ("max", "sum")


def score_blocks(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, *, combine: str = "max",
                 backend: str = "auto") -> torch.Tensor:
    """Block-max query-key scores over the packed key rows of one layer (see module doc).

    q: [num_heads, head_dim] fp32/fp16/bf16. rows: [num_kv_heads, num_blocks, width]
    uint8: whole rows in ``codec``'s layout or key copies (`key_copy`).
    Returns [num_kv_heads, num_blocks] fp32.
    backend: "auto" | "torch" | "triton" | "numba" (`edgekv.kernels._backend`).
    """
    fn = dispatch(backend, score_blocks_torch, "block_score_triton", "score_blocks_triton", (q, rows),
                  numba_kernel=("block_score_numba", "score_blocks_numba"))
    return fn(q, rows, codec, combine=combine)


def top_blocks(scores: torch.Tensor, k: int, sink_blocks: int, *, backend: str = "auto") -> torch.Tensor:
    """int64 [num_kv_heads, k] block ids per KV head, ascending: the first ``sink_blocks``
    blocks, then the highest of ``scores: [num_kv_heads, num_blocks]`` (every block when k
    covers them). Ties at the k-th score may resolve differently per backend."""
    if k < scores.shape[1] and resolve_backend(backend, scores) == "numba":
        from .block_score_numba import top_blocks_numba

        return top_blocks_numba(scores, k, sink_blocks)
    return top_blocks_torch(scores, k, sink_blocks)


def top_blocks_torch(scores: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """The reference twin of `top_blocks`."""
    nb = scores.shape[1]
    if k >= nb:
        return torch.arange(nb, device=scores.device).expand(scores.shape[0], -1)
    scores = scores.clone()
    scores[:, :sink_blocks] = float("inf")
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def adaptive_top_blocks(weights: torch.Tensor, k: int, sink_blocks: int, *,
                        backend: str = "auto") -> torch.Tensor:
    """Block ids int64 [num_kv_heads, k_max] sharing one budget between KV heads (Ada-KV):
    every head keeps its ``sink_blocks`` sinks, and the ``num_kv_heads * (k - sink_blocks)``
    other places go to the highest ``weights: [num_kv_heads, num_blocks]`` (block weights
    comparable across heads, as `block_mass` gives) of any head. Row h holds its blocks
    ascending, then -1 up to k_max, the most blocks any head got (k <= k_max <= num_blocks).
    Every block of every head when k covers them (no -1 then). Ties at the threshold may
    resolve differently per backend."""
    nb = weights.shape[1]
    if k >= nb:
        return torch.arange(nb, device=weights.device).expand(weights.shape[0], -1)
    if resolve_backend(backend, weights) == "numba":
        from .block_score_numba import adaptive_top_blocks_numba

        return adaptive_top_blocks_numba(weights, k, sink_blocks)
    return adaptive_top_blocks_torch(weights, k, sink_blocks)


def adaptive_top_blocks_torch(weights: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """The reference twin of `adaptive_top_blocks`."""
    return _ragged_ids(_adaptive_choice(weights, k, sink_blocks))


def adaptive_top_blocks_padded(weights: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """`adaptive_top_blocks` (torch ops, on any device) padded to a width fixed by the
    shapes alone: int64 [num_kv_heads, min(num_blocks, sink_blocks + num_kv_heads * (k -
    sink_blocks))], the most blocks any head can get; each row holds its blocks
    ascending, then -1. No value is read back to the host (the width of
    `adaptive_top_blocks` is the largest count actually chosen, which would be)."""
    hkv, nb = weights.shape
    if k >= nb:
        return torch.arange(nb, device=weights.device).expand(hkv, -1)
    width = min(nb, sink_blocks + hkv * (k - sink_blocks))
    return _ragged_ids(_adaptive_choice(weights, k, sink_blocks), width)


def _adaptive_choice(weights: torch.Tensor, k: int, sink_blocks: int) -> torch.Tensor:
    """bool [num_kv_heads, num_blocks]: every head's sinks and the num_kv_heads * (k -
    sink_blocks) highest other weights of any head."""
    hkv = weights.shape[0]
    free = weights[:, sink_blocks:].float()
    chosen_free = torch.zeros(free.numel(), dtype=torch.bool, device=weights.device)
    chosen_free[free.flatten().topk(hkv * (k - sink_blocks), sorted=False).indices] = True
    sinks = torch.ones(hkv, sink_blocks, dtype=torch.bool, device=weights.device)
    return torch.cat((sinks, chosen_free.view_as(free)), dim=1)


def _ragged_ids(chosen: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """int64 [H, width]: the column ids of each row's True entries, ascending, then -1
    (width: the most True entries of a row, unless given)."""
    if width is None:
        width = int(chosen.sum(dim=1).max())
    cols = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
    order = torch.where(chosen, cols, chosen.shape[1]).sort(dim=1).values[:, :width]  # chosen first, ascending
    return torch.where(order < chosen.shape[1], order, -1)


def block_mass(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor, *,
               sm_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Estimated attention mass per KV head and block (see module doc).

    q: [num_heads, head_dim]; rows: [num_kv_heads, num_blocks, width] uint8, whole rows or
    key copies as for `score_blocks`; tail_k: [num_kv_heads, T, head_dim] the exact keys
    (after RoPE, like the rows' keys) attended besides the blocks (T may be 0).
    sm_scale: the attention's softmax scale (default head_dim ** -0.5).
    Returns [num_kv_heads, num_blocks] fp32. The numba backend has a compiled kernel for
    4-bit key copies; every other case runs the twin.
    """
    scale = codec.head_dim**-0.5 if sm_scale is None else sm_scale
    if resolve_backend(backend, q, rows) == "numba":
        from .block_score_numba import block_mass_numba

        return block_mass_numba(q, rows, codec, tail_k, sm_scale=scale)
    return block_mass_torch(q, rows, codec, tail_k, sm_scale=scale)


def block_mass_torch(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, tail_k: torch.Tensor, *,
                     sm_scale: float) -> torch.Tensor:
    """The reference twin of `block_mass`."""
    hkv, nb, d, b = rows.shape[0], rows.shape[1], codec.head_dim, codec.block_size
    group = query_group(q, hkv, d)
    qg = q.float().view(hkv, group, d) * sm_scale
    keys = decode_keys(rows.reshape(hkv * nb, rows.shape[-1]), codec).view(hkv, nb * b, d)
    block_lse = torch.bmm(qg, keys.transpose(1, 2)).view(hkv, group, nb, b).logsumexp(dim=-1)  # [H, G, nb]
    tail_lse = torch.bmm(qg, tail_k.float().transpose(1, 2)).logsumexp(dim=-1)  # [H, G]; -inf without a tail
    total = torch.logaddexp(block_lse.logsumexp(dim=-1), tail_lse)
    return torch.exp(block_lse - total[..., None]).sum(dim=1)


def bound_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, combine: str = "max",
                 backend: str = "auto") -> torch.Tensor:
    """Quest min/max upper-bound scores (see module doc).

    q: [num_heads, head_dim]; kmin, kmax: [num_kv_heads, num_blocks, head_dim] (fp16 as
    `edgekv.kernels.compress` writes them; any float dtype works). Returns
    [num_kv_heads, num_blocks] fp32.
    """
    fn = dispatch(backend, bound_scores_torch, "block_score_triton", "bound_scores_triton",
                  (q, kmin, kmax))
    return fn(q, kmin, kmax, combine=combine)


# ---- torch twins ------------------------------------------------------------------------------


def check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES} (got {combine!r})")


def query_group(q: torch.Tensor, num_kv_heads: int, head_dim: int) -> int:
    """Query heads per KV head, after checking ``q: [num_heads, head_dim]``."""
    if q.dim() != 2 or q.shape[1] != head_dim or num_kv_heads < 1 or q.shape[0] % num_kv_heads:
        raise ValueError(f"q must be [num_heads, {head_dim}] with num_heads a multiple of "
                         f"num_kv_heads={num_kv_heads} (got {tuple(q.shape)})")
    return q.shape[0] // num_kv_heads


def key_copy(rows: torch.Tensor, codec: BlockCodec) -> torch.Tensor:
    """The low-bit key copy of whole rows: ``[..., row_bytes]`` -> ``[..., key_copy_bytes]``
    uint8 (K codes, K scale, K zero; see `key_copy_offsets`), a new tensor."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != codec.row_bytes:
        raise ValueError(f"rows must be uint8 [..., {codec.row_bytes}] (got {tuple(rows.shape)} {rows.dtype})")
    return torch.cat([rows[..., slice(*codec.offsets[name])] for name in key_copy_offsets(codec)], dim=-1)


def decode_keys(rows: torch.Tensor, codec: BlockCodec) -> torch.Tensor:
    """The keys alone of ``rows: [n, width] uint8`` (whole rows or key copies): fp32
    ``[n, block_size, head_dim]``.

    Reads only the K segments and computes exactly what ``codec.decode(rows)[0]`` does
    (codes * scale, then + zero, in fp32).
    """
    off = row_offsets(codec, rows.shape[-1])
    rows = aligned_rows(rows, codec, 2, rows.shape[-1])
    n, b, d = rows.shape[0], codec.block_size, codec.head_dim
    ks, ke = off["k"]
    if codec.bits == 16:
        return rows[:, ks:ke].view(torch.float16)[:, : b * d].reshape(n, b, d).float()
    packed, bits, mask = rows[:, ks:ke], codec.bits, (1 << codec.bits) - 1
    codes = torch.stack([(packed >> (bits * j)) & mask for j in range(codec.codes_per_byte)], dim=-1)  # [n, code_bytes, cpb]
    k = codes.view(n, -1)[:, : b * d].reshape(n, b, d).float()
    scale = rows[:, slice(*off["k_scale"])].view(torch.float16).float().view(n, 1, d)
    zero = rows[:, slice(*off["k_zero"])].view(torch.float16).float().view(n, 1, d)
    return torch.addcmul(zero, k, scale)  # code * scale is exact in fp32 (<= 8-bit code x fp16), so fused or not, the same


def score_blocks_torch(q: torch.Tensor, rows: torch.Tensor, codec: BlockCodec, *,
                       combine: str = "max") -> torch.Tensor:
    """Twin of the Triton block scorer, computed on the codes without dequantizing them.

    Per block ``b`` (keys ``k[t, c] = code[t, c] * scale[c] + zero[c]``)::

        q . k[t] = (q * scale) . code[t] + q . zero

    so the scale folds into a per-block query and the zero into a per-block bias: one
    small matmul per block and code position within a byte (channels ``j, j + cpb, …``
    are the ``j``-th code of each byte), on codes cast straight from the bytes. The same
    scores as decoding first, up to fp32 summation order, and faster on a CPU.
    """
    check_combine(combine)
    if rows.dim() != 3:
        raise ValueError(f"rows must be [num_kv_heads, num_blocks, width] (got {tuple(rows.shape)})")
    hkv, nb = rows.shape[0], rows.shape[1]
    b, d = codec.block_size, codec.head_dim
    group = query_group(q, hkv, d)
    if nb == 0:
        return torch.empty(hkv, 0, dtype=torch.float32, device=q.device)
    qg = q.float().view(hkv, group, d)
    if combine == "sum":  # sum_g q_g . k == (sum_g q_g) . k
        qg = qg.sum(dim=1, keepdim=True)
    flat = rows.reshape(hkv * nb, -1)
    cpb = codec.codes_per_byte
    if codec.bits == 16 or d % cpb:  # raw keys, or codes that straddle tokens: decode first
        k = decode_keys(flat, codec).view(hkv, nb * b, d)
        s = torch.bmm(qg, k.transpose(1, 2))  # [hkv, g, D] @ [hkv, D, nb*B] -> [hkv, g, nb*B]
        return s.amax(dim=1).view(hkv, nb, b).amax(dim=2)
    off = row_offsets(codec, flat.shape[-1])
    flat = aligned_rows(flat, codec, 2, flat.shape[-1])
    ks = off["k"][0]
    codes = flat[:, ks:ks + b * d // cpb].view(hkv * nb, b, d // cpb)  # [n, B, D / cpb] bytes
    scale = flat[:, slice(*off["k_scale"])].view(torch.float16).float().view(hkv, nb, 1, d)
    zero = flat[:, slice(*off["k_zero"])].view(torch.float16).float().view(hkv, nb, d, 1)
    g = qg.shape[1]
    q_scaled = (qg[:, None] * scale).view(hkv * nb, g, d)  # [n, g, D]
    mask = (1 << codec.bits) - 1
    s = None
    for j in range(cpb):  # [n, g, D / cpb] @ [n, D / cpb, B] -> [n, g, B]
        c = ((codes >> (codec.bits * j)) & mask).float().transpose(1, 2)
        qj = q_scaled[..., j::cpb].contiguous()
        s = torch.bmm(qj, c) if s is None else s.baddbmm_(qj, c)
    bias = torch.matmul(qg[:, None], zero).view(hkv, nb, g)  # [hkv, 1, g, D] @ [hkv, nb, D, 1]
    return (s.view(hkv, nb, g, b).amax(dim=3) + bias).amax(dim=2)


def check_bound_args(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                     combine: str) -> tuple[int, int, int, int]:
    """``(num_kv_heads, num_blocks, head_dim, group)`` after checking the bound scorer's inputs."""
    check_combine(combine)
    if kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"kmin, kmax must both be [num_kv_heads, num_blocks, head_dim] "
                         f"(got {tuple(kmin.shape)} and {tuple(kmax.shape)})")
    hkv, nb, d = kmin.shape
    return hkv, nb, d, query_group(q, hkv, d)


def bound_scores_torch(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *,
                       combine: str = "max") -> torch.Tensor:
    """Twin of the Triton bound scorer: two bmm per KV head (positive and negative q)."""
    hkv, nb, d, group = check_bound_args(q, kmin, kmax, combine)
    qg = q.float().view(hkv, group, d)
    # [hkv, group, D] @ [hkv, D, nb] -> [hkv, group, nb]
    s = torch.bmm(qg.clamp(min=0), kmax.float().transpose(1, 2))
    s += torch.bmm(qg.clamp(max=0), kmin.float().transpose(1, 2))
    return s.amax(dim=1) if combine == "max" else s.sum(dim=1)
