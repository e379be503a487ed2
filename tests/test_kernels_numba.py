"""The compiled CPU kernels (numba) against their torch twins, on the twins' awkward shapes.

Tolerances (max abs difference vs the twin; same data as `test_kernels`): block scores
5e-4 (fp32 summation order); attention outputs 2e-5 with rotated keys, 2e-4 with keys
before RoPE: the kernel builds each token's rotation from its block start and offset
(angle-sum formulas) where the twin rounds ``position * inv_freq`` to fp32 first; at
positions up to 8K that rounding is at most ~2.5e-4 rad.
"""

from __future__ import annotations

import pytest
import torch

from edgekv.errors import EdgekvError
from edgekv.kernels import _backend
from edgekv.kernels.block_score import key_copy, score_blocks
from edgekv.kernels.sparse_attention import sparse_decode_attention
from edgekv.quant import BlockCodec

from test_kernels import ATTN_CASES, ROPE_CASES, SCORE_CASES, case_id, make_block_ids, make_kv, make_q, make_rows

pytestmark = pytest.mark.skipif(not _backend.numba_available(), reason="the numba package is not installed")

SCORE_ATOL = 5e-4
ATTN_ATOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}
ROPE_ATOL = {torch.float32: 2e-4, torch.float16: 6e-3, torch.bfloat16: 5e-2}


def cpu(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.cpu() for t in tensors)


def twin_and_numba(fn, *args, **kwargs):
    return fn(*args, backend="torch", **kwargs), fn(*args, backend="numba", **kwargs)


def test_auto_picks_numba_on_the_cpu_and_numba_refuses_cuda_tensors():
    assert _backend.resolve_backend("auto", torch.zeros(1)) == "numba"
    assert _backend.resolve_backend("numba", torch.zeros(1)) == "numba"
    if torch.cuda.is_available():
        with pytest.raises(EdgekvError, match="CPU tensors"):
            _backend.resolve_backend("numba", torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("nb,d,group,bits,block_size,dtype", SCORE_CASES, ids=case_id)
def test_score_blocks_numba_matches_twin(nb, d, group, bits, block_size, dtype):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = cpu(*make_rows(codec, hkv, nb, nb + d))
    q = make_q(hkv * group, d, dtype, group).cpu()
    for combine in ("max", "sum"):
        want, got = twin_and_numba(score_blocks, q, rows, codec, combine=combine)
        assert got.shape == (hkv, nb) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= SCORE_ATOL * max(1.0, want.abs().max().item() / 100), combine
    copy = key_copy(rows, codec)  # key copies (the form selection keeps) score the same as whole rows
    torch.testing.assert_close(score_blocks(q, copy, codec, backend="numba"),
                               score_blocks(q, rows, codec, backend="numba"), rtol=0, atol=0)


@pytest.mark.parametrize("ksel,tail,d,group,bits,block_size,dtype,split", ATTN_CASES, ids=case_id)
def test_sparse_attention_numba_matches_twin(ksel, tail, d, group, bits, block_size, dtype, split):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, ksel * 7 + tail))
    tk, tv = (x.to(dtype) for x in make_kv(hkv, tail, d, tail + 1))
    q = make_q(hkv * group, d, dtype, d + group).cpu()
    want, got = twin_and_numba(sparse_decode_attention, q, rows, codec, tk, tv, split_blocks=split)
    assert got.shape == (hkv * group, d) and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= ATTN_ATOL[dtype]


@pytest.mark.parametrize("ksel,tail,d,group,bits,block_size,dtype,split,top",
                         [c for c in ROPE_CASES if c[-1] * c[5] <= 8192], ids=case_id)
