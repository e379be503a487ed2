"""Every Triton kernel edgekv launches, compiled for sm_80 / sm_89 / sm_90 without a GPU.

`edgekv.kernels.aot` calls the real launch wrappers on CPU stand-in tensors, records each
``kernel[grid](...)`` instead of running it, turns the recorded arguments into a
signature with Triton's own launch binder and compiles every distinct launch for real
NVIDIA targets (PTX, then cubin through ptxas), in a child Python without
``TRITON_INTERPRET`` (this suite sets it in-process). These tests fail on a compile
error, on spills or registers above the bounds below, on a block that cannot fit an SM,
on a ``@triton.jit`` function or launch wrapper that no compile covers, and on launch
arguments a real launch would reject.

Matrix. The full one (2 shapes x 3 targets x fp16/bf16 x 2/4/8/16 bits: 270 compiles)
took 13 min 46 s with a cold Triton cache on this 2-core machine (shared, load ~7) and
2 min warm: too long for the default suite, which runs a representative subset --
Llama-3.1-8B shapes (the largest register use), all three targets (so both ptxas builds
Triton ships: 12.9 for sm_80/89, 13.4 for sm_90), bf16, 4-bit KV (the default): every
kernel, wrapper and variant, 24 compiles, 70 s cold and 19 s warm (this file: ~1 min).
``EDGEKV_AOT_FULL=1`` runs the full matrix.

Bounds, from the full matrix (Triton 3.9.0; worst case of each kernel over targets,
shapes, dtypes, bits and variants):

  spills, store + load bytes per thread: none on sm_80/89 (ptxas 12.9). On sm_90 (ptxas
  13.4, which Triton runs with ``--regAllocOptLevel=2``): _score_kernel 12/36 (small, 4-bit,
  at 48 registers); _partial_kernel 16/20 (llama8b bf16 16-bit, "pooled" and "rope", 168
  registers), 12/16 (small fp16 16-bit "pooled", 96), 8/8 (small 2-bit "pooled", 96),
  4/4 (small fp16 16-bit "rope", 80). The same PTX through ptxas 13.4 without that flag
  spills nothing at the same register counts. Bound: 64 bytes for those two kernels on
  sm_90, 0 everywhere else: hundreds of bytes would mean real register pressure.
  registers per thread (max measured -> bound): _partial_kernel 229 (sm_80, llama8b 8-bit
  "rope"; 218 on sm_90) -> 240; _compress_kernel 128 -> 144; _bound_kernel 96 -> 112;
  _score_kernel 78 -> 96; _merge_kernel 64 -> 80; _gather_kernel 18 -> 32.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgekv.errors import EdgekvError
from edgekv.kernels import aot

pytest.importorskip("triton")

FULL = os.environ.get("EDGEKV_AOT_FULL", "") not in ("", "0")
MATRIX = (dict(shapes=tuple(aot.SHAPES), targets=tuple(aot.TARGETS), dtypes=tuple(aot.DTYPES), bits=aot.BITS)
          if FULL else dict(shapes=("llama8b",), targets=(80, 89, 90), dtypes=("bf16",), bits=(4,)))

SPILL_BOUND = {("_score_kernel", 90): 64, ("_partial_kernel", 90): 64}  # bytes; every other (kernel, sm): 0
REG_BOUND = {"_partial_kernel": 240, "_compress_kernel": 144, "_bound_kernel": 112, "_score_kernel": 96,
             "_merge_kernel": 80, "_gather_kernel": 32,
             "_qmatmul_kernel": 80, "_dequant_kernel": 64}
KERNELS_DIR = Path(aot.__file__).parent


@pytest.fixture(scope="module")
def result() -> aot.AotResult:
    return aot.run_aot(**MATRIX)


def where(row: dict) -> str:
    return (f"{row['kernel']} {row['variant'] or ''} sm_{row['target']} {row['shape']} {row['dtype'] or ''} "
            f"{row['bits'] or ''}-bit")


def triton_jit_defs() -> dict[str, ast.FunctionDef]:
    """``edgekv.kernels.<module>.<name>`` -> definition, for every function decorated with
    ``@triton.jit`` (or ``@triton.jit(...)``) in kernels/*.py, found by parsing the source."""
    out = {}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in node.decorator_list):
                out[f"edgekv.kernels.{path.stem}.{node.name}"] = node
    return out


# ---- the compiles -----------------------------------------------------------------------------


def test_every_launch_compiles(result):
    assert result.rows, "no launch was recorded"
    failed = [f"{where(r)}: {r['error']}" for r in result.rows if r["error"]]
    assert not failed, "\n".join(failed)
    assert {r["target"] for r in result.rows} == set(MATRIX["targets"])
    assert result.meta["fp_fusion_env"] == "1" and all(r["fp_fusion"] for r in result.rows)


def test_spills_within_bounds(result):
    over = [f"{where(r)}: {r['spill_stores']}/{r['spill_loads']} B spilled at {r['regs']} registers "
            f"(bound {SPILL_BOUND.get((r['kernel'], r['target']), 0)})"
            for r in result.rows if not r["error"]
            and r["spill_stores"] + r["spill_loads"] > SPILL_BOUND.get((r["kernel"], r["target"]), 0)]
    assert not over, "\n".join(over)


def test_registers_within_bounds(result):
    unbounded = sorted({r["kernel"] for r in result.rows} - set(REG_BOUND))
    assert not unbounded, f"state a register bound for {unbounded} in REG_BOUND (measure it first)"
    over = [f"{where(r)}: {r['regs']} registers (bound {REG_BOUND[r['kernel']]})"
            for r in result.rows if not r["error"] and r["regs"] > REG_BOUND[r["kernel"]]]
    assert not over, "\n".join(over)


def test_every_block_fits_on_an_sm(result):
    """Registers and shared memory leave room for at least one block per SM (else the
    launch fails on that GPU)."""
    too_big = [f"{where(r)}: {r['shared']} B shared, {r['regs']} registers" for r in result.rows
               if not r["error"] and r["blocks_per_sm"] < 1]
    assert not too_big, "\n".join(too_big)


# ---- coverage and launch arguments ------------------------------------------------------------


def test_every_triton_jit_function_is_compiled(result):
    """Each @triton.jit function in kernels/ (found by parsing the source, independently of
    aot's own scan) is launched by some wrapper call of `aot.launch_plans` or called from a
    launched kernel; a new kernel without a plan fails here."""
    defs = set(triton_jit_defs())
    assert defs, "no @triton.jit function found in kernels/"
    assert set(result.coverage["defined"]) == defs
    missing = sorted(defs - set(result.coverage["reached"]))
    assert not missing, f"never compiled (add a launch of their wrapper to aot.launch_plans): {missing}"


def test_every_launch_wrapper_is_called(result):
    wrappers = result.coverage["wrappers"]
    assert {"score_blocks_triton", "sparse_decode_attention_triton", "compress_blocks_triton"} <= set(wrappers)
    missing = sorted(set(wrappers) - set(result.coverage["called"]))
    assert not missing, f"launch wrappers without a plan in aot.launch_plans: {missing}"


def test_launch_arguments_are_what_a_real_launch_binds(result):
    """Triton's launch binder took every recorded launch (a missing or extra argument, or an
    unknown option, would be a problem here); the signature of each compile has one entry
    per parameter of the kernel's source definition; the interception left nothing patched."""
    assert not result.launch_problems, "\n".join(result.launch_problems)
    assert result.restored
    params = {name.rsplit(".", 1)[1]: len(node.args.args) for name, node in triton_jit_defs().items()}
    wrong = [f"{where(r)}: {len(r['signature'].split(', '))} signature entries, {params[r['kernel']]} parameters"
             for r in result.rows if len(r["signature"].split(", ")) != params[r["kernel"]]]
    assert not wrong, "\n".join(wrong)


def fake_kernel(*params: tuple[str, bool]) -> SimpleNamespace:
    return SimpleNamespace(params=[SimpleNamespace(name=n, is_constexpr=c) for n, c in params])


def test_check_launch_finds_what_a_real_launch_rejects():
    kernel = fake_kernel(("x_ptr", False), ("n", False), ("BLOCK", True))
    spec = SimpleNamespace(signature={"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                           options=SimpleNamespace(num_warps=4, num_stages=3))
    x = torch.zeros(4, dtype=torch.float16)
    assert aot.check_launch(aot.Launch(kernel, (x, 4), {"BLOCK": 16, "num_warps": 4}, (1,)), spec) == []
    problems = aot.check_launch(aot.Launch(kernel, (x,), {"BLOCK": 16}, (1,)), spec)
    assert any("1 positional + 1 keyword arguments for 3 parameters" in p for p in problems)
    assert aot.check_launch(aot.Launch(kernel, (x, 4), {"BLOCK": 16, "num_wraps": 4}, (1,)), spec) == [
        "unknown keywords ['num_wraps']"]
    problems = aot.check_launch(aot.Launch(kernel, (4, x), {"BLOCK": x}, (1,)), spec)
    assert "constexpr BLOCK got a tensor" in problems
    assert "x_ptr: int as *fp16" in problems and "n: Tensor as i32" in problems


# ---- arithmetic and formatting (no compiles) --------------------------------------------------


def test_occupancy():
    h100, l4 = aot.TARGETS[90], aot.TARGETS[89]
    # 194 registers: 6,400 per warp, 2 warps per 16K sub-partition -> 8 warps = 2 blocks of 4
    assert aot.occupancy(194, 37888, 4, h100) == dict(blocks_per_sm=2, warps_per_sm=8, occupancy=0.125,
                                                      limiter="regs")
    assert aot.occupancy(32, 0, 4, h100) == dict(blocks_per_sm=16, warps_per_sm=64, occupancy=1.0, limiter="warps")
    assert aot.occupancy(32, 0, 4, l4)["warps_per_sm"] == 48
    # 68 KB + 1 KB reserved: one block in sm_89's 100 KB, three in sm_90's 228 KB
    assert aot.occupancy(64, 69632, 4, l4)["blocks_per_sm"] == 1
    assert aot.occupancy(64, 69632, 4, l4)["limiter"] == "smem"
    assert aot.occupancy(64, 69632, 4, h100)["blocks_per_sm"] == 3
    assert aot.occupancy(16, 0, 1, h100) == dict(blocks_per_sm=32, warps_per_sm=32, occupancy=0.5, limiter="blocks")
    assert aot.occupancy(64, 100 * 1024, 4, l4)["blocks_per_sm"] == 0  # above sm_89's 99 KB per block
    assert aot.occupancy(255, 0, 8, h100)["blocks_per_sm"] == 1  # 8,192 registers per warp: 8 warps


def test_collapse_drops_only_axes_the_compile_ignores():
    cell = {(v, d, b): f"{v}-{b}" for v in ("a", "b") for d in ("fp16", "bf16") for b in (4, 8)}
    assert aot._collapse(cell) == {(v, None, b): f"{v}-{b}" for v in ("a", "b") for b in (4, 8)}
    same = {(v, d, b): "k" for v in ("a", "b") for d in ("fp16", "bf16") for b in (4, 8)}
    assert aot._collapse(same) == {(None, None, None): "k"}
    one = {("a", "fp16", 4): "k"}
    assert aot._collapse(one) == one  # a single value says nothing about dependence


def test_aot_table():
    ok = dict(kernel="_merge_kernel", wrapper="w", variant=None, target=90, shape="small", dtype="fp16", bits=None,
              error=None, num_warps=4, regs=32, spill_stores=0, spill_loads=0, stack=0, shared=1024,
              blocks_per_sm=16, warps_per_sm=64, occupancy=1.0, limiter="warps")
    bad = dict(ok, kernel="_score_kernel", variant="key copy", bits=4, error="PTXASError: ptxas failed\nlog")
    lines = aot.aot_table([ok, bad]).splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["kernel", "variant", "sm"]
    assert lines[2].startswith("_score_kernel") and lines[2].endswith("FAILED: PTXASError: ptxas failed")
    assert lines[3].split() == ["_merge_kernel", "-", "90", "small", "fp16", "-", "4", "32", "0/0", "0", "1.0",
                                "16", "64", "100%", "warps"]


def test_unknown_matrix_values_fail_before_any_compile():
    with pytest.raises(EdgekvError, match="unknown shape"):
        aot.run_aot_report(shapes=("tiny",))
    with pytest.raises(EdgekvError, match="unknown target"):
        aot.run_aot_report(targets=(75,))
