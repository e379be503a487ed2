"""Measure the machine: what `edgekv tune`'s cost model needs to know, in its units.

`measure_hardware(shape, disk_dir)` times, on this machine and at the model's shapes:

    RAM           read bandwidth (a sum over 256 MiB)
    tiers         `TierStore.get` of rows with a RAM home that miss the device cache (the
                  store's own gather + cache insert, + the host->device copy on CUDA);
                  the disk tier on the REAL tier file (a TierStore with a disk dir): writes
                  (put spilling everything, + fsync), reads of consecutive and of random
                  slots with the file's pages dropped from the page cache first (one preadv
                  per run of slots, as the store reads)
    weights       one-token products (`model.linear`) of a layer's matrices: fp32 and fp16
                  weights, in weight bytes/s; at 1, cores and threads, keeping the fastest
    prefill       a chunk's products (512 tokens), fp32 and widened fp16 weights; dense
                  attention of a chunk over 2K keys; dense decode attention per key
    KV path       a one-layer `TieredKVCache` of the model's heads, decode steps (the
                  engine's own select + fetch + attend) at two contexts: seconds per
                  attended block per bit width, per scored block per scorer, fixed cost
                  per layer; decoding stored rows (what a prefill chunk does), compressing
    CUDA          (guarded) pinned H2D / D2H, device memory bandwidth, fp16 GEMM, free memory

and reads the capacities (RAM, free disk at the disk dir, device memory). `measure_engine_runs`
then times short real runs of the engine (11 runs, 512 and 2048 tokens, decoding in turns),
which `costmodel.fit_calibration` fits its constants to. Here (2 cores, no GPU, shared with
other jobs) the micro-benchmarks took 32-94 s and the engine runs about 1.5 min.
"""

from __future__ import annotations

import dataclasses
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True, slots=True)
class Capacity:
    """What this machine can hold now, in bytes (device: 0 without CUDA)."""

    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    device_total_bytes: int = 0
    device_free_bytes: int = 0
    has_cuda: bool = False


def probe_capacity(disk_dir: str | os.PathLike | None = None) -> Capacity:
    """RAM total/available (psutil), free disk where the disk tier goes, device memory (torch)."""
    import psutil

    from .loader import cache_root

    vm = psutil.virtual_memory()
    where = _existing_parent(disk_dir or cache_root() / "kv")
    dev_total = dev_free = 0
    has_cuda = _cuda_available()
    if has_cuda:
        import torch

        dev_free, dev_total = torch.cuda.mem_get_info()
    return Capacity(vm.total, vm.available, shutil.disk_usage(where).free, dev_total, dev_free, has_cuda)


def _existing_parent(path) -> str:
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install reads as no CUDA
        return False


