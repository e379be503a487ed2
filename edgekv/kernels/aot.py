r"""Ahead-of-time compiles of edgekv's Triton kernels for NVIDIA GPUs, on any machine.

Triton compiles for a named GPU without one: ``triton.compile(ASTSource(kernel, signature,
constexprs, attrs), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline (TTIR ->
TTGIR -> LLVM IR -> PTX -> cubin, ptxas included). This module does it for every kernel
edgekv launches, with the arguments edgekv really launches it with::

    a launch wrapper (``score_blocks_triton``, ...) called on CPU stand-in tensors shaped
    like one decode step of a model (`SHAPES`), inside `intercept_launches`:
        kernel[grid](*args, **kwargs)  ->  recorded as a `Launch`, nothing runs
        check_triton_device            ->  accepts CPU tensors
        num_sms                        ->  the SM count of the target's part (`TARGETS`)
                    |
                    v
    Triton's own launch binder (`triton.runtime.jit.create_function_from_signature` and
    ``JITFunction._pack_args``, the code a real launch runs): tensors -> "*fp16", "*u8",
    ...; ints -> "i32"/"i64" (1 -> constexpr); 16-aligned pointers and 16-divisible ints
    -> ``tt.divisibility`` attrs; num_warps / num_stages / fp fusion -> options
                    |
                    v
    triton.compile(..., target=GPUTarget("cuda", arch, 32))   for sm_80, sm_89, sm_90
        registers/thread (cubin), spill stores/loads and stack frame (ptxas -v report),
        shared memory (metadata), and an occupancy estimate (`occupancy`)

The compiles need the kernel modules imported WITHOUT ``TRITON_INTERPRET=1`` (under it
``@triton.jit`` makes interpreter functions, which cannot be compiled), and the test
suite sets that variable in-process. So `run_aot_report` runs them in a child Python
with ``TRITON_INTERPRET`` removed and ``TRITON_DEFAULT_FP_FUSION`` set explicitly:

    TRITON_DEFAULT_FP_FUSION=1 (default ``fp_fusion=True``): it is what every launch gets
    today under Triton 3.9 (unset means enabled there, with a warning; 3.10 flips the
    default to disabled), so the report describes the code that runs. The kernels do not
    depend on it for exactness: dequantization ``code * scale + zero`` has an exact
    product (<= 8-bit code x fp16 scale), `_cos_sin` uses explicit ``tl.fma`` and the
    compress kernel's grid check is exact in fp32 either way (`_tl_blocks.quant_grid`);
    fusion only changes softmax/RoPE roundings, within the tests' tolerances.

Rows (one per compile; a dimension the compile does not depend on is None: e.g. the
gather kernel has no dtype, the merge kernel no bit width or variant) are dicts::

    kernel, wrapper, variant, target (80/89/90), shape, dtype ("fp16"/"bf16"/None),
    bits (2/4/8/16/None), num_warps, num_stages, regs (registers/thread), spill_stores,
    spill_loads, stack (bytes/thread), shared (bytes/block), blocks_per_sm,
    warps_per_sm, occupancy (resident warps / max warps), limiter, fp_fusion, cached,
    compile_s, signature, error (None, or why the compile failed)

Nothing is cached outside Triton's own cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``). The full matrix (2 shapes x 3 targets x fp16/bf16 x 2/4/8/16 bits:
270 distinct compiles, 279 rows) took 13 min 46 s with a cold cache on a 2-core machine
shared with other jobs (load ~7), 2 min warm (a cached compile reruns ptxas on its PTX,
for the ``-v`` report the cache does not keep); one shape, target, dtype and width is
about 8 compiles, ~25 s cold. Threads do not speed the compiles up (measured).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import torch

from edgekv.errors import EdgekvError

# ---- targets and shapes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Per-SM limits of one compute capability, for `occupancy`, and the part whose SM
    count sizes the attention split (``num_sms`` on a real GPU).

    Sources: NVIDIA CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability" (resident blocks per SM: 32 on cc 8.0/9.0, 24 on cc 8.9) and its
    shared-memory sections (cc 8.0: carve-out up to 164 KB; cc 8.6/8.9: up to 100 KB, 99
    KB per block; "The 1 KB of shared memory not made available to a thread block is
    reserved for system use"); the Ampere, Ada and Hopper tuning guides
    (docs.nvidia.com/cuda/{ampere,ada,hopper}-tuning-guide: 64K 32-bit registers per SM,
    at most 255 per thread; 64 resident warps per SM on cc 8.0/9.0, 48 on cc 8.6/8.9;
    228 KB shared per SM on cc 9.0, 227 KB per block). Registers go to warps in units of
    256 and warps to the 4 SM sub-partitions (16K registers each), as the CUDA occupancy
    calculator models it (warp allocation granularity 4). The SM counts are the parts'
    (A100 108, L4 58, H100 SXM 132).
    """

    arch: int  # compute capability x 10
    part: str  # the representative GPU
    sms: int  # its streaming multiprocessors
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident thread blocks per SM
    smem_per_sm: int  # bytes of shared memory per SM (largest carve-out)
    smem_per_block: int  # bytes one block may use (opt-in maximum)
    regs_per_sm: int = 65536
    reg_unit: int = 256  # registers per warp are allocated in multiples of this
    sub_partitions: int = 4
    smem_reserved: int = 1024  # bytes per block reserved for the system


