"""`edgekv bench kernels`: each kernel of `edgekv.kernels` timed against its torch twin.

Per kernel: median wall time of the torch twin, of the Triton kernel and (block scoring
and sparse attention on the CPU) of the compiled numba kernel, the Triton speedup, and
the bandwidth each achieved (bytes the kernel must read, plus write for compress
and gather, divided by its time). Sparse attention is also compared with dense
``scaled_dot_product_attention`` over the full 16-bit K/V of the same context: the
speed a sparse decode step buys.

Shapes (one decoder layer, one decode token):
- ``llama8b``: Llama-3.1-8B — 32 query heads, 8 KV heads, head_dim 128, 128K context,
  block 32, 4-bit rows, budget 2,048 tokens (64 selected blocks) + a 64-token exact tail.
- ``small``: SmolLM2-135M (the embedded model) — 9 query heads, 3 KV heads, head_dim
  64, 8K context, block 16, 4-bit, budget 1,024 tokens + a 32-token tail.
Without CUDA only the torch twins and SDPA run, at a reduced context (Triton's CPU
interpreter measures nothing useful); the Triton column needs a GPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import EdgekvError
from .quant import BlockCodec


@dataclass(frozen=True, slots=True)
class BenchShape:
    """One layer's decode-step shapes."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context: int  # tokens
    block_size: int  # tokens
    bits: int
    budget: int  # selected tokens (whole blocks)
    tail: int  # exact recent tokens
    cpu_context: int  # context used without CUDA

    @property
    def num_blocks(self) -> int:
        return self.context // self.block_size

    @property
    def selected_blocks(self) -> int:
        """Blocks attended per step: the budget, capped at the context."""
        return max(1, min(self.budget, self.context) // self.block_size)


SHAPES = {
    "llama8b": BenchShape("llama8b", 32, 8, 128, 131072, 32, 4, 2048, 64, cpu_context=16384),
    "small": BenchShape("small", 9, 3, 64, 8192, 16, 4, 1024, 32, cpu_context=8192),
}


def _timer(device: torch.device, repeats: int, warmup: int) -> Callable[[Callable[[], object]], float]:
    """A function that returns the median seconds of one call of ``fn``."""
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(repeats):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def _row(kernel: str, shape: str, nbytes: int, torch_s: float, triton_s: float | None,
         dense_s: float | None = None, note: str = "", numba_s: float | None = None) -> dict:
    def gbps(seconds: float | None) -> float | None:
        return nbytes / seconds / 1e9 if seconds else None

    return {
        "kernel": kernel, "shape": shape, "bytes": nbytes,
        "torch_ms": torch_s * 1e3, "triton_ms": None if triton_s is None else triton_s * 1e3,
        "numba_ms": None if numba_s is None else numba_s * 1e3,
        "speedup": None if triton_s is None else torch_s / triton_s,
        "torch_gbps": gbps(torch_s), "triton_gbps": gbps(triton_s),
        "dense_ms": None if dense_s is None else dense_s * 1e3,
        "vs_dense": None if dense_s is None else dense_s / (triton_s or torch_s),
        "note": note,
    }


def run_kernel_bench(*, device: str = "cpu", shapes: str = "small", context: int | None = None,
                     repeats: int = 20, warmup: int = 3, dtype: torch.dtype | None = None,
                     print_table: bool = True) -> list[dict]:
    """Time every kernel against its torch twin on one layer of ``shapes``.

    device: "cpu" or "cuda[:N]". context: tokens (default: the shape's, reduced on CPU).
    dtype: the model dtype of q and the tail (default fp16 on CUDA, fp32 on CPU).
    Returns one dict per kernel: kernel, shape, bytes, torch_ms, triton_ms, speedup
    (torch / triton), torch_gbps, triton_gbps, dense_ms and vs_dense (attention only:
    dense SDPA time over the sparse kernel's), note. Prints a table when ``print_table``.
    """
    if shapes not in SHAPES:
        raise EdgekvError(f"unknown kernel bench shapes {shapes!r}: choose one of {', '.join(SHAPES)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgekvError("--device cuda was asked for but CUDA is not available; use --device cpu")
    shape = SHAPES[shapes]
    on_gpu = dev.type == "cuda"
    ctx = context or (shape.context if on_gpu else shape.cpu_context)
    shape = replace(shape, context=max(shape.block_size, ctx // shape.block_size * shape.block_size))
    dtype = dtype or (torch.float16 if on_gpu else torch.float32)
    triton_ok = on_gpu and _triton_importable()
    note = "" if triton_ok else ("Triton needs a GPU" if not on_gpu else "triton not installed")
    measure = _timer(dev, repeats, warmup)
    rows_out = [
        *_bench_scores(shape, dev, dtype, measure, triton_ok, note),
        *_bench_attention(shape, dev, dtype, measure, triton_ok, note),
        *_bench_compress(shape, dev, dtype, measure, triton_ok, note),
        _bench_gather(shape, dev, measure, triton_ok, note),
    ]
    if print_table:
        print(format_table(rows_out, shape, dev, dtype))
    return rows_out


def _numba_runs(dev: torch.device) -> bool:
    from edgekv.kernels._backend import numba_available

    return dev.type == "cpu" and numba_available()


def _triton_importable() -> bool:
    from edgekv.kernels._backend import triton_available

    return triton_available()


def _label(shape: BenchShape, dtype: torch.dtype) -> str:
    return (f"{shape.name} ctx={shape.context} Hq={shape.num_heads} Hkv={shape.num_kv_heads} "
            f"D={shape.head_dim} B={shape.block_size} {shape.bits}b {str(dtype).removeprefix('torch.')}")


def _random_rows(codec: BlockCodec, hkv: int, n: int, dev: torch.device) -> torch.Tensor:
    """[hkv, n, row_bytes] valid rows (random bytes with sane fp16 scale/zero segments)."""
    one = codec.encode(torch.randn(4, codec.block_size, codec.head_dim),
                       torch.randn(4, codec.block_size, codec.head_dim))
    rows = one.to(dev).repeat((hkv * n + 3) // 4, 1)[: hkv * n]
    if codec.bits < 16:
        rows[:, : 2 * codec.code_bytes] = torch.randint(0, 256, (hkv * n, 2 * codec.code_bytes),
                                                       dtype=torch.uint8, device=dev)
    return rows.view(hkv, n, codec.row_bytes)


def _bench_scores(shape, dev, dtype, measure, triton_ok, note) -> list[dict]:
    from edgekv.kernels.block_score import bound_scores, key_copy, score_blocks

    codec = BlockCodec(shape.bits, shape.block_size, shape.head_dim)
    hkv, nb, d = shape.num_kv_heads, shape.num_blocks, shape.head_dim
    keys = key_copy(_random_rows(codec, hkv, nb, dev), codec)  # the GPU-resident key copy
    q = torch.randn(shape.num_heads, d, device=dev, dtype=dtype)
    nbytes = keys.numel()
    t_torch = measure(lambda: score_blocks(q, keys, codec, backend="torch"))
    t_triton = measure(lambda: score_blocks(q, keys, codec, backend="triton")) if triton_ok else None
    t_numba = measure(lambda: score_blocks(q, keys, codec, backend="numba")) if _numba_runs(dev) else None
    out = [_row("block_score (4-bit key copy)", f"{hkv}x{nb} blocks", nbytes, t_torch, t_triton, note=note,
                numba_s=t_numba)]
    kmin = torch.randn(hkv, nb, d, device=dev).half()
    kmax = kmin + 1
    nbytes = 2 * kmin.numel() * 2
    t_torch = measure(lambda: bound_scores(q, kmin, kmax, backend="torch"))
    t_triton = measure(lambda: bound_scores(q, kmin, kmax, backend="triton")) if triton_ok else None
    out.append(_row("bound_score (Quest min/max)", f"{hkv}x{nb} blocks", nbytes, t_torch, t_triton, note=note))
    return out


def _bench_attention(shape, dev, dtype, measure, triton_ok, note) -> list[dict]:
    import torch.nn.functional as F

    from edgekv.kernels.sparse_attention import sparse_decode_attention

    codec = BlockCodec(shape.bits, shape.block_size, shape.head_dim)
    hkv, d, ksel = shape.num_kv_heads, shape.head_dim, shape.selected_blocks
    rows = _random_rows(codec, hkv, ksel, dev)
    q = torch.randn(shape.num_heads, d, device=dev, dtype=dtype)
    tail_k = torch.randn(hkv, shape.tail, d, device=dev, dtype=dtype)
    tail_v = torch.randn(hkv, shape.tail, d, device=dev, dtype=dtype)
    nbytes = rows.numel() + 2 * tail_k.numel() * tail_k.element_size()
    t_torch = measure(lambda: sparse_decode_attention(q, rows, codec, tail_k, tail_v, backend="torch"))
    t_triton = None
    if triton_ok:
        t_triton = measure(lambda: sparse_decode_attention(q, rows, codec, tail_k, tail_v, backend="triton"))
    t_numba = None
    if _numba_runs(dev):
        t_numba = measure(lambda: sparse_decode_attention(q, rows, codec, tail_k, tail_v, backend="numba"))
    # dense baseline: every token of the context, 16-bit K/V (fp32 on CPU unless asked)
    k = torch.randn(1, hkv, shape.context, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    qd = q.view(1, shape.num_heads, 1, d)
    t_dense = measure(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True))
    label = f"{ksel} blocks + {shape.tail} tail"
    dense_bytes = 2 * k.numel() * k.element_size()
    return [_row("sparse_attention", label, nbytes, t_torch, t_triton, dense_s=t_dense, note=note,
                 numba_s=t_numba),
            _row("dense SDPA (baseline)", f"all {shape.context} tokens", dense_bytes, t_dense, None)]


def _bench_compress(shape, dev, dtype, measure, triton_ok, note) -> list[dict]:
    from edgekv.kernels.compress import compress_blocks

    codec = BlockCodec(shape.bits, shape.block_size, shape.head_dim)
    hkv, d, b = shape.num_kv_heads, shape.head_dim, shape.block_size
    out = []
    for n, what in ((1, "1 block (decode)"), (64, "64 blocks (prefill)")):
        k = torch.randn(hkv, n * b, d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        nbytes = 2 * k.numel() * k.element_size() + hkv * n * (codec.row_bytes + 4 * d)
        t_torch = measure(lambda: compress_blocks(k, v, codec, backend="torch"))
        t_triton = measure(lambda: compress_blocks(k, v, codec, backend="triton")) if triton_ok else None
        out.append(_row("compress+summary", f"{hkv} heads x {what}", nbytes, t_torch, t_triton, note=note))
    return out


def _bench_gather(shape, dev, measure, triton_ok, note) -> dict:
    from edgekv.kernels.gather import gather_rows

    codec = BlockCodec(shape.bits, shape.block_size, shape.head_dim)
    capacity = shape.num_kv_heads * shape.num_blocks
    n = shape.num_kv_heads * shape.selected_blocks
    pool = torch.randint(0, 256, (capacity, codec.row_bytes), dtype=torch.uint8)
    if dev.type == "cuda":
        pool = pool.pin_memory()
    slots = torch.randperm(capacity)[:n].to(dev)
    out = torch.empty(n, codec.row_bytes, dtype=torch.uint8, device=dev)
    nbytes = 2 * n * codec.row_bytes
    t_torch = measure(lambda: gather_rows(pool, slots, out, backend="torch"))
    t_triton = measure(lambda: gather_rows(pool, slots, out, backend="triton")) if triton_ok else None
    where = "pinned host -> GPU" if dev.type == "cuda" else "RAM -> RAM"
    return _row("gather rows", f"{n} of {capacity} rows, {where}", nbytes, t_torch, t_triton, note=note)


def format_table(rows: list[dict], shape: BenchShape, dev: torch.device, dtype: torch.dtype) -> str:
    """The results as a fixed-width text table."""
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = (f"{'kernel':<30} {'shape':<32} {'MB':>8} {'torch ms':>9} {'numba ms':>9} {'triton ms':>9} "
            f"{'speedup':>7} {'torch GB/s':>10} {'triton GB/s':>11} {'dense ms':>9} {'vs dense':>8}")
    lines = [f"kernel bench on {dev} — {_label(shape, dtype)}", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<30} {r['shape']:<32} {r['bytes'] / 1e6:>8.2f} {num(r['torch_ms'], '.3f'):>9} "
            f"{num(r['numba_ms'], '.3f'):>9} "
            f"{num(r['triton_ms'], '.3f'):>9} {num(r['speedup'], '.2f'):>7} {num(r['torch_gbps'], '.2f'):>10} "
            f"{num(r['triton_gbps'], '.2f'):>11} {num(r['dense_ms'], '.3f'):>9} {num(r['vs_dense'], '.1f'):>8}")
    notes = sorted({r["note"] for r in rows if r["note"]})
    if notes:
        lines.append("triton column: " + "; ".join(notes) + " (run with --device cuda on a CUDA machine)")
    lines.append("MB: bytes each kernel must move (read; + written for compress and gather). "
                 "vs dense: dense SDPA over the whole context's 16-bit K/V, time / sparse time "
                 "(Triton's, else the twin's). numba: the compiled CPU kernels, where there is one.")
    return "\n".join(lines)
