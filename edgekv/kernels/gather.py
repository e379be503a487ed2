"""Gather selected rows of a row pool into a (device) buffer.

``pool: [capacity, row_bytes] uint8`` is a tier's row store — on a CUDA machine the
pinned host RAM pool, which a CUDA kernel can read directly over PCIe (pinned memory is
mapped into the device's address space). ``slots: [n]`` int32/int64 are pool slot indices;
``out: [n, row_bytes] uint8`` receives ``pool[slots]`` in order.

- `gather_rows_torch` (the twin): ``index_select`` on the pool's device, then one copy
  into ``out`` (a pageable staging tensor on the host: the copy to CUDA is synchronous).
- `gather_rows_triton` (`gather_triton.py`): one kernel launch that reads the selected
  host rows straight into device memory, no staging buffer, asynchronous on the current
  stream. On GPU it needs ``pool`` pinned (or on CUDA) and ``slots`` on the device;
  indices are not bounds-checked by the kernel (the twin's ``index_select`` checks).
"""

from __future__ import annotations

import torch

from ._backend import dispatch


def gather_rows(pool: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None, *,
                device: torch.device | str | None = None, backend: str = "auto") -> torch.Tensor:
    """``out[i] = pool[slots[i]]``.

    pool: [capacity, row_bytes] uint8 (pinned host memory or any device).
    slots: [n] int32/int64. out: [n, row_bytes] uint8, or None to allocate one on
    ``device`` (default: the slots' device). Returns ``out``.
    "auto" picks Triton when ``out`` (or ``device``) is CUDA and the pool is pinned or on CUDA.
    """
    out = prepare_out(pool, slots, out, device)
    readable = pool.is_cuda or (pool.device.type == "cpu" and pool.is_pinned())
    tensors = (out, slots) + ((pool,) if not readable else ())
    fn = dispatch(backend, gather_rows_torch, "gather_triton", "gather_rows_triton", tensors)
    return fn(pool, slots, out)


def prepare_out(pool: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None,
                device: torch.device | str | None) -> torch.Tensor:
    """Check shapes and return ``out`` (allocated when None)."""
    if pool.dtype != torch.uint8 or pool.dim() != 2:
        raise ValueError(f"pool must be uint8 [capacity, row_bytes] (got {tuple(pool.shape)} {pool.dtype})")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be a 1-d int32/int64 tensor (got {tuple(slots.shape)} {slots.dtype})")
    shape = (slots.shape[0], pool.shape[1])
    if out is None:
        return torch.empty(shape, dtype=torch.uint8, device=device if device is not None else slots.device)
    if out.dtype != torch.uint8 or tuple(out.shape) != shape:
        raise ValueError(f"out must be uint8 {list(shape)} (got {tuple(out.shape)} {out.dtype})")
    return out


def gather_rows_torch(pool: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The twin: ``index_select`` where the pool lives, then one copy into ``out``."""
    out = prepare_out(pool, slots, out, None)
    picked = torch.index_select(pool, 0, slots.to(pool.device))
    out.copy_(picked)
    return out
