"""`edgekv bench gpu`: the prepared GPU check, one command for the first GPU that appears.

Run on a CUDA machine (from a checkout: ``pip install --no-deps --no-build-isolation -e .``
then ``edgekv bench gpu --report gpu-report.md``); it writes one Markdown report and
keeps each part inside its time budget (about 8 minutes in all):

1. the device, torch and Triton versions;
2. the CUDA tests: kernels against their twins at large shapes, the CUDA decode backend
   against the reference (``pytest -m "not real_model"`` on the GPU-relevant files);
3. `edgekv bench kernels --device cuda --shapes llama8b` (each kernel vs its twin, GB/s);
4. end-to-end decode at Llama-3.1-8B shape (random weights) at 32K and 128K context:
   all KV on the GPU (dense) vs the offloaded 4-bit tiers with a 2048-token budget and
   every block, decode tok/s, peak device memory, and the host synchronizations a decode
   step makes (torch's sync debug mode counts them: the design target is 0).

Without CUDA it refuses in one line. ``--dry-run`` runs parts 1 and 4 on the CPU at a tiny
shape, so the script itself is tested where no GPU is (tests/test_gpu_path.py).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from .errors import EdgekvError

GPU_TESTS = ("tests/test_kernels.py", "tests/test_gpu_path.py", "tests/test_engine_kernels.py",
             "tests/test_tiers.py")


def check_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EdgekvError("no CUDA GPU here: `edgekv bench gpu` checks the GPU path on one "
                          "(or pass --dry-run to run its end-to-end part on the CPU at a tiny shape)")
    return torch.device("cuda")


def environment(device: torch.device) -> list[str]:
    lines = [f"- python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        lines.append("- triton: not installed")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"- device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
    else:
        lines.append(f"- device: CPU ({torch.get_num_threads()} threads): a dry run")
    return lines


def run_tests(budget_s: float) -> list[str]:
    """The GPU-relevant test files, stopped at the time budget."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not real_model", "-p", "no:cacheprovider",
           *[t for t in GPU_TESTS if Path(t).exists()]]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")).splitlines()[-15:]
        status = f"stopped at its {budget_s:.0f} s budget"
    return [f"`{' '.join(cmd[2:])}`: {status} in {time.perf_counter() - started:.0f} s", "", "```", *tail, "```"]


def run_kernel_bench() -> list[str]:
    from .bench_kernels import run_kernel_bench as bench

    started = time.perf_counter()
    rows = bench(device="cuda", shapes="llama8b", context=None, repeats=20, print_table=False)
    lines = [f"`edgekv bench kernels --device cuda --shapes llama8b` ({time.perf_counter() - started:.0f} s):", "",
             "| kernel | twin ms | Triton ms | speedup | Triton GB/s | vs dense SDPA |", "|---|---|---|---|---|---|"]

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for r in rows:
        lines.append(f"| {r['kernel']} | {num(r['torch_ms'], '.3f')} | {num(r['triton_ms'], '.3f')} | "
                     f"{num(r['speedup'], '.1f')} | {num(r['triton_gbps'], '.0f')} | {num(r['vs_dense'], '.1f')} |")
    return lines


def count_host_syncs(fn) -> tuple[object, int]:
    """Run fn; on CUDA, count the synchronizing operations torch reports (its sync debug
    mode warns once per such call)."""
    if not torch.cuda.is_available():
        return fn(), -1
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return result, sum("synchroniz" in str(w.message) for w in caught)


