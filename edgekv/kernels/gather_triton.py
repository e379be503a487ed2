"""Triton kernel of `edgekv.kernels.gather` (`gather_rows_triton`).

Grid ``(n, ceil(row_words / BLOCK))``: program ``(i, j)`` copies words
``j*BLOCK .. j*BLOCK+BLOCK-1`` of pool row ``slots[i]`` to row ``i`` of ``out``. Rows are
moved as the widest words (8, 4, 2 or 1 bytes) that divide ``row_bytes``, both row strides
and both base addresses, so a 4,864-byte row of the 4-bit Llama-8B layout moves as 608
int64 words. With a pinned host pool the loads cross PCIe as coalesced reads by the GPU
itself (zero-copy), so one launch replaces ``index_select`` + staging + copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import FP_FUSION, check_triton_device
from .gather import prepare_out

BLOCK_WORDS = 512


@triton.jit(do_not_specialize=["row_words"])
def _gather_kernel(pool_ptr, slots_ptr, out_ptr, row_words, stride_pool, stride_out, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    w = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = w < row_words
    slot = tl.load(slots_ptr + i).to(tl.int64)
    x = tl.load(pool_ptr + slot * stride_pool + w, mask=mask)
    tl.store(out_ptr + i.to(tl.int64) * stride_out + w, x, mask=mask)


def _word_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest integer dtype every row length, row stride and base address is a multiple of."""
    for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if all(t.shape[1] % size == 0 and t.stride(0) % size == 0 and t.data_ptr() % size == 0
               for t in tensors):
            return dtype
    return torch.uint8


def gather_rows_triton(pool: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `edgekv.kernels.gather.gather_rows_torch` (one launch)."""
    out = prepare_out(pool, slots, out, None)
    check_triton_device(_gather_kernel, out, slots)
    if pool.device.type == "cpu" and out.is_cuda and not pool.is_pinned():
        raise ValueError("the Triton gather reads host rows directly: the pool must be pinned "
                         "(torch.empty(..., pin_memory=True)); use backend='torch' otherwise")
    n, row_bytes = out.shape
    if n == 0 or row_bytes == 0:
        return out
    if pool.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("pool and out rows must be contiguous in their last dimension")
    word = _word_dtype(pool, out)
    pool_w, out_w = pool.view(word), out.view(word)
    row_words = pool_w.shape[1]
    block = min(BLOCK_WORDS, triton.next_power_of_2(row_words))
    _gather_kernel[(n, triton.cdiv(row_words, block))](
        pool_w, slots, out_w, row_words, pool_w.stride(0), out_w.stride(0), BLOCK=block, enable_fp_fusion=FP_FUSION)
    return out