@dataclass(frozen=True, slots=True)
class HardwareFigures:
    """One machine's measured (or published) figures. GB = 1e9 bytes; per-block figures are
    for one (KV head, block) of `kernel_block_size` tokens x `kernel_head_dim` channels."""

    source: str  # "measured on <host>, <date>" or "published: <spec>"
    device_type: str  # "cpu" or "cuda": where a policy with device "auto" runs
    device_name: str
    cpu_name: str
    cpu_cores: int
    cpu_threads: int
    threads: int  # torch threads the figures were taken with (the fastest measured)
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    device_total_bytes: int
    device_free_bytes: int
    ram_read_gbps: float
    tier_ram_fetch_gbps: float  # TierStore.get of RAM-homed rows missing the device cache
    disk_read_gbps: float  # TierStore.get of disk-homed rows in consecutive slots, cold
    disk_read_latency_s: float  # extra per random row (one preadv each), cold
    disk_write_gbps: float  # TierStore.put spilling to disk, fsync included
    matvec_fp32_gbps: float  # weight bytes/s of one-token products
    matvec_fp16_gbps: float
    matvec_int8_gbps: float  # packed weight bytes/s of the quantized kernels (0: not measured)
    matvec_int4_gbps: float
    matmul_gflops: float  # a prefill chunk's products, weights in the activation dtype
    matmul_widen_gflops: float  # the same with narrower weights widened per chunk (CPU fp16)
    attention_gflops: float  # dense attention of a prefill chunk
    dense_attend_s_per_token: float  # decode attention over the exact KV, per (KV head, token)
    kv_step_overhead_s: float  # the offloaded KV path's fixed cost per layer and decode step (beyond dense's)
    attend_2bit_s_per_block: float
    attend_4bit_s_per_block: float
    attend_8bit_s_per_block: float
    attend_16bit_s_per_block: float
    select_keys4_s_per_block: float  # scoring + top-k per (KV head, block)
    select_mass_s_per_block: float
    select_call_s: float  # selection's fixed cost per sparse layer and decode step
    kv_decode_s_per_row: float  # a stored row decoded by a prefill chunk
    compress_s_per_row: float  # a block compressed and summarised
    kernel_block_size: int
    kernel_head_dim: int
    h2d_gbps: float  # CUDA pinned copies (0 without CUDA)
    d2h_gbps: float
    device_mem_gbps: float
    device_gemm_gflops: float
    measure_s: float  # how long the measurement took

    def replace(self, **changes) -> "HardwareFigures":
        return dataclasses.replace(self, **changes)

    def with_capacity(self, cap: Capacity) -> "HardwareFigures":
        return self.replace(ram_total_bytes=cap.ram_total_bytes, ram_available_bytes=cap.ram_available_bytes,
                            disk_free_bytes=cap.disk_free_bytes, device_total_bytes=cap.device_total_bytes,
                            device_free_bytes=cap.device_free_bytes)

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.ram_total_bytes, self.ram_available_bytes, self.disk_free_bytes,
                        self.device_total_bytes, self.device_free_bytes, self.device_type == "cuda")


HARDWARE_FIELDS = tuple(f.name for f in dataclasses.fields(HardwareFigures))