def test_sparse_attention_numba_rotates_keys_like_the_twin(ksel, tail, d, group, bits, block_size, dtype, split, top):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, ksel * 5 + tail))
    tk, tv = (x.to(dtype) for x in make_kv(hkv, tail, d, tail + 2))
    q = make_q(hkv * group, d, dtype, d + group + 1).cpu()
    ids = make_block_ids(hkv, ksel, ksel + d, top, torch.int32 if ksel % 2 else torch.int64).cpu()
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    want, got = twin_and_numba(sparse_decode_attention, q, rows, codec, tk, tv, block_ids=ids, rope_inv_freq=inv)
    assert got.shape == (hkv * group, d) and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= ROPE_ATOL[dtype]


@pytest.mark.parametrize("num_valid", [0, 5, "per_head"])
def test_sparse_attention_numba_skips_blocks_past_num_valid(num_valid):
    codec = BlockCodec(4, 16, 64)
    hkv, ksel, group = 3, 7, 2
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, 20))
    tk, tv = make_kv(hkv, 5, 64, 21)
    if num_valid == "per_head":
        num_valid = torch.tensor([7, 0, 2], dtype=torch.int32)
    q = make_q(hkv * group, 64, torch.float32, 22).cpu()
    want, got = twin_and_numba(sparse_decode_attention, q, rows, codec, tk, tv, num_valid=num_valid)
    assert (got - want).abs().max().item() <= ATTN_ATOL[torch.float32]
    empty = torch.empty(hkv, 0, 64)
    nothing = sparse_decode_attention(q, rows, codec, empty, empty, num_valid=0, backend="numba")
    assert torch.equal(nothing, torch.zeros_like(nothing))  # no tokens at all: zeros, as the twin


def test_widen_halves_widens_every_finite_fp16_bit_pattern_exactly():
    import numpy as np
    from numba import njit

    from edgekv.kernels.numba_support import widen_halves

    @njit
    def widen_all(words):
        out = np.empty(words.shape[0], np.float32)
        widen_halves(words, out)
        return out

    patterns = torch.arange(65536, dtype=torch.int32)
    want = patterns.to(torch.int16).view(torch.float16).float()
    finite = want.isfinite()
    assert int(finite.sum()) == 65536 - 2 * 1024  # every pattern but the infinities and NaNs
    got = torch.from_numpy(widen_all(patterns.numpy().astype(np.uint16)))
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # subnormals and -0.0 too


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_split_work_over_torchs_thread_count_with_the_same_results(threads, torch_threads):
    from edgekv.kernels.numba_support import kernel_threads

    torch_threads(threads)
    assert kernel_threads() == min(threads, __import__("numba").config.NUMBA_NUM_THREADS)
    codec = BlockCodec(4, 16, 64)
    hkv, ksel, group = 3, 5, 3
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, 30))
    q = make_q(hkv * group, 64, torch.float32, 31).cpu()
    want, got = twin_and_numba(score_blocks, q, rows, codec)
    assert (got - want).abs().max().item() <= SCORE_ATOL * max(1.0, want.abs().max().item() / 100)
    tk, tv = make_kv(hkv, 9, 64, 32)
    num_valid = torch.tensor([5, 1, 0])  # fewer blocks than parallel runs on some heads
    want, got = twin_and_numba(sparse_decode_attention, q, rows, codec, tk, tv, num_valid=num_valid)
    assert (got - want).abs().max().item() <= ATTN_ATOL[torch.float32]


# ---- the compiled decode step a CPU backend builds once ----------------------------------------


@pytest.mark.parametrize("num_blocks,group,k,sink_blocks", [(13, 3, 4, 1), (40, 1, 9, 2), (77, 4, 76, 1)])
def test_compiled_selection_picks_the_blocks_of_top_blocks_over_score_blocks(num_blocks, group, k, sink_blocks):
    from edgekv.kernels import top_blocks
    from edgekv.kernels.block_score_numba import NumbaBlockSelector

    codec = BlockCodec(4, 16, 64)
    hkv = 3
    rows, _, _ = cpu(*make_rows(codec, hkv, num_blocks + 5, 40 + k))
    summaries = key_copy(rows, codec)  # [Hkv, capacity, W]: only the first num_blocks are live
    q = make_q(hkv * group, 64, torch.float32, 41 + k).cpu()
    got = NumbaBlockSelector(codec)(q, summaries, num_blocks, k, sink_blocks)
    want = top_blocks(score_blocks(q, summaries[:, :num_blocks], codec, backend="numba"), k, sink_blocks,
                      backend="numba")
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert (got[:, :sink_blocks] == torch.arange(sink_blocks)).all()  # sinks first, the rest ascending
    assert (got.diff(dim=1) > 0).all()


