"""Attention and KV-compression kernels: Triton kernels beside their torch reference twins.

Each public function takes ``backend="auto" | "torch" | "triton" | "numba"`` ("auto":
Triton when every tensor is on CUDA and Triton imports, the compiled CPU kernels of
block scoring and sparse attention when every tensor is on the CPU and numba imports,
else the torch twin; see `_backend`). Triton and numba are only imported when one of
their kernels is first called (a decode backend's `warm_up` makes that happen at load time).

- `score_blocks` / `bound_scores` / `block_mass` (block_score.py): which blocks matter to
  a query; `top_blocks`: the sinks and the best-scored blocks, `adaptive_top_blocks`: a
  budget shared between KV heads.
- `sparse_decode_attention` (sparse_attention.py): one decode token over selected
  packed blocks + the exact tail; `pooled_decode_attention`: the same with each row read
  where it lies (device cache or pinned RAM).
- `compress_blocks` (compress.py): completed blocks -> packed rows.
- `gather_rows` (gather.py): selected rows of a (pinned host) pool -> a device buffer.
"""

from .block_score import adaptive_top_blocks, block_mass, bound_scores, score_blocks, top_blocks
from .compress import compress_blocks
from .gather import gather_rows
from .sparse_attention import pooled_decode_attention, sparse_decode_attention

__all__ = ["adaptive_top_blocks", "block_mass", "bound_scores", "compress_blocks",
           "gather_rows", "pooled_decode_attention", "score_blocks", "sparse_decode_attention", "top_blocks"]
