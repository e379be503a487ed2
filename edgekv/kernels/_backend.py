"""Backend choice and the checks every kernel wrapper shares.

Every kernel in `edgekv.kernels` comes as a pair with one signature: a torch reference
twin (any device) and a Triton kernel (CUDA, or Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` was set before the Triton module was first imported). The two
kernels of a sparse decode step, `score_blocks` and `sparse_decode_attention`, also
have a compiled CPU kernel (numba, ``*_numba.py``). The public function of each module
picks one by ``backend``:

- ``"torch"``: the twin;
- ``"triton"``: the Triton kernel (its module, and Triton itself, imported on first use);
- ``"numba"``: the compiled CPU kernel where there is one, else the twin;
- ``"auto"``: Triton when every tensor argument is on CUDA and Triton imports; numba
  when every tensor is on the CPU and numba imports; else the twin.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from edgekv.errors import EdgekvError
from edgekv.quant import BlockCodec

BACKENDS = ("auto", "torch", "triton", "numba")
# Every Triton launch states whether a*b+c may fuse into one rounding (FMA): on, as
# Triton has done by default (its default is changing). No kernel's exactness depends on
# it (dequantizing products are exact, RoPE's range reduction spells out its FMAs); it
# moves softmax and rotation rounding within the tests' tolerances. `kernels/aot.py`
# compiles with the same setting.
FP_FUSION = True


@functools.cache
def package_available(name: str) -> bool:
    """True when the package ``name`` imports."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def triton_available() -> bool:
    return package_available("triton")