def decode_case(shape: str, context: int, policy: dict, decode_tokens: int, device: torch.device) -> dict:
    """Prefill `context` random tokens, decode `decode_tokens`; tok/s, memory, host syncs per layer."""
    from .shapes import random_engine

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = random_engine(shape, device=device.type, **policy)
    try:
        ids = torch.randint(3, engine.shape.vocab_size - 1, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        started = time.perf_counter()
        steps = engine.stream(ids, max_new_tokens=decode_tokens, ignore_eos=True)
        next(steps)  # prefill and the first token
        prefill_s = time.perf_counter() - started

        def decode_rest():
            try:
                while True:
                    next(steps)
            except StopIteration as done:
                return done.value

        result, syncs = count_host_syncs(decode_rest)
        steps_run = max(len(result.token_ids) - 1, 1)
        out = {"shape": shape, "context": context, "policy": policy, "prefill_s": round(prefill_s, 2),
               "decode_tok_s": result.stats["decode_tok_s"],
               "syncs_per_layer": round(syncs / (steps_run * engine.shape.num_layers), 3) if syncs >= 0 else None,
               "kv_bytes": result.stats["kv_bytes"],
               "decode_ms_per_token": result.stats.get("decode_ms_per_token"),
               "device_hit_rate": result.stats.get("device_hit_rate")}
        if device.type == "cuda":
            out["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        return out
    finally:
        engine.close()


E2E_POLICIES = {
    "dense (all KV on the GPU)": {"offload": False, "prefill_chunk": 4096},
    "4-bit tiers, budget 2048": {"kv_bits": 4, "budget": 2048, "prefill_chunk": 4096},
    "4-bit tiers, every block": {"kv_bits": 4, "budget": "all", "prefill_chunk": 4096},
}


def run_end_to_end(device: torch.device, dry_run: bool, budget_s: float) -> tuple[list[str], list[dict]]:
    shape, contexts, tokens = ("tiny", (256, 1024), 4) if dry_run else ("llama-3.1-8b", (32768, 131072), 32)
    lines = [f"End-to-end decode, {shape} shape (random weights), {tokens} tokens per case:", "",
             "| context | policy | prefill s | decode tok/s | peak device GiB | host syncs / layer | KV bytes |",
             "|---|---|---|---|---|---|---|"]
    rows, started = [], time.perf_counter()
    for context in contexts:
        for label, policy in E2E_POLICIES.items():
            if time.perf_counter() - started > budget_s:
                lines.append(f"| {context} | {label} | skipped: the {budget_s:.0f} s budget is spent | | | | |")
                continue
            try:
                row = decode_case(shape, context, policy, tokens, device)
            except (torch.cuda.OutOfMemoryError, EdgekvError) as exc:
                lines.append(f"| {context} | {label} | failed: {str(exc).splitlines()[0][:120]} | | | | |")
                continue
            rows.append({"label": label, **row})
            lines.append(f"| {context} | {label} | {row['prefill_s']} | {row['decode_tok_s']} | "
                         f"{row.get('peak_device_gib', '—')} | {row['syncs_per_layer']} | {row['kv_bytes']} |")
    return lines, rows


def run_gpu_check(report: Path, *, dry_run: bool = False, tests: bool = True,
                  decode_budget_s: float | None = None) -> list[dict]:
    """Run the check (see the module doc) and write the report; returns the decode rows.
    decode_budget_s: seconds the end-to-end part may take (default: 240, a dry run 120)."""
    device = check_device(dry_run)
    sections = [f"# edgekv GPU check ({time.strftime('%Y-%m-%d %H:%M')})", "", *environment(device), ""]
    print("gpu check: environment", file=sys.stderr)
    if not dry_run:
        if tests:
            print("gpu check: tests (budget 180 s)", file=sys.stderr)
            sections += ["## Tests", "", *run_tests(180.0), ""]
        print("gpu check: kernel bench", file=sys.stderr)
        sections += ["## Kernels", "", *run_kernel_bench(), ""]
    print("gpu check: end-to-end decode", file=sys.stderr)
    lines, rows = run_end_to_end(device, dry_run, decode_budget_s or (120.0 if dry_run else 240.0))
    sections += ["## End-to-end decode", "", *lines, ""]
    report.write_text("\n".join(sections) + "\n")
    print(f"gpu check: report written to {report}", file=sys.stderr)
    return rows
