"""Attention and KV-compression kernels: Triton kernels beside their torch reference twins.

Each public function takes ``backend="auto" | "torch" | "triton"`` ("auto": Triton when
every tensor is on CUDA and Triton imports, else the torch twin). Triton itself is only
imported when a Triton kernel is first called.

- `score_blocks` / `bound_scores` (block_score.py): which blocks matter to a query.
- `sparse_decode_attention` (sparse_attention.py): one decode token over selected
  packed blocks + the exact tail.
- `compress_blocks` (compress.py): completed blocks -> packed rows + kmin/kmax summary.
- `gather_rows` (gather.py): selected rows of a (pinned host) pool -> a device buffer.
"""

from .block_score import bound_scores, score_blocks
from .compress import CompressedBlocks, compress_blocks
from .gather import gather_rows
from .sparse_attention import sparse_decode_attention

__all__ = ["CompressedBlocks", "bound_scores", "compress_blocks", "gather_rows", "score_blocks",
           "sparse_decode_attention"]