class StepProgress:
    """`label [####......] 3/12 step name` on stderr: redrawn in place on a terminal, a line per step otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 24):
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0

    def __call__(self, name: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {name}"
        if self.tty:
            line = "\r" + line.ljust(100) + ("\n" if self.done >= self.total else "")
        else:
            line += "\n"
        self.stream.write(line)
        self.stream.flush()


def _best_s(fn: Callable[[], object], *, min_reps: int = 3, min_s: float = 0.15,
            sync: Callable = lambda: None) -> float:
    """Seconds of one call of fn: the fastest of at least min_reps calls / min_s seconds,
    after a warm-up call. The fastest, not the median: on a shared machine every slower
    call is the same work plus someone else's (timeit's rule)."""
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return min(times)


# ---- the micro-benchmarks ----------------------------------------------------------------------

def _ram_read_gbps() -> float:
    import torch

    x = torch.ones(64 << 20)  # 256 MiB of fp32
    return x.nbytes / _best_s(lambda: x.sum()) / 1e9


def _tier_ram_fetch_gbps(row_bytes: int, device) -> float:
    """Rows with a RAM home, read by `TierStore.get` past a device cache that holds one batch."""
    import torch

    from .tiers import TierStore

    batch, n = 1024, max(8192, (64 << 20) // row_bytes)
    with TierStore(row_bytes, device_cache_bytes=batch * row_bytes, ram_bytes=n * row_bytes, disk_dir=None,
                   disk_bytes=0, device=device) as store:
        store.put(torch.arange(n), torch.randint(0, 255, (n, row_bytes), dtype=torch.uint8))
        order = torch.randperm(n)
        batches = iter(order[i:i + batch] for i in range(0, n - batch + 1, batch))
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        seconds = _best_s(lambda: store.get(next(batches)), min_reps=5, min_s=0.0, sync=sync)
    return batch * row_bytes / seconds / 1e9


def _drop_page_cache(path: str) -> None:
    """Flush the file and ask the kernel to drop its cached pages (reads after this hit the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _disk_figures(row_bytes: int, disk_dir: str, total_bytes: int) -> tuple[float, float, float]:
    """(read GB/s in consecutive slots, extra seconds per random row, write GB/s) of the
    disk tier: a TierStore with no RAM budget, so every put spills to its file."""
    import torch

    from .tiers import TierStore

    n = max(4096, total_bytes // row_bytes)
    batch = 1024
    os.makedirs(disk_dir, exist_ok=True)
    with TierStore(row_bytes, device_cache_bytes=batch * row_bytes, ram_bytes=0, disk_dir=disk_dir,
                   disk_bytes=n * row_bytes, device="cpu") as store:
        rows = torch.randint(0, 255, (4096, row_bytes), dtype=torch.uint8)
        t0 = time.perf_counter()
        for first in range(0, n, 4096):
            count = min(4096, n - first)
            store.put(torch.arange(first, first + count), rows[:count])
        _drop_page_cache(store.disk_path)  # includes the fsync: the bytes are on the disk
        write_gbps = n * row_bytes / (time.perf_counter() - t0) / 1e9
        seq = []
        for first in range(0, min(n, 64 * batch) - batch + 1, batch):  # consecutive slots: one preadv per 1024 rows
            t0 = time.perf_counter()
            store.get(torch.arange(first, first + batch))
            seq.append(time.perf_counter() - t0)
        seq_s_per_row = min(seq) / batch
        _drop_page_cache(store.disk_path)
        picks = torch.randperm(n)[:4 * 256]
        rand = []
        for i in range(0, len(picks), 256):  # random slots: about one preadv per row
            t0 = time.perf_counter()
            store.get(picks[i:i + 256])
            rand.append(time.perf_counter() - t0)
        rand_s_per_row = min(rand) / 256
    return row_bytes / seq_s_per_row / 1e9, max(0.0, rand_s_per_row - seq_s_per_row), write_gbps


def _layer_matrices(shape, dtype, device):
    """One layer's projection weights [out, in] as the decoder stacks them: qkv, o, gate_up, down."""
    import torch

    s = shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    sizes = ((q + 2 * kv, s.hidden_size), (s.hidden_size, q), (2 * s.intermediate_size, s.hidden_size),
             (s.hidden_size, s.intermediate_size))
    return [torch.randn(o, i, device=device).to(dtype) * 0.02 for o, i in sizes]


def _matvec_gbps(shape, weight_dtype, act_dtype, device, sync, bits: int = 16) -> float:
    """Weight bytes/s of one token through the products of layers (`model.linear`): as many
    layers as the model has, up to 256 MiB of weights (a decode step reads weights that
    are not in any cache). bits 4/8: the matrices quantized (`kernels.qlinear`), their
    packed bytes counted."""
    import torch

    from .kernels.qlinear import QuantizedWeight, quantize_weight
    from .model import linear

    one = _layer_matrices(shape, weight_dtype, device)
    if bits in (4, 8):
        one = [quantize_weight(w.float().cpu(), bits).to(device) for w in one]

    def nbytes(w) -> int:
        return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()

    copies = max(1, min(shape.num_layers, (256 << 20) // sum(nbytes(w) for w in one)))
    mats = one + [_copy(w) for _ in range(copies - 1) for w in one]
    xs = [torch.randn(1, w.in_features if isinstance(w, QuantizedWeight) else w.shape[1], device=device,
                      dtype=act_dtype) for w in mats]
    seconds = _best_s(lambda: [linear(x, w) for x, w in zip(xs, mats)], min_reps=5, sync=sync)
    return sum(nbytes(w) for w in mats) / seconds / 1e9


def _copy(w):
    """A copy of a weight in memory of its own (so repeated layers are not read from cache)."""
    import torch

    if isinstance(w, torch.Tensor):
        return w.clone()
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).clone() for f in dataclasses.fields(w)
                                     if isinstance(getattr(w, f.name), torch.Tensor)})


def _matmul_gflops(shape, weight_dtype, act_dtype, device, sync, chunk: int = 512) -> float:
    import torch

    from .model import linear

    mats = _layer_matrices(shape, weight_dtype, device)
    xs = [torch.randn(chunk, w.shape[1], device=device, dtype=act_dtype) for w in mats]
    seconds = _best_s(lambda: [linear(x, w) for x, w in zip(xs, mats)], sync=sync)
    return 2 * chunk * sum(w.numel() for w in mats) / seconds / 1e9


def _attention_figures(shape, act_dtype, device, sync) -> tuple[float, float]:
    """(prefill attention GFLOP/s of a 512-token chunk over 2K keys, decode seconds per (KV head, key))."""
    import torch

    from .attention import dense_attention

    s, chunk, keys = shape, 512, 2048
    q = torch.randn(s.num_heads, chunk, s.head_dim, device=device, dtype=act_dtype)
    k = torch.randn(s.num_kv_heads, 4 * keys, s.head_dim, device=device, dtype=act_dtype)
    prefill = _best_s(lambda: dense_attention(q, k[:, :keys], k[:, :keys], q_start=keys - chunk), sync=sync)
    q1 = q[:, :1]
    short = _best_s(lambda: dense_attention(q1, k[:, :keys], k[:, :keys], q_start=keys - 1), min_reps=9, sync=sync)
    long = _best_s(lambda: dense_attention(q1, k, k, q_start=4 * keys - 1), min_reps=9, sync=sync)
    per_key = max(long - short, 1e-12) / (s.num_kv_heads * 3 * keys)  # 3 * keys more keys in the long one
    return 4 * s.num_heads * s.head_dim * chunk * keys / prefill / 1e9, per_key


def _one_layer_model(source, shape, folder: str) -> str:
    """A random one-layer model with the heads of `shape` (and the tokenizer of `source`) in
    a Hugging Face folder: a decode step of it is one layer's KV path through the real engine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    s = shape
    config = LlamaConfig(vocab_size=512, hidden_size=s.num_heads * s.head_dim, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                         head_dim=s.head_dim, max_position_embeddings=s.max_context, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of ours
    try:
        LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source.folder / name).exists():
            shutil.copy(source.folder / name, os.path.join(folder, name))
    return folder


def _decode_step_s(engine, ids: list[int], steps: int = 16) -> float:
    """Seconds of one decode step of `engine` after the prompt `ids` (its KV reused when
    cached): `Engine.stream` timed token by token, the fastest of `steps` (as `_best_s`)."""
    tokens = engine.stream(ids, max_new_tokens=steps + 1, ignore_eos=True)
    next(tokens)  # prefill and the first token
    times = []
    while True:
        t0 = time.perf_counter()
        try:
            next(tokens)
        except StopIteration:
            break
        times.append(time.perf_counter() - t0)
    return min(times)


def _kv_path_figures(folder: str, shape, device: str, block_size: int, threads: int, ram_gbps: float,
                     dense_per_token: float, progress) -> dict[str, float]:
    """Seconds per attended block (per bit width), per scored block (keys4, mass) and the
    offloaded KV path's fixed cost per layer (beyond the dense path's step), from decode
    steps of a one-layer engine at two contexts; seconds per row decoded (what a prefill
    chunk does to the stored rows) and compressed."""
    import torch

    from .engine import load
    from .kernels import compress_blocks
    from .quant import BlockCodec
    from .selection import budget_blocks

    s = shape
    small, large = 1024, max(2048, min(4096, s.max_context - 64))
    ids = torch.randint(0, 512, (large,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = {n: max(0, n - 64) // block_size for n in (small, large)}  # compressed blocks per KV head
    chosen = {n: budget_blocks("10%", context=n, tail=n - blocks[n] * block_size, block_size=block_size,
                               num_blocks=blocks[n], sink_blocks=1) for n in (small, large)}
    pairs = s.num_kv_heads * (blocks[large] - blocks[small])  # (KV head, block) pairs added
    common = dict(device=device, block_size=block_size, disk_bytes=0, recent_window=64, speculate=False,
                  threads=threads)
    # a block cannot be attended or scored faster than its bytes are read: the floor of a
    # slope that a busy machine's noise made vanish
    floor = {bits: BlockCodec(bits=bits, block_size=block_size, head_dim=s.head_dim).row_bytes / (ram_gbps * 1e9)
             for bits in (2, 4, 8, 16)}
    out: dict[str, float] = {}
    dense = load(folder, progress=False, offload=False, device=device, threads=threads)
    try:  # the step without the offloaded KV path: the token's own work and one layer's
        t_dense = _decode_step_s(dense, ids[:small]) - dense_per_token * s.num_kv_heads * small
    finally:
        dense.close()
    for bits in (4, 2, 8, 16):
        engine = load(folder, progress=False, kv_bits=bits, **common)
        try:
            t = {n: _decode_step_s(engine, ids[:n]) for n in (small, large)}
            per_block = max((t[large] - t[small]) / pairs, floor[bits])
            out[f"attend_{bits}bit_s_per_block"] = per_block
            if bits == 4:
                out["kv_step_overhead_s"] = max(0.0, t[small] - t_dense - per_block * s.num_kv_heads * blocks[small])
                for scorer in ("keys4", "mass"):
                    engine.update_policy(budget="10%", scorer=scorer)
                    sel = {n: _decode_step_s(engine, ids[:n]) for n in (small, large)}
                    attended = per_block * s.num_kv_heads * (chosen[large] - chosen[small])
                    scored = max((sel[large] - sel[small] - attended) / pairs, floor[4] / 2)
                    out[f"select_{scorer}_s_per_block"] = scored
                    if scorer == "keys4":  # the small sparse step beyond its blocks and the dense step's fixed cost
                        saved = per_block * s.num_kv_heads * (blocks[small] - chosen[small])
                        per_call = sel[small] - t[small] + saved - scored * s.num_kv_heads * blocks[small]
                        out["select_call_s"] = max(0.0, per_call)
        finally:
            engine.close()
        progress(f"KV path, {bits}-bit rows")
    dtype = torch.float16 if device == "cuda" else torch.float32
    codec = BlockCodec(bits=4, block_size=block_size, head_dim=s.head_dim)
    keys = torch.randn(s.num_kv_heads, 64 * block_size, s.head_dim, device=device, dtype=dtype)
    rows = compress_blocks(keys, keys, codec).reshape(-1, codec.row_bytes)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out["compress_s_per_row"] = _best_s(lambda: compress_blocks(keys, keys, codec), sync=sync) / rows.shape[0]
    out["kv_decode_s_per_row"] = _best_s(lambda: codec.decode(rows, dtype=dtype), sync=sync) / rows.shape[0]
    return out


def _cuda_figures(sync) -> dict[str, float]:
    """Pinned host<->device copies, device memory bandwidth, fp16 GEMM (CUDA events)."""
    import torch

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        times = []
        for _ in range(5):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    h2d = host.nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    d2h = host.nbytes / timed(lambda: host.copy_(dev, non_blocking=True)) / 1e9
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(big)
    mem = 2 * big.nbytes / timed(lambda: other.copy_(big)) / 1e9
    del big, other
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    gemm = 2 * 8192**3 / timed(lambda: a @ a) / 1e9
    return {"h2d_gbps": h2d, "d2h_gbps": d2h, "device_mem_gbps": mem, "device_gemm_gflops": gemm}


def _best_threads(shape, folder: str, candidates: list[int]) -> int:
    """The thread count under which a decode step would run fastest: the model's weights
    read by one-token products, plus its layers' KV path timed through a one-layer engine
    (threads interact: the compiled kernels' thread pool and torch's take turns)."""
    import torch

    from .costmodel import decode_params
    from .engine import load

    ids = [i % 512 for i in range(1024)]  # the one-layer model's vocabulary
    estimate = {}
    for n in candidates:
        torch.set_num_threads(n)
        gbps = _matvec_gbps(shape, torch.float16, torch.float32, "cpu", lambda: None)
        engine = load(folder, progress=False, device="cpu", threads=n, disk_bytes=0, speculate=False)
        try:
            step = _decode_step_s(engine, ids, steps=8)
        finally:
            engine.close()
        estimate[n] = 2 * decode_params(shape) / (gbps * 1e9) + shape.num_layers * step
    return min(estimate, key=estimate.get)


def measure_hardware(source, *, disk_dir: str | os.PathLike | None = None, device: str = "auto",
                     block_size: int = 32, kv_bits: int = 4, disk_test_bytes: int = 256 << 20,
                     progress: bool = True) -> HardwareFigures:
    """Measure this machine at the shapes of the model `source` (an `edgekv.loader.ModelSource`).

    disk_dir: where the disk tier's file goes (default: the edgekv cache's kv folder); a
    scratch file of `disk_test_bytes` is written there and removed. device: "auto" (CUDA
    when present), "cpu" or "cuda".
    """
    import psutil
    import torch

    from .loader import cache_root, load_config
    from .model import ModelShape
    from .quant import BlockCodec

    shape = ModelShape.from_config(load_config(source))

    started = time.perf_counter()
    on_cuda = device == "cuda" or (device == "auto" and _cuda_available())
    dev = "cuda" if on_cuda else "cpu"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    act = torch.float16 if on_cuda else torch.float32
    cores, logical = psutil.cpu_count(logical=False) or 1, psutil.cpu_count() or 1
    candidates = sorted({1, cores, logical})
    step = StepProgress("measuring", 11 + (1 if on_cuda else 0), stream=None if progress else io.StringIO())
    before = torch.get_num_threads()
    disk_dir = os.fspath(disk_dir or cache_root() / "kv")
    workdir = tempfile.mkdtemp(prefix="edgekv-tune-")
    try:
        folder = _one_layer_model(source, shape, os.path.join(workdir, "one-layer"))
        threads = _best_threads(shape, folder, candidates) if not on_cuda else before
        torch.set_num_threads(threads)
        step(f"threads: {threads} ran fastest (of {', '.join(map(str, candidates))})")
        ram = _ram_read_gbps()
        step("RAM read")
        row_bytes = BlockCodec(bits=kv_bits, block_size=block_size, head_dim=shape.head_dim).row_bytes
        fetch = _tier_ram_fetch_gbps(row_bytes, dev)
        step("tier store: RAM rows")
        free = shutil.disk_usage(_existing_parent(disk_dir)).free
        disk_read, disk_latency, disk_write = _disk_figures(row_bytes, disk_dir, min(disk_test_bytes, free // 8))
        step("tier store: disk file")
        mv32 = _matvec_gbps(shape, torch.float32, torch.float32, dev, sync)
        mv16 = _matvec_gbps(shape, torch.float16, act, dev, sync)
        mv8 = _matvec_gbps(shape, torch.float32, act, dev, sync, bits=8)
        mv4 = _matvec_gbps(shape, torch.float32, act, dev, sync, bits=4)
        step("weights: one-token products (32/16/8/4 bits)")
        mm = _matmul_gflops(shape, act, act, dev, sync)
        widen = _matmul_gflops(shape, torch.float16, act, dev, sync) if not on_cuda else mm
        step("prefill products")
        attn_gflops, dense_per_token = _attention_figures(shape, act, dev, sync)
        step("dense attention")
        kv = _kv_path_figures(folder, shape, dev, block_size, threads, ram, dense_per_token, step)
        cuda = dict(h2d_gbps=0.0, d2h_gbps=0.0, device_mem_gbps=0.0, device_gemm_gflops=0.0)
        if on_cuda:
            cuda = _cuda_figures(sync)
            step("CUDA copies, memory, GEMM")
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(workdir, ignore_errors=True)
    cap = probe_capacity(disk_dir)
    return HardwareFigures(
        source=f"measured on {platform.node() or 'this machine'}, {time.strftime('%Y-%m-%d')}",
        device_type=dev, device_name=torch.cuda.get_device_name() if on_cuda else "cpu",
        cpu_name=_cpu_name(), cpu_cores=cores, cpu_threads=logical, threads=threads,
        ram_total_bytes=cap.ram_total_bytes, ram_available_bytes=cap.ram_available_bytes,
        disk_free_bytes=cap.disk_free_bytes, device_total_bytes=cap.device_total_bytes,
        device_free_bytes=cap.device_free_bytes, ram_read_gbps=ram, tier_ram_fetch_gbps=fetch,
        disk_read_gbps=disk_read, disk_read_latency_s=disk_latency, disk_write_gbps=disk_write,
        matvec_fp32_gbps=mv32, matvec_fp16_gbps=mv16, matvec_int8_gbps=mv8, matvec_int4_gbps=mv4,
        matmul_gflops=mm, matmul_widen_gflops=widen, attention_gflops=attn_gflops,
        dense_attend_s_per_token=dense_per_token, **kv, kernel_block_size=block_size,
        kernel_head_dim=shape.head_dim, **cuda, measure_s=round(time.perf_counter() - started, 1))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- short real runs of the engine, for the fit ------------------------------------------------

def calibration_plan(max_context: int, device_type: str) -> list[tuple[str, dict, list[int]]]:
    """(label, policy, contexts) of the runs `measure_engine_runs` makes: the dense path, 4-bit
    tiers at three budgets with 4-, 8- and 16-bit weights (each width its own kernel and
    fitted scale), fp32 weights (to tell weight bytes from fixed costs), a device cache of
    two layers (RAM fetches) and a RAM budget that spills to disk."""
    top = max(256, min(2048, max_context - 128))
    low = max(128, min(512, top // 4))
    # every weight width runs its own kernel: each appears at both contexts
    plan = [("dense, 16-bit weights", {"offload": False, "weight_bits": 16}, [low, top])]
    plan += [(f"4-bit, {b}, {w}-bit weights", {"kv_bits": 4, "budget": b, "weight_bits": w}, [low, top])
             for b, w in (("all", 4), ("25%", 8), ("10%", 16))]
    plan.append(("4-bit, 10%, 4-bit weights", {"kv_bits": 4, "budget": "10%", "weight_bits": 4}, [low]))
    if device_type == "cpu":
        plan.append(("4-bit fp32 weights", {"kv_bits": 4, "weight_bits": 16, "weight_dtype": "float32"}, [low]))
    plan += [("4-bit small device cache", {"kv_bits": 4, "device_cache_bytes": "two layers"}, [low]),
             ("4-bit disk spill", {"kv_bits": 4, "ram_bytes": "one layer", "disk_bytes": "1GiB"}, [low])]
    return plan


def check_plan(max_context: int) -> list[tuple[str, dict, list[int]]]:
    """(label, policy, contexts) of `edgekv tune --check`: six policies the calibration runs
    did not fit to, at three contexts up to the model's (longer than the fit's), so the
    comparison with the predictions is out of sample."""
    top = min(max_context - 256, 7680)
    contexts = sorted({max(256, top // 8), max(512, top // 2), top})
    return [("dense, 16-bit weights", {"offload": False, "weight_bits": 16}, contexts),
            ("4-bit KV, all, 4-bit weights", {"kv_bits": 4, "weight_bits": 4}, contexts),
            ("4-bit KV, 10%, 4-bit weights", {"kv_bits": 4, "budget": "10%", "weight_bits": 4}, contexts),
            ("4-bit KV, 2048 mass, 8-bit weights", {"kv_bits": 4, "budget": 2048, "scorer": "mass",
                                                     "weight_bits": 8}, contexts),
            ("8-bit KV, all, 16-bit weights", {"kv_bits": 8, "weight_bits": 16}, contexts),
            ("2-bit KV, 25%, 4-bit weights", {"kv_bits": 2, "budget": "25%", "weight_bits": 4}, contexts)]


def measure_engine_runs(model: str | None = None, *, threads: int = 0, decode_tokens: int = 12,
                        disk_dir: str | None = None, progress: bool = True, plan: list | None = None) -> list:
    """Short real runs of the engine (`calibration_plan`) with `threads` (the policy key; 0:
    torch's default), as `costmodel.Measurement`s: per run (a policy at a context, an engine
    of its own), the seconds to prefill the context and per decode step.

    The runs decode in turns, one token each, as `bench speed` does: a shared machine's
    speed drifts by tens of percent within a minute, and in turns the drift lands on every
    run alike (prefills cannot take turns: they are timed one after another). A step's
    figure is the lower quartile of its steps: a step that waited for a descheduled thread
    is the same work plus someone else's. When the engines' weights would not fit in RAM
    together, the runs go one at a time."""
    import psutil

    from .bench_speed import prompt_ids
    from .config import Policy
    from .costmodel import layer_rows_bytes
    from .engine import load
    from .loader import load_config, load_tokenizer, resolve_model
    from .model import ModelShape

    source = resolve_model(model, progress=progress)
    shape, tokenizer = ModelShape.from_config(load_config(source)), load_tokenizer(source)
    runs = []
    plan = plan or calibration_plan(shape.max_context, "cuda" if _cuda_available() else "cpu")
    for label, policy, contexts in plan:
        policy = dict(policy, threads=threads)
        base = Policy.from_kwargs(**{k: v for k, v in policy.items() if k not in ("device_cache_bytes", "ram_bytes")})
        if policy.get("device_cache_bytes") == "two layers":
            policy["device_cache_bytes"] = 2 * layer_rows_bytes(shape, base)
        if policy.get("ram_bytes") == "one layer":
            policy.update(ram_bytes=layer_rows_bytes(shape, base), disk_dir=disk_dir)
        runs += [(label, policy, context) for context in contexts]
    weights = sum(f.stat().st_size for f in source.folder.glob("*.safetensors"))
    together = len(runs) * weights < psutil.virtual_memory().available // 2
    groups = [runs] if together else [[run] for run in runs]
    step = StepProgress("engine runs", len(runs) + len(groups), stream=None if progress else io.StringIO())
    out = []
    for group in groups:
        engines = []
        try:
            for label, policy, context in group:
                engines.append(load(model, progress=False, **policy))
            out += _runs_in_turns(engines, [(label, prompt_ids(tokenizer, context)) for label, _, context in group],
                                  decode_tokens, step)
        finally:
            for engine in engines:
                engine.close()
    return out


def _runs_in_turns(engines: list, prompts: list[tuple[str, list[int]]], decode_tokens: int, step) -> list:
    """Prefill each engine's prompt (label, ids), then decode them in turns; Measurements."""
    from .costmodel import Measurement

    streams, prefill, times = [], [], []
    for engine, (label, ids) in zip(engines, prompts):
        engine.reset()
        streams.append(engine.stream(ids, max_new_tokens=decode_tokens + 1, ignore_eos=True))
        t0 = time.perf_counter()
        next(streams[-1])  # the prefill (and the first token)
        prefill.append(time.perf_counter() - t0)
        times.append([])
        step(f"prefill: {label} at {len(ids)} tokens")
    for _ in range(decode_tokens):
        for stream, spent in zip(streams, times):
            t0 = time.perf_counter()
            next(stream)
            spent.append(time.perf_counter() - t0)
    for stream in streams:
        stream.close()
    step(f"{len(engines)} runs decoded in turns")
    # the policy with weight_bits as the engine resolved it ("auto": the model file's own bits)
    return [Measurement(engine.policy.replace(weight_bits=engine.weight_bits), len(ids), sorted(spent)[decode_tokens // 4],
                        seconds, label)
            for engine, (label, ids), spent, seconds in zip(engines, prompts, times, prefill)]