@pytest.mark.parametrize("num_blocks,group,tail", [(13, 3, 37), (40, 1, 0), (77, 4, 96)])
def test_block_mass_numba_matches_the_twin(num_blocks, group, tail):
    from edgekv.kernels import block_mass

    codec = BlockCodec(4, 16, 64)
    rows, _, _ = cpu(*make_rows(codec, 3, num_blocks, 50 + tail))
    q = make_q(3 * group, 64, torch.float32, 51).cpu() * 4
    tail_k = torch.randn(3, tail, 64)
    for copy in (rows, key_copy(rows, codec)):
        want, got = twin_and_numba(block_mass, q, copy, codec, tail_k)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


def test_the_vectorized_exp_is_exp_to_a_ten_thousandth():
    import numpy as np

    from edgekv.kernels.block_score_numba import exp_nonpositive

    x = np.concatenate((-np.logspace(-6, np.log10(80.0), 20000), [0.0, -1e-30])).astype(np.float32)
    out, bits = np.empty_like(x), np.empty(x.shape, np.int32)
    exp_nonpositive(x, out, bits, bits.view(np.float32))
    assert np.max(np.abs(out / np.exp(x.astype(np.float64)) - 1)) < 1e-4
    assert out[-2] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("heads,blocks,k,sinks", [(3, 40, 9, 1), (1, 13, 4, 2), (4, 77, 1, 1), (2, 9, 8, 1)])
def test_adaptive_budgets_numba_picks_what_the_twin_picks(heads, blocks, k, sinks):
    from edgekv.kernels import adaptive_top_blocks

    weights = torch.rand(heads, blocks, generator=torch.Generator().manual_seed(blocks))  # distinct: no ties
    want, got = twin_and_numba(adaptive_top_blocks, weights, k, sinks)
    assert torch.equal(got, want)
    tied = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0.1]])
    assert adaptive_top_blocks(tied, 2, 1, backend="numba").tolist() == [[0, 1, 2], [0, -1, -1]]  # first tied win


@pytest.mark.parametrize("adaptive", [False, True])
def test_compiled_mass_selection_picks_what_the_per_call_functions_pick(adaptive):
    from edgekv.kernels import adaptive_top_blocks, block_mass, top_blocks
    from edgekv.kernels.block_score_numba import NumbaMassSelector

    codec = BlockCodec(4, 16, 64)
    rows, _, _ = cpu(*make_rows(codec, 3, 45, 60))
    summaries = key_copy(rows, codec)  # [Hkv, capacity, W]: the first 40 are live
    q = make_q(9, 64, torch.float32, 61).cpu() * 4
    tail = torch.randn(3, 50, 64)  # a buffer: tokens 5 .. 41 are the tail (a sink lies before it)
    got = NumbaMassSelector(codec)(q, summaries, 40, 7, 1, tail, 37, adaptive, tail_start=5)
    mass = block_mass(q, summaries[:, :40], codec, tail[:, 5:42], backend="numba")
    want = (adaptive_top_blocks if adaptive else top_blocks)(mass, 7, 1, backend="numba")
    assert torch.equal(got, want)


@pytest.mark.parametrize("ksel,sink,tail,group,dtype", [(7, 16, 37, 3, torch.float32), (1, 0, 5, 1, torch.float32),
                                                        (5, 16, 0, 4, torch.bfloat16)], ids=case_id)
