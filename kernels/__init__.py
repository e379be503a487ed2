"""Attention and KV-compression kernels: Triton kernels beside their torch reference twins.

Each public function takes ``backend="auto" | "torch" | "triton" | "numba"`` ("auto":
Triton when every tensor is on CUDA and Triton imports, the compiled CPU kernels of
block scoring and sparse attention when every tensor is on the CPU and numba imports,
else the torch twin; see `_backend`). Triton and numba are only imported when one of
their kernels is first called; `warm_up` makes that happen at load time.

- `score_blocks` / `bound_scores` (block_score.py): which blocks matter to a query;
  `top_blocks`: the sinks and the best-scored blocks.
- `sparse_decode_attention` (sparse_attention.py): one decode token over selected
  packed blocks + the exact tail.
- `compress_blocks` (compress.py): completed blocks -> packed rows + kmin/kmax summary.
- `gather_rows` (gather.py): selected rows of a (pinned host) pool -> a device buffer.
"""

import torch

from edgekv.quant import BlockCodec

from ._backend import resolve_backend
from .block_score import bound_scores, key_copy, score_blocks, top_blocks
from .compress import CompressedBlocks, compress_blocks
from .gather import gather_rows
from .sparse_attention import sparse_decode_attention

__all__ = ["CompressedBlocks", "bound_scores", "compress_blocks", "gather_rows", "score_blocks",
           "sparse_decode_attention", "warm_up"]


def warm_up(codec: BlockCodec, key_codec: BlockCodec, *, num_heads: int, num_kv_heads: int, backend: str,
            device: torch.device) -> None:
    """Run a decode step's compiled CPU kernels once on a tiny input shaped like the
    engine's (rows of ``codec``, key copies of ``key_codec``, keys before RoPE), so that
    numba compiles them, or loads them from its disk cache, now rather than in the first
    decode step. Nothing to do for the other backends."""
    if resolve_backend(backend, torch.empty(0, device=device)) != "numba":
        return
    d = codec.head_dim
    k = torch.zeros(num_kv_heads, 2 * codec.block_size, d, device=device)
    rows = compress_blocks(k, k, codec, backend="torch").rows  # [Hkv, 2, row_bytes]
    summary = torch.zeros(num_kv_heads, 3, key_codec.row_bytes, dtype=torch.uint8, device=device)
    copies = key_copy(summary, key_codec)[:, :2]  # a slice, as the summaries are read
    q = torch.zeros(num_heads, d, device=device)
    score_blocks(q, copies, key_codec, backend=backend)
    top_blocks(torch.zeros(num_kv_heads, 2), 1, 1, backend=backend)
    ids = torch.zeros(num_kv_heads, 2, dtype=torch.int64, device=device)
    tail = torch.zeros(num_kv_heads, 3, d, device=device)
    sparse_decode_attention(q, rows, codec, tail, tail, block_ids=ids,
                            rope_inv_freq=torch.ones(d // 2, device=device), backend=backend)
