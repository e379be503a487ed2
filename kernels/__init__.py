"""Attention and KV-compression kernels: Triton kernels beside their torch reference twins.

Each public function takes ``backend="auto" | "torch" | "triton" | "numba"`` ("auto":
Triton when every tensor is on CUDA and Triton imports, the compiled CPU kernels of
block scoring and sparse attention when every tensor is on the CPU and numba imports,
else the torch twin; see `_backend`). Triton and numba are only imported when one of
their kernels is first called; `warm_up` makes that happen at load time.

- `score_blocks` / `bound_scores` / `block_mass` (block_score.py): which blocks matter to
  a query; `top_blocks`: the sinks and the best-scored blocks, `adaptive_top_blocks`: a
  budget shared between KV heads.
- `sparse_decode_attention` (sparse_attention.py): one decode token over selected
  packed blocks + the exact tail.
- `compress_blocks` (compress.py): completed blocks -> packed rows + kmin/kmax summary.
- `gather_rows` (gather.py): selected rows of a (pinned host) pool -> a device buffer.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from edgekv.quant import BlockCodec

from ._backend import resolve_backend
from .block_score import adaptive_top_blocks, block_mass, bound_scores, key_copy, score_blocks, top_blocks
from .compress import CompressedBlocks, compress_blocks
from .gather import gather_rows
from .sparse_attention import sparse_decode_attention

__all__ = ["CompiledDecode", "CompressedBlocks", "adaptive_top_blocks", "block_mass", "bound_scores",
           "compiled_decode", "compress_blocks", "gather_rows", "score_blocks", "sparse_decode_attention", "warm_up"]


@dataclass(frozen=True)
class CompiledDecode:
    """A KV cache's decode-step kernels with their constants made once (None: use the
    per-call functions above). select(q, summaries, num_blocks, k, sink_blocks, tail_k,
    tail_len, adaptive) -> ids is `NumbaMassSelector` (blocks by estimated attention mass)
    or `NumbaBlockSelector` (by block max; tail and adaptive not used); attend(q, pool, slots,
    block_ids, sink_k, sink_v, tail_k, tail_v, tail_len, num_valid) -> out is
    `NumbaSparseAttention`."""

    select: Callable | None = None
    attend: Callable | None = None


def compiled_decode(codec: BlockCodec, key_codec: BlockCodec | None, rope_inv_freq: torch.Tensor,
                    max_blocks: int, *, backend: str, device: torch.device,
                    value_basis: torch.Tensor | None = None, by_mass: bool = False) -> CompiledDecode:
    """The compiled CPU decode step of a cache of pre-RoPE rows of ``codec`` (blocks below
    ``max_blocks``) scored by 4-bit key copies of ``key_codec`` (None: another scorer;
    ``by_mass``: their `block_mass`, else their `score_blocks`), when
    ``backend`` resolves to numba on ``device``; the per-call path everywhere else. Its
    results are those of `top_blocks` (or `adaptive_top_blocks`) over the scores and of `sparse_decode_attention`
    with the numba backend (tested); with ``value_basis`` R, attend's outputs are
    multiplied by R.T (values stored rotated, `edgekv.rotation`)."""
    if resolve_backend(backend, torch.empty(0, device=device)) != "numba":
        return CompiledDecode()
    from .block_score_numba import NumbaBlockSelector, NumbaMassSelector
    from .sparse_attention_numba import NumbaSparseAttention

    d = codec.head_dim
    attend_ok = codec.bits < 16 and d % codec.codes_per_byte == 0 and d % 2 == 0
    select_ok = key_codec is not None and key_codec.bits == 4 and key_codec.head_dim % 2 == 0
    selector = NumbaMassSelector if by_mass else NumbaBlockSelector
    return CompiledDecode(select=selector(key_codec) if select_ok else None,
                          attend=NumbaSparseAttention(codec, rope_inv_freq, max_blocks, value_basis)
                          if attend_ok else None)


def warm_up(compiled: CompiledDecode, codec: BlockCodec, key_codec: BlockCodec | None, *, num_heads: int,
            num_kv_heads: int) -> None:
    """Run a cache's compiled decode step (``compiled``, for rows of ``codec`` and key
    copies of ``key_codec``) and the compiled top-k once on a tiny input shaped like the
    engine's, so that numba compiles them, or loads them from its disk cache, now rather
    than in the first decode step. Nothing to do without compiled kernels."""
    if compiled.select is None and compiled.attend is None:
        return
    d = codec.head_dim
    q = torch.zeros(num_heads, d)
    top_blocks(torch.zeros(num_kv_heads, 2), 1, 1, backend="numba")  # other scorers' selection
    if compiled.select is not None:
        summaries = torch.zeros(num_kv_heads, 3, key_codec.row_bytes, dtype=torch.uint8)
        tail = torch.zeros(num_kv_heads, 3, d)
        for adaptive in (False, True) if compiled.select.by_mass else (False,):
            compiled.select(q, key_copy(summaries, key_codec), 2, 1, 1, tail, 3, adaptive)
    if compiled.attend is not None:
        k = torch.zeros(num_kv_heads, 2 * codec.block_size, d)
        pool = compress_blocks(k, k, codec, backend="torch").rows.reshape(-1, codec.row_bytes)  # [Hkv*2, row_bytes]
        ids = torch.zeros(num_kv_heads, 2, dtype=torch.int64)
        exact = torch.zeros(num_kv_heads, 3, d)
        compiled.attend(q, pool, torch.arange(2 * num_kv_heads).view(num_kv_heads, 2), ids, exact, exact, exact, exact,
                        num_valid=torch.ones(num_kv_heads, dtype=torch.int64))