def test_compiled_attention_equals_the_twin_over_sink_and_tail_together(ksel, sink, tail, group, dtype):
    from edgekv.kernels.sparse_attention_numba import NumbaSparseAttention

    codec = BlockCodec(4, 16, 64)
    hkv, d = 3, 64
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, 50 + ksel))
    sink_k, sink_v = (x.to(dtype) for x in make_kv(hkv, sink, d, 51))
    tail_k, tail_v = (x.to(dtype) for x in make_kv(hkv, tail, d, 52))
    q = make_q(hkv * group, d, dtype, 53).cpu()
    ids = make_block_ids(hkv, ksel + 1, 54, top=200).cpu()[:, 1:]  # a strided view, as the cache passes it
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    attend = NumbaSparseAttention(codec, inv, 256)
    pool = torch.randint(0, 256, (hkv * ksel + 9, codec.row_bytes), dtype=torch.uint8)  # a row pool, as a device cache
    slots = torch.randperm(pool.shape[0])[:hkv * ksel].view(hkv, ksel)  # where each selected block lies in it
    pool[slots.reshape(-1)] = rows.reshape(-1, codec.row_bytes)
    got = attend(q, pool, slots, ids, sink_k, sink_v, tail_k, tail_v)
    want = sparse_decode_attention(q, rows, codec, torch.cat((sink_k, tail_k), 1), torch.cat((sink_v, tail_v), 1),
                                   block_ids=ids, rope_inv_freq=inv, backend="torch")
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= ROPE_ATOL[dtype]


def test_compiled_attention_with_a_value_basis_returns_outputs_in_the_model_basis():
    from edgekv.kernels.sparse_attention_numba import NumbaSparseAttention
    from edgekv.rotation import rotate, value_rotation

    codec, hkv, ksel, d = BlockCodec(4, 16, 64), 3, 4, 64
    rows, _, _ = cpu(*make_rows(codec, hkv, ksel, 60))
    sink_k, sink_v = make_kv(hkv, 16, d, 61)
    tail_k, tail_v = make_kv(hkv, 5, d, 62)
    q = make_q(hkv * 3, d, torch.float32, 63).cpu()
    ids = make_block_ids(hkv, ksel, 64, top=100).cpu()
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    basis = value_rotation(d, 4, torch.device("cpu"))
    plain = NumbaSparseAttention(codec, inv, 256)
    turned = NumbaSparseAttention(codec, inv, 256, basis)
    slots = torch.arange(hkv * ksel).view(hkv, ksel)
    pool = rows.reshape(-1, codec.row_bytes)
    stored_basis = plain(q, pool, slots, ids, sink_k, sink_v, tail_k, tail_v)
    got = turned(q, pool, slots, ids, sink_k, sink_v, tail_k, tail_v)
    assert not torch.allclose(got, stored_basis, atol=1e-3)
    assert torch.allclose(got, rotate(stored_basis, basis, inverse=True), atol=1e-5)


@pytest.mark.parametrize("bits,scorer,compiled_select,compiled_attend", [
    (4, "keys4", True, True), (4, "mass", True, True), (4, "minmax", False, True), (16, "keys4", True, False)])
def test_the_cpu_backend_compiles_what_numba_runs_and_leaves_the_rest_to_the_reference(
        tmp_path, bits, scorer, compiled_select, compiled_attend):
    from edgekv.tiered_cache import TieredKVCache

    cache = TieredKVCache(num_layers=1, num_kv_heads=2, head_dim=64, max_context=256, block_size=16, kv_bits=bits,
                          recent_window=16, device_cache_bytes=1 << 20, ram_bytes=1 << 20, disk_dir=None,
                          disk_bytes=0, dtype=torch.float32, device=torch.device("cpu"),
                          rope_inv_freq=torch.ones(32), scorer=scorer, backend="numba")
    assert cache.backend.name == "numba"
    assert (cache.backend.selector is not None) == compiled_select  # minmax summaries are not key copies
    assert (cache.backend.attention is not None) == compiled_attend  # fp16 rows: the twin