def numba_available() -> bool:
    return package_available("numba")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"torch"``, ``"triton"`` or ``"numba"`` for a call on ``tensors`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise EdgekvError(f"unknown kernel backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if all(t.is_cuda for t in tensors) and triton_available():
            return "triton"
        if all(t.device.type == "cpu" for t in tensors) and numba_available():
            return "numba"
        return "torch"
    if backend == "triton" and not triton_available():
        raise EdgekvError("the Triton backend needs the `triton` package: pip install triton "
                          "(or use backend='torch')")
    if backend == "numba":
        if not numba_available():
            raise EdgekvError("the numba backend needs the `numba` package: pip install numba (or use backend='torch')")
        if any(t.device.type != "cpu" for t in tensors):
            raise EdgekvError("the numba kernels run on CPU tensors; on CUDA use backend='triton' or 'auto'")
    return backend


def dispatch(backend: str, twin: Callable, triton_module: str, name: str,
             tensors: tuple[torch.Tensor, ...], numba_kernel: tuple[str, str] | None = None) -> Callable:
    """The function to call: ``twin``, ``name`` from ``edgekv.kernels.<triton_module>``, or
    the compiled CPU kernel ``numba_kernel = (module, name)`` (the twin where there is none)."""
    chosen = resolve_backend(backend, *tensors)
    if chosen == "numba" and numba_kernel is not None:
        triton_module, name = numba_kernel
    elif chosen != "triton":
        return twin
    module = importlib.import_module(f"edgekv.kernels.{triton_module}")
    return getattr(module, name)


def check_triton_device(kernel: object, *tensors: torch.Tensor, host_ok: bool = False) -> None:
    """Fail early when a Triton kernel cannot read ``tensors``.

    A compiled kernel needs CUDA tensors (``host_ok``: or pinned host tensors, which a GPU
    reads in place over the bus); an interpreted one (``TRITON_INTERPRET=1`` at import)
    runs on CPU tensors.
    """
    if type(kernel).__name__ == "InterpretedFunction":
        return
    for t in tensors:
        if not t.is_cuda and not (host_ok and t.is_pinned()):
            raise EdgekvError(
                "the Triton kernels need CUDA tensors; on the CPU use backend='torch' (or set "
                "TRITON_INTERPRET=1 before edgekv's Triton kernels are first imported to run "
                "them, slowly, in Triton's interpreter)")


def is_interpreted(kernel: object) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


KEY_SEGMENTS = ("k", "k_scale", "k_zero")


def key_copy_offsets(codec: BlockCodec) -> dict[str, tuple[int, int]]:
    """Segment name -> ``(start, end)`` bytes of a low-bit KEY COPY row.

    A key copy keeps only what block scoring reads, in the codec's order::

        [ K codes | K scale fp16 [D] | K zero fp16 [D] ]      (16 bits: [ K fp16 [B, D] ])

    ``key_copy_bytes = code_bytes + 4 * head_dim``: 2,560 of the 4,864 bytes of a 4-bit
    Llama-8B row (block 32, head_dim 128), so a GPU can hold every block's keys for
    scoring at about half the memory of whole rows.
    """
    out, start = {}, 0
    for name, (s, e) in codec.offsets.items():
        if name in KEY_SEGMENTS:
            out[name] = (start, start + e - s)
            start += e - s
    return out


def key_copy_bytes(codec: BlockCodec) -> int:
    return max(end for _, end in key_copy_offsets(codec).values())


def row_offsets(codec: BlockCodec, width: int) -> dict[str, tuple[int, int]]:
    """The offsets of rows ``width`` bytes wide: whole codec rows or key copies."""
    if width == codec.row_bytes:
        return codec.offsets
    if width == key_copy_bytes(codec):
        return key_copy_offsets(codec)
    raise ValueError(f"rows must be {codec.row_bytes} bytes (whole rows) or {key_copy_bytes(codec)} "
                     f"bytes (key copies) wide for this codec (got {width})")


@functools.cache
def tile_layout(codec: BlockCodec, key_copy: bool = False) -> dict[str, int]:
    """The row layout of ``codec`` as Triton compile-time constants.

    Byte offsets of the code segments (``K_OFF``, ``V_OFF``), fp16-element offsets of
    the scale/zero segments (``KS_OFF`` … ``VZ_OFF``: byte offset // 2), codes per byte
    ``CPB`` (1 at 16 bits: raw fp16), and the tile sizes: ``BLOCK_T`` (tokens, a power
    of two >= 16 and >= block_size) and ``BLOCK_DJ`` (code bytes per token, a power of
    two) so that ``BLOCK_D = BLOCK_DJ * CPB`` channels cover ``head_dim``. With
    ``key_copy`` the offsets are those of `key_copy_offsets` (no V segments). Do not
    mutate the returned dict (it is cached).
    """
    bits, d = codec.bits, codec.head_dim
    cpb = codec.codes_per_byte if bits < 16 else 1
    if d % cpb:
        raise EdgekvError(f"the Triton kernels need head_dim ({d}) to be a multiple of "
                          f"{cpb} at {bits} bits; use backend='torch'")
    off = key_copy_offsets(codec) if key_copy else codec.offsets
    half = {name: off[name][0] // 2 for name in ("k_scale", "k_zero", "v_scale", "v_zero") if name in off}
    block_dj = max(next_pow2(d // cpb), 16 // cpb)  # BLOCK_D >= 16: tl.dot's minimum
    return dict(
        BITS=bits, CPB=cpb, BLOCK_SIZE=codec.block_size, HEAD_DIM=d,
        VGROUP=codec.group, NUM_VGROUPS=codec.num_groups, CODE_BYTES=codec.code_bytes,
        K_OFF=off["k"][0], V_OFF=off["v"][0] if "v" in off else 0,
        KS_OFF=half.get("k_scale", 0), KZ_OFF=half.get("k_zero", 0),
        VS_OFF=half.get("v_scale", 0), VZ_OFF=half.get("v_zero", 0),
        BLOCK_T=max(16, next_pow2(codec.block_size)), BLOCK_DJ=block_dj,
    )


def aligned_rows(rows: torch.Tensor, codec: BlockCodec, ndim: int, width: int | None = None) -> torch.Tensor:
    """``rows`` checked as ``uint8 [..., width]`` (default ``codec.row_bytes``) with
    ``ndim`` dims, copied only if its last dim is strided or its fp16 segments would be
    misaligned."""
    width = codec.row_bytes if width is None else width
    if rows.dtype != torch.uint8 or rows.dim() != ndim or rows.shape[-1] != width:
        raise ValueError(f"rows must be a {ndim}-d uint8 tensor [..., {width}] "
                         f"(got {tuple(rows.shape)} {rows.dtype})")
    if rows.stride(-1) != 1 or any(s % 2 for s in rows.stride()[:-1]) or rows.data_ptr() % 2:
        rows = rows.clone(memory_format=torch.contiguous_format)
    return rows


def dot_dtype(dtype: torch.dtype, interpreted: bool):
    """The Triton dtype both operands of ``tl.dot`` take for inputs of ``dtype``.

    fp32 inputs keep fp32 (exact IEEE products); fp16/bf16 use tensor cores with fp32
    accumulation. Triton's interpreter multiplies bf16 operands as raw integers, so it
    gets fp32 operands instead.
    """
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreted:
        return tl.bfloat16
    return tl.float32


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 elsewhere: the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