TARGETS = {
    80: Target(80, "A100", 108, max_warps=64, max_blocks=32, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    89: Target(89, "L4", 58, max_warps=48, max_blocks=24, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    90: Target(90, "H100 SXM", 132, max_warps=64, max_blocks=32, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclass(frozen=True)
class AotShape:
    """One decoder layer's decode step: the tensors the launch wrappers get."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    context: int  # tokens (compressed blocks: context // block_size)
    budget: int  # tokens of the selected blocks attended per step
    tail: int  # exact tokens attended besides them (sink block + recent window)


SHAPES = {
    "small": AotShape("small", 9, 3, 64, 32, 8192, 1024, 96),  # SmolLM2-135M, the embedded model
    "llama8b": AotShape("llama8b", 32, 8, 128, 32, 131072, 2048, 96),  # Llama-3.1-8B at 128K
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BITS = (2, 4, 8, 16)


# ---- interception -----------------------------------------------------------------------------


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``: the `JITFunction`, its
    positional arguments, keyword arguments (constexprs and launch options such as
    num_warps) and grid."""

    kernel: Any
    args: tuple
    kwargs: dict
    grid: Any


def kernel_modules() -> list[ModuleType]:
    """The modules of `edgekv.kernels` that define ``@triton.jit`` functions, imported
    (found by their source text, so the numba modules are not imported)."""
    package = importlib.import_module("edgekv.kernels")
    pattern = re.compile(r"^\s*@triton\.jit\b", re.MULTILINE)
    out = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        if path.stem != "aot" and pattern.search(path.read_text(encoding="utf-8")):
            out.append(importlib.import_module(f"edgekv.kernels.{path.stem}"))
    return out


def jit_functions(modules: Iterable[ModuleType]) -> dict[str, Any]:
    """Every ``@triton.jit`` function defined in ``modules``: full name -> `JITFunction`.
    Raises `EdgekvError` if one is an interpreter function (``TRITON_INTERPRET=1`` was
    set when its module was imported): those cannot be compiled."""
    from triton.runtime.jit import JITCallable

    out = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, JITCallable) and value.__module__ == module.__name__:
                if type(value).__name__ != "JITFunction":
                    raise EdgekvError(f"{module.__name__}.{value.__name__} is a {type(value).__name__}: import the "
                                      "kernels without TRITON_INTERPRET=1 to compile them (run_aot_report does)")
                out[f"{value.__module__}.{value.__qualname__}"] = value
    return out


def jit_callees(fn: Any) -> set[str]:
    """Full names of the ``@triton.jit`` functions that the source of ``fn`` refers to
    (``name(...)`` or ``module.name(...)``), resolved in its globals."""
    from triton.runtime.jit import JITCallable

    scope = fn.get_capture_scope()
    out = set()
    for node in ast.walk(fn.parse()):
        value = None
        if isinstance(node, ast.Name):
            value = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = scope.get(node.value.id)
            value = getattr(base, node.attr, None) if isinstance(base, ModuleType) else None
        if isinstance(value, JITCallable):
            out.add(f"{value.__module__}.{value.__qualname__}")
    return out


def _accept_any_device(kernel: object, *tensors: torch.Tensor, **options: object) -> None:
    """Stand-in for `_backend.check_triton_device` while launches are intercepted."""


@contextlib.contextmanager
def intercept_launches(sms: int) -> Iterator[list[Launch]]:
    """Within the block, launches of edgekv's Triton kernels are recorded, not run.

    Yields the list the `Launch` records are appended to. Each `JITFunction` of
    `kernel_modules` gets an instance ``run`` that records its call (a launch is
    ``kernel[grid](...)`` -> ``kernel.run(*args, grid=grid, warmup=False, **kwargs)``);
    each module's ``check_triton_device`` accepts CPU tensors and its ``num_sms``
    returns ``sms`` (the split of the attention kernel follows the SM count). Everything
    is restored on exit, also after an exception.
    """
    modules = kernel_modules()
    kernels = jit_functions(modules)
    launches: list[Launch] = []
    patched: list[tuple[ModuleType, str, Any]] = []

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(fn, args, kwargs, grid))
        return run

    try:
        for fn in kernels.values():
            fn.run = recorder(fn)
        for module in modules:
            for name, stand_in in (("check_triton_device", _accept_any_device), ("num_sms", lambda device: sms)):
                if hasattr(module, name):
                    patched.append((module, name, getattr(module, name)))
                    setattr(module, name, stand_in)
        yield launches
    finally:
        for fn in kernels.values():
            fn.__dict__.pop("run", None)
        for module, name, original in reversed(patched):
            setattr(module, name, original)


def launch_plans(shape: AotShape, dtype: torch.dtype, bits: int) -> list[tuple[str, str, Callable[[], object]]]:
    """``(wrapper, variant, call)`` for each way edgekv calls a launch wrapper, at
    ``shape`` with model dtype ``dtype`` and ``bits``-bit KV rows. ``call()`` builds CPU
    stand-in tensors laid out as the engine's (same dtypes, slices and views; contents
    never read) and calls the wrapper; only shapes, strides, dtypes and alignment reach
    the compile.

    - ``score_blocks_triton`` "key copy": the keys4 scorer's key copies, [Hkv, blocks,
      key_copy_bytes] (the engine keeps 4-bit copies; the wrapper takes every width).
    - ``bound_scores_triton`` "minmax": the minmax scorer's fp16 summary, both halves.
    - ``pooled_decode_attention_triton`` "pooled" (the CUDA decode backend: int32 slots
      into the device cache or the pinned RAM pool, keys before RoPE, a count per KV
      head); ``sparse_decode_attention_triton`` "rope" (gathered rows, keys before
      RoPE: the reference backend) and "rotated" (keys stored rotated: `edgekv bench
      kernels`). The exact sink + tail are views of a longer buffer, as `ExactKV` keeps.
    - ``compress_blocks_triton`` "rows": one block per KV head, K and V in the model dtype
      (the commit of the tiered cache; the keys4 summaries at 4 bits).
    - ``gather_rows_triton`` "rows": selected rows of a row pool.
    - ``qlinear_triton`` "decode" (one token, the fused kernel) and ``dequantize_triton``
      "prefill" (the decoded matrix of a long chunk): the model's square projection
      (hidden x hidden) at ``bits`` 4 or 8 weight bits, group 64; at 4 bits also the
      GGUF forms "q4_1" (group 32) and "q4_k" (integer scales under super-block factors).
    """
    from edgekv.quant import BlockCodec

    from . import block_score_triton, compress_triton, gather_triton, qlinear_triton, sparse_attention_triton
    from ._backend import key_copy_bytes
    from .qlinear import TILE, QuantizedWeight

    codec = BlockCodec(bits, shape.block_size, shape.head_dim)
    hq, hkv, d, b = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.block_size
    nb = shape.context // b
    ksel = max(1, shape.budget // b)

    def q():
        return torch.empty(hq, d, dtype=dtype)

    def exact():  # [Hkv, tail, D] views of [Hkv, capacity, D] buffers
        capacity = 2 * shape.tail
        return (torch.empty(hkv, capacity, d, dtype=dtype)[:, :shape.tail],
                torch.empty(hkv, capacity, d, dtype=dtype)[:, :shape.tail])

    def rope_args() -> dict:
        return dict(block_ids=torch.zeros(hkv, ksel, dtype=torch.int64),
                    rope_inv_freq=torch.empty(d // 2, dtype=torch.float32))

    def score():
        keys = torch.empty(hkv, nb, key_copy_bytes(codec), dtype=torch.uint8)
        return block_score_triton.score_blocks_triton(q(), keys, codec)

    def bound():
        summary = torch.empty(hkv, nb, 2 * d, dtype=torch.float16)  # [kmin | kmax], as selection keeps it
        return block_score_triton.bound_scores_triton(q(), summary[..., :d], summary[..., d:])

    def pooled():
        device_rows = torch.empty(2 * hkv * ksel, codec.row_bytes, dtype=torch.uint8)
        host_rows = torch.empty(2 * hkv * ksel, codec.row_bytes, dtype=torch.uint8)  # its size is no argument
        slots = torch.zeros(hkv, ksel, dtype=torch.int32)
        num_valid = torch.full((hkv,), ksel, dtype=torch.int64)
        return sparse_attention_triton.pooled_decode_attention_triton(
            q(), device_rows, host_rows, slots, codec, *exact(), num_valid=num_valid, **rope_args())

    def gathered(rope: bool):
        def call():
            rows = torch.empty(hkv, ksel, codec.row_bytes, dtype=torch.uint8)
            return sparse_attention_triton.sparse_decode_attention_triton(
                q(), rows, codec, *exact(), **(rope_args() if rope else {}))
        return call

    def compress():
        k = torch.empty(hkv, b, d, dtype=dtype)
        return compress_triton.compress_blocks_triton(k, torch.empty_like(k), codec)

    def gather():
        pool = torch.empty(2 * hkv * ksel, codec.row_bytes, dtype=torch.uint8)
        return gather_triton.gather_rows_triton(pool, torch.arange(hkv * ksel, dtype=torch.int64))

    hidden = hq * d

    def weight(group: int, super_groups: int = 0) -> QuantizedWeight:
        """A stand-in [hidden, hidden] weight of `bits` bits laid out as the decoder keeps it."""
        tiles, groups = hidden // TILE, hidden // group
        codes = torch.empty(tiles, groups, group // 2 if bits == 4 else group, TILE,
                            dtype=torch.uint8 if bits == 4 else torch.int8)
        small = torch.uint8 if super_groups else torch.float16
        scale = torch.empty(tiles, groups, TILE, dtype=small)
        zero = torch.empty(tiles, groups, TILE, dtype=small) if bits == 4 or super_groups else None
        supers = [torch.empty(tiles, -(-groups // super_groups), TILE, dtype=torch.float16) for _ in range(2)] \
            if super_groups else [None, None]
        return QuantizedWeight(bits, hidden, hidden, group, codes, scale, zero, *supers, super_groups)

    def linear(qw: QuantizedWeight, tokens: int):
        def call():
            return qlinear_triton.qlinear_triton(torch.empty(tokens, hidden, dtype=dtype), qw)
        return call

    plans = [("score_blocks_triton", "key copy", score), ("bound_scores_triton", "minmax", bound)]
    if bits in (4, 8):
        plans += [("qlinear_triton", "decode", linear(weight(64), 1)),
                  ("dequantize_triton", "prefill", lambda: qlinear_triton.dequantize_triton(weight(64), dtype))]
    if bits == 4:
        plans += [("qlinear_triton", "q4_1", linear(weight(32), 1)),
                  ("qlinear_triton", "q4_k", linear(weight(32, 8), 1))]
    if hasattr(sparse_attention_triton, "pooled_decode_attention_triton"):
        plans.append(("pooled_decode_attention_triton", "pooled", pooled))
    plans += [("sparse_decode_attention_triton", "rope", gathered(True)),
              ("sparse_decode_attention_triton", "rotated", gathered(False)),
              ("compress_blocks_triton", "rows", compress), ("gather_rows_triton", "rows", gather)]
    return plans


def launch_wrappers(modules: Iterable[ModuleType]) -> list[str]:
    """Names of the public ``*_triton`` functions defined in ``modules``: the launch
    wrappers `launch_plans` must call."""
    return sorted(name for module in modules for name, value in vars(module).items()
                  if name.endswith("_triton") and not name.startswith("_") and callable(value)
                  and getattr(value, "__module__", None) == module.__name__)


# ---- from a launch to a compile ---------------------------------------------------------------


@dataclass
class Spec:
    """What a real launch of ``kernel`` would compile: signature (parameter name ->
    Triton type), constexprs (``(index,)`` -> value), attrs (``(index,)`` -> hints) and
    the parsed launch options (``CUDAOptions``)."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: Any

    def key(self, arch: int) -> str:
        """Identifies the compile: equal keys, identical kernels."""
        return repr((f"{self.kernel.__module__}.{self.kernel.__qualname__}", arch, sorted(self.signature.items()),
                     sorted((k, repr(v)) for k, v in self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(vars(self.options).items())))


def specialize(launch: Launch, backend: Any) -> Spec:
    """The `Spec` of ``launch`` for ``backend`` (``triton.compiler.make_backend(target)``),
    computed by the code a real launch runs (`JITFunction.run`): its keyword defaults,
    the binder of `create_function_from_signature` (types, specialization of ints equal
    to 1 and of 16-divisible values/addresses) and ``JITFunction._pack_args``.

    Raises TypeError for arguments the kernel does not take or is missing (as a launch
    would) and KeyError for an unknown launch option.
    """
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds in Triton 3.9
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Spec(kernel, signature, constexprs, attrs, options)


def check_launch(launch: Launch, spec: Spec) -> list[str]:
    """Problems with ``launch`` as a real launch of its kernel would see it (empty: none):
    every parameter given exactly once (positionally or as a keyword), no keyword that is
    neither a parameter nor a launch option, constexpr parameters given plain values,
    tensors exactly where the signature has pointers."""
    params = [p.name for p in launch.kernel.params]
    by_keyword = [k for k in launch.kwargs if k in params]
    problems = []
    if len(launch.args) + len(by_keyword) != len(params):
        problems.append(f"{len(launch.args)} positional + {len(by_keyword)} keyword arguments for "
                        f"{len(params)} parameters")
    option_names = set(vars(spec.options))
    unknown = [k for k in launch.kwargs if k not in params and k not in option_names]
    if unknown:
        problems.append(f"unknown keywords {unknown}")
    values = dict(zip(params, launch.args)) | {k: launch.kwargs[k] for k in by_keyword}
    for p in launch.kernel.params:
        value, ty = values.get(p.name), spec.signature.get(p.name, "?")
        if p.is_constexpr and isinstance(value, torch.Tensor):
            problems.append(f"constexpr {p.name} got a tensor")
        if isinstance(value, torch.Tensor) != ty.startswith("*"):
            problems.append(f"{p.name}: {type(value).__name__} as {ty}")
    return problems


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def cubin_registers(cubin: bytes, name: str) -> int:
    """Registers per thread of kernel ``name`` in an ELF64 ``cubin``: its
    ``EIATTR_REGCOUNT`` (attribute 0x2f: symbol index, count) in the ``.nv.info``
    section, what ``cuobjdump --dump-resource-usage`` prints as REG."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("not an ELF64 cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, align, entsize
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def text(table_offset: int, at: int) -> bytes:
        start = table_offset + at
        return cubin[start:cubin.index(b"\0", start)]

    sections = {text(headers[shstrndx][4], h[0]): h for h in headers}
    symtab = sections[b".symtab"]
    strtab = headers[symtab[6]][4]
    symbols = {text(strtab, struct.unpack_from("<I", cubin, symtab[4] + i * 24)[0]): i
               for i in range(symtab[5] // 24)}
    index = symbols[name.encode()]
    info = sections[b".nv.info"]
    at, end = info[4], info[4] + info[5]
    while at < end:  # entries: format byte, attribute byte, then a u16 (format 4: its payload size)
        fmt, attr, size = struct.unpack_from("<BBH", cubin, at)
        if fmt == 4:
            if attr == 0x2F and struct.unpack_from("<I", cubin, at + 4)[0] == index:
                return struct.unpack_from("<I", cubin, at + 8)[0]
            at += 4 + size
        else:
            at += 4
    raise ValueError(f"no register count for {name} in the cubin")


@contextlib.contextmanager
def _ptxas_report(buffer: io.StringIO) -> Iterator[None]:
    """ptxas's ``-v`` report (Triton prints it with ``dump_ptxas_log``) goes to ``buffer``."""
    from triton import knobs

    with knobs.nvidia.scope(), contextlib.redirect_stdout(buffer):
        knobs.nvidia.dump_ptxas_log = True
        yield


def compile_spec(spec: Spec, target: Target, backend: Any) -> dict:
    """Compile ``spec`` for ``target``; its figures: regs, spill_stores, spill_loads,
    stack (bytes per thread), shared (bytes per block), num_warps, num_stages,
    fp_fusion, cached (Triton's cache had it: ptxas then reruns on the cached PTX for its
    report), compile_s, and the `occupancy` fields. Raises whatever the compile raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = io.StringIO()
    t0 = time.perf_counter()
    with _ptxas_report(report):
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=GPUTarget("cuda", target.arch, 32), options=vars(spec.options))
    seconds = time.perf_counter() - t0
    cached = not _PTXAS_USED.search(report.getvalue())
    if cached:
        with _ptxas_report(report):
            backend.make_cubin(compiled.asm["ptx"], {}, spec.options, target.arch)
    text = report.getvalue()
    used, frame = _PTXAS_USED.search(text), _PTXAS_FRAME.search(text)
    if used is None or frame is None:
        raise RuntimeError(f"no ptxas -v report for {compiled.metadata.name}: {text[-500:]!r}")
    regs = cubin_registers(compiled.asm["cubin"], compiled.metadata.name)
    if regs != int(used.group(1)):
        raise RuntimeError(f"ptxas reported {used.group(1)} registers, the cubin has {regs}")
    md = compiled.metadata
    stats = dict(regs=regs, stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                 spill_loads=int(frame.group(3)), shared=int(md.shared), num_warps=int(md.num_warps),
                 num_stages=int(md.num_stages), fp_fusion=bool(md.enable_fp_fusion), cached=cached,
                 compile_s=round(seconds, 3))
    return stats | occupancy(regs, stats["shared"], stats["num_warps"], target)


def occupancy(regs: int, shared: int, num_warps: int, target: Target) -> dict:
    """Resident blocks and warps per SM of a kernel with ``regs`` registers per thread,
    ``shared`` bytes of shared memory per block and ``num_warps`` warps per block.

    Returns blocks_per_sm, warps_per_sm, occupancy (warps_per_sm / target.max_warps) and
    limiter, the limit that binds first ("warps", "blocks", "regs" or "smem"; ties in that
    order). Registers: ``ceil(32 * regs / 256) * 256`` per warp, warps per sub-partition
    ``floor(16384 / that)``; shared memory: ``shared + 1 KB`` per block (0 blocks above
    the per-block maximum: the launch would fail).
    """
    per_warp = -(-max(1, regs) * 32 // target.reg_unit) * target.reg_unit
    warps_by_regs = (target.regs_per_sm // target.sub_partitions // per_warp) * target.sub_partitions
    limits = {
        "warps": target.max_warps // num_warps,
        "blocks": target.max_blocks,
        "regs": warps_by_regs // num_warps,
        "smem": target.smem_per_sm // (shared + target.smem_reserved) if shared <= target.smem_per_block else 0,
    }
    blocks = min(limits.values())
    limiter = next(name for name, value in limits.items() if value == blocks)
    warps = blocks * num_warps
    return dict(blocks_per_sm=blocks, warps_per_sm=warps, occupancy=round(warps / target.max_warps, 4),
                limiter=limiter)


# ---- the matrix -------------------------------------------------------------------------------


@dataclass
class AotResult:
    """Everything one run found: ``rows`` (see the module doc); ``coverage``: the
    ``@triton.jit`` functions defined in the kernel modules, launched, and reached from a
    launched one through calls (full names), the public ``*_triton`` launch wrappers and
    those `launch_plans` called; ``launch_problems``: wrappers that raised and
    `check_launch` findings; ``restored``: True when the interception left no patch
    behind; ``meta``: Triton version, fp fusion setting, compiles, wall seconds, matrix."""

    rows: list[dict]
    coverage: dict[str, list[str]] = field(default_factory=dict)
    launch_problems: list[str] = field(default_factory=list)
    restored: bool = True
    meta: dict = field(default_factory=dict)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_matrix(shapes: Iterable[str], targets: Iterable[int], dtypes: Iterable[str],
                 bits: Iterable[int]) -> tuple[tuple, tuple, tuple, tuple]:
    """The four axes as tuples, after checking each is non-empty and known (`SHAPES`,
    `TARGETS`, `DTYPES`, `BITS`); `EdgekvError` otherwise."""
    axes = tuple(shapes), tuple(targets), tuple(dtypes), tuple(bits)
    for name, given, known in zip(("shape", "target", "dtype", "bits"), axes, (SHAPES, TARGETS, DTYPES, BITS)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            raise EdgekvError(f"unknown {name} {bad or list(given)}: choose from {', '.join(map(str, known))}")
    return axes


def compile_matrix(shapes: Iterable[str] = tuple(SHAPES), targets: Iterable[int] = tuple(TARGETS),
                   dtypes: Iterable[str] = tuple(DTYPES), bits: Iterable[int] = BITS, *,
                   progress: Callable[[str], None] | None = _progress) -> AotResult:
    """Record every launch of `launch_plans` for each target, shape, dtype and bit width,
    compile each distinct one once, and return the `AotResult` (in this process: the
    kernel modules must have been imported without ``TRITON_INTERPRET=1``; see
    `run_aot_report`). A failed compile becomes a row with ``error`` set."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from ._backend import check_triton_device, num_sms

    shapes, targets, dtypes, bits = check_matrix(shapes, targets, dtypes, bits)
    t_start = time.perf_counter()
    modules = kernel_modules()
    defined = jit_functions(modules)
    # cells: (kernel, target, shape) -> {(variant, dtype, bits): compile key}
    cells: dict[tuple, dict[tuple, str]] = {}
    wrapper_of: dict[tuple[str, str], str] = {}  # (kernel, variant) -> the wrapper that launched it
    specs: dict[str, tuple[Spec, Target, Any, str]] = {}  # key -> (spec, target, backend, label)
    errors: dict[str, str] = {}
    launched, called, problems = set(), set(), []
    for arch in targets:
        target = TARGETS[arch]
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for shape_name in shapes:
            for dtype_name in dtypes:
                for b in bits:
                    for wrapper, variant, call in launch_plans(SHAPES[shape_name], DTYPES[dtype_name], b):
                        called.add(wrapper)
                        with intercept_launches(target.sms) as launches:
                            try:
                                call()
                            except Exception as exc:  # noqa: BLE001 - a wrapper that fails is a finding
                                problems.append(f"{wrapper} ({variant}, {shape_name}, {dtype_name}, {b}-bit): "
                                                f"{type(exc).__name__}: {exc}")
                        for launch in launches:
                            kernel = launch.kernel.__qualname__
                            name = f"{launch.kernel.__module__}.{kernel}"
                            launched.add(name)
                            try:
                                spec = specialize(launch, backend)
                            except (TypeError, KeyError) as exc:
                                problems.append(f"{name}: {exc}")
                                continue
                            problems.extend(f"{name}: {p}" for p in check_launch(launch, spec))
                            key = spec.key(arch)
                            label = f"{kernel} {variant} sm_{arch} {shape_name} {dtype_name} {b}-bit"
                            specs.setdefault(key, (spec, target, backend, label))
                            cells.setdefault((kernel, arch, shape_name), {})[(variant, dtype_name, b)] = key
                            wrapper_of[(kernel, variant)] = wrapper
                        del launches
    stats: dict[str, dict] = {}
    for i, (key, (spec, target, backend, label)) in enumerate(specs.items(), 1):
        try:
            stats[key] = s = compile_spec(spec, target, backend)
            if progress:
                progress(f"[{i}/{len(specs)}] {label}: {s['regs']} regs, spills {s['spill_stores']}/"
                         f"{s['spill_loads']} B, {s['shared']} B shared ({s['compile_s']:.1f} s"
                         f"{', cached' if s['cached'] else ''})")
        except Exception as exc:  # noqa: BLE001 - a failed compile is a finding, reported in its row
            errors[key] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            if progress:
                progress(f"[{i}/{len(specs)}] {label}: FAILED {errors[key][:200]}")
    rows = []
    for (kernel, arch, shape_name), cell in cells.items():
        for (variant, dtype_name, b), key in _collapse(cell).items():
            wrappers = sorted({w for (k, v), w in wrapper_of.items() if k == kernel and variant in (None, v)})
            rows.append(dict(kernel=kernel, wrapper=", ".join(wrappers), variant=variant, target=arch,
                             shape=shape_name, dtype=dtype_name, bits=b, error=errors.get(key),
                             signature=", ".join(f"{k}: {v}" for k, v in specs[key][0].signature.items()))
                        | stats.get(key, {}))
    reached, frontier = set(launched), [name for name in launched if name in defined]
    while frontier:
        for callee in jit_callees(defined[frontier.pop()]):
            if callee not in reached and callee in defined:
                reached.add(callee)
                frontier.append(callee)
    originals = {"check_triton_device": check_triton_device, "num_sms": num_sms}
    restored = all("run" not in fn.__dict__ for fn in defined.values()) and all(
        getattr(m, name) is original for m in modules for name, original in originals.items() if hasattr(m, name))
    meta = dict(triton=triton.__version__, fp_fusion_env=os.environ.get("TRITON_DEFAULT_FP_FUSION"),
                compiles=len(specs), wall_s=round(time.perf_counter() - t_start, 1), shapes=list(shapes),
                targets=list(targets), dtypes=list(dtypes), bits=list(bits))
    coverage = dict(defined=sorted(defined), launched=sorted(launched), reached=sorted(reached),
                    wrappers=launch_wrappers(modules), called=sorted(called))
    return AotResult(rows, coverage, sorted(set(problems)), restored, meta)


def _collapse(cell: dict[tuple, str]) -> dict[tuple, str]:
    """``{(variant, dtype, bits): key}`` with each of dtype, bits, variant (in that order)
    replaced by None where the compile does not depend on it (one key for all of two or
    more values, whatever the others are)."""
    for axis in (1, 2, 0):
        groups: dict[tuple, set] = {}
        for coords, key in cell.items():
            groups.setdefault(coords[:axis] + coords[axis + 1:], set()).add(key)
        if len({coords[axis] for coords in cell}) > 1 and all(len(keys) == 1 for keys in groups.values()):
            cell = {coords[:axis] + (None,) + coords[axis + 1:]: key for coords, key in cell.items()}
    return cell


# ---- the child process and the report ---------------------------------------------------------


def run_aot(shapes: Iterable[str] = ("small", "llama8b"), targets: Iterable[int] = (80, 89, 90),
            dtypes: Iterable[str] = ("fp16", "bf16"), bits: Iterable[int] = BITS, *,
            fp_fusion: bool = True, progress: bool = True) -> AotResult:
    """`compile_matrix` in a child Python without ``TRITON_INTERPRET`` and with
    ``TRITON_DEFAULT_FP_FUSION`` = 1 (``fp_fusion``) or 0; its progress lines are
    copied to this process's stderr when ``progress``. Raises `EdgekvError` when triton
    is not installed or the child fails."""
    from ._backend import triton_available

    shapes, targets, dtypes, bits = check_matrix(shapes, targets, dtypes, bits)
    if not triton_available():
        raise EdgekvError("the AOT compile check needs the `triton` package: pip install triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1" if fp_fusion else "0"
    with tempfile.TemporaryDirectory(prefix="edgekv-aot-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", "import sys; from edgekv.kernels.aot import main; sys.exit(main(sys.argv[1:]))",
               "--shapes", ",".join(shapes), "--targets", ",".join(map(str, targets)),
               "--dtypes", ",".join(dtypes), "--bits", ",".join(map(str, bits)), "--json", str(out)]
        tail: list[str] = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr:
                tail = (tail + [line])[-40:]
                if progress:
                    sys.stderr.write(line)
                    sys.stderr.flush()
        if proc.returncode != 0 or not out.exists():
            raise EdgekvError(f"the AOT compile process failed (exit {proc.returncode}):\n{''.join(tail)}")
        data = json.loads(out.read_text())
    return AotResult(**data)


def run_aot_report(shapes: Iterable[str] = ("small", "llama8b"), targets: Iterable[int] = (80, 89, 90), *,
                   fp_fusion: bool = True, progress: bool = True) -> list[dict]:
    """Compile every Triton kernel edgekv launches for each of ``targets`` (80, 89, 90)
    at each of ``shapes`` ("small", "llama8b"), fp16 and bf16, 2/4/8/16-bit KV; return the
    rows (see the module doc; `aot_table` formats them), progress on stderr. No GPU
    needed; see `run_aot` for the child process."""
    return run_aot(shapes, targets, fp_fusion=fp_fusion, progress=progress).rows


def aot_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, sorted by kernel, shape, target. "-" in
    variant, dtype or bits: the compile is the same for every value; spills are store /
    load bytes per thread, stack bytes per thread, shared KB per block; occupancy is
    resident warps per SM out of the target's maximum, and what limits it."""
    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    head = (f"{'kernel':<16} {'variant':<9} {'sm':>3} {'shape':<8} {'dtype':<5} {'bits':>4} {'warps':>5} "
            f"{'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem KB':>7} {'blk/SM':>6} {'warps/SM':>8} "
            f"{'occ':>4}  limit")
    lines = [head, "-" * len(head)]
    order = {"_score_kernel": 0, "_bound_kernel": 1, "_partial_kernel": 2, "_merge_kernel": 3,
             "_compress_kernel": 4, "_gather_kernel": 5}
    for r in sorted(rows, key=lambda r: (order.get(r["kernel"], 9), r["kernel"], r["shape"], r["target"],
                                         cell(r["variant"]), cell(r["dtype"]), r["bits"] or 0)):
        start = (f"{r['kernel']:<16} {cell(r['variant']):<9} {r['target']:>3} {r['shape']:<8} {cell(r['dtype']):<5} "
                 f"{cell(r['bits']):>4}")
        if r.get("error"):
            lines.append(f"{start} FAILED: {r['error'].splitlines()[0][:100]}")
            continue
        lines.append(f"{start} {r['num_warps']:>5} {r['regs']:>4} {r['spill_stores']:>5}/{r['spill_loads']:<5} "
                     f"{r['stack']:>5} {r['shared'] / 1024:>7.1f} {r['blocks_per_sm']:>6} {r['warps_per_sm']:>8} "
                     f"{r['occupancy']:>4.0%}  {r['limiter']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -c 'from edgekv.kernels.aot import main; main()' [--shapes small,llama8b]
    [--targets 80,89,90] [--dtypes fp16,bf16] [--bits 2,4,8,16] [--json PATH]``: compile
    in this process (``TRITON_INTERPRET`` must be unset) and write the `AotResult` as JSON
    to PATH, or print the table."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,llama8b")
    parser.add_argument("--targets", default="80,89,90")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--bits", default="2,4,8,16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile the kernels (or use run_aot_report)", file=sys.stderr)
        return 2
    result = compile_matrix(args.shapes.split(","), [int(x) for x in args.targets.split(",")],
                            args.dtypes.split(","), [int(x) for x in args.bits.split(",")])
    if args.json is not None:
        args.json.write_text(json.dumps(vars(result)))
    else:
        print(aot_table(result.rows))
    return 0
