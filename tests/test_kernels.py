"""Every kernel of `edgekv.kernels` against its torch twin, plus anchors for the twins.

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors
(this module sets ``TRITON_INTERPRET=1`` before any Triton kernel module is imported),
on small, awkward shapes. With CUDA the same tests run compiled on the GPU, plus the
large shapes of the ``*_large`` tests.

Tolerances (max abs difference, Triton vs twin; data ~N(0,1) with outlier key channels,
scores up to ~150, attention outputs up to ~3):
  block scores (unscaled q.k):  fp32 5e-4, fp16 0.1, bf16 1.0
  attention outputs:            fp32 2e-5, fp16 6e-3, bf16 5e-2
  compress: byte-identical rows, identical fp16 summaries; gather: identical bytes.
Measured under the interpreter: scores fp32 3e-5, fp16 0.022; attention fp32 3.2e-6,
fp16 2.0e-3, bf16 1.6e-2 (one output ulp); with keys before RoPE (rotated in registers)
fp32 6.0e-7, fp16 4.9e-4, bf16 7.8e-3. fp16/bf16 differ from the fp32 twin because
the kernels multiply in the input precision (dequantized keys, scaled queries and
probabilities rounded to it, fp32 accumulation), like any half-precision attention
kernel; the half tolerances leave room for bf16 tensor-core dots on a GPU (the
interpreter runs bf16 dots in fp32).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch.nn.functional as F

from edgekv.errors import EdgekvError
from edgekv.kernels import _backend
from edgekv.kernels.block_score import (adaptive_top_blocks, block_mass, bound_scores, decode_keys, key_copy,
                                        key_copy_bytes, score_blocks)
from edgekv.kernels.compress import compress_blocks
from edgekv.kernels.gather import gather_rows
from edgekv.kernels.rope import block_token_positions, rotate_keys
from edgekv.kernels.sparse_attention import sparse_decode_attention
from edgekv.quant import BlockCodec, round_down_f16, round_up_f16
from edgekv.selection import SCORERS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_TRITON = _backend.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="large shapes run on a CUDA GPU only")

SCORE_ATOL = {torch.float32: 5e-4, torch.float16: 0.1, torch.bfloat16: 1.0}
ATTN_ATOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# ---- data -----------------------------------------------------------------------------------


def case_id(value: object) -> str | None:
    """Readable test ids for dtypes (pytest's default for everything else)."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_kv(n: int, b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[n, b, d]`` fp32 shaped like a model's: keys with a few large outlier channels."""
    g = gen(seed)
    k = torch.randn(n, b, d, generator=g)
    k[..., :: max(1, d // 4)] *= 8.0
    k += torch.randn(1, 1, d, generator=g)  # per-channel offsets
    v = torch.randn(n, b, d, generator=g)
    return k, v


def make_rows(codec: BlockCodec, hkv: int, nb: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [hkv, nb, row_bytes], k, v [hkv, nb*B, D] fp32 originals)`` on DEVICE."""
    k, v = make_kv(hkv * nb, codec.block_size, codec.head_dim, seed)
    if nb == 0:  # BlockCodec.encode does not take zero blocks
        rows = torch.empty(hkv, 0, codec.row_bytes, dtype=torch.uint8)
    else:
        rows = codec.encode(k, v).view(hkv, nb, codec.row_bytes)
    shape = (hkv, nb * codec.block_size, codec.head_dim)
    return rows.to(DEVICE), k.view(shape).to(DEVICE), v.view(shape).to(DEVICE)


def make_q(num_heads: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(num_heads, d, generator=gen(seed)) * 0.5).to(DEVICE, dtype)


def make_block_ids(hkv: int, ksel: int, seed: int, top: int = 250, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``[hkv, ksel]`` distinct block ids per KV head in random order, one of them ``top``
    (the others below 250): the positions of selected blocks, up to ``top * block_size``."""
    g = gen(seed)
    ids = torch.stack([torch.randperm(250, generator=g)[:ksel] for _ in range(hkv)])
    if ksel:
        ids[:, ksel // 2] = top
    return ids.to(DEVICE, dtype)


def rope_inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return (1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEVICE)


def both(fn, *args, **kwargs):
    """(twin result, Triton result) of a public kernel function."""
    return fn(*args, backend="torch", **kwargs), fn(*args, backend="triton", **kwargs)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


# ---- backend selection --------------------------------------------------------------------------


def test_unknown_backend_is_a_user_error():
    codec = BlockCodec(4, 16, 64)
    rows, _, _ = make_rows(codec, 1, 1, 0)
    with pytest.raises(EdgekvError, match="unknown kernel backend"):
        score_blocks(make_q(1, 64, F32, 0), rows, codec, backend="cuda")


def test_auto_backend_follows_the_device():
    t = torch.zeros(1)
    assert _backend.resolve_backend("auto", t) == ("numba" if _backend.numba_available() else "torch")
    if CUDA and HAS_TRITON:
        assert _backend.resolve_backend("auto", t.cuda()) == "triton"


def test_compiled_kernel_refuses_cpu_tensors_with_advice():
    class CompiledKernel:  # stands in for a compiled (not interpreted) Triton kernel
        pass

    with pytest.raises(EdgekvError, match="TRITON_INTERPRET=1"):
        _backend.check_triton_device(CompiledKernel(), torch.zeros(1))


def test_bad_combine_is_rejected():
    codec = BlockCodec(4, 16, 64)
    rows, _, _ = make_rows(codec, 1, 1, 0)
    with pytest.raises(ValueError, match="combine"):
        score_blocks(make_q(1, 64, F32, 0), rows, codec, combine="mean", backend="torch")


# ---- twins: exactness anchors ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (5, 128), (3, 24)])
def test_decode_keys_matches_the_codec(bits, block_size, head_dim):
    codec = BlockCodec(bits, block_size, head_dim)
    rows, _, _ = make_rows(codec, 2, 3, bits)
    flat = rows.view(6, -1)
    assert torch.equal(decode_keys(flat, codec), codec.decode(flat)[0])


@pytest.mark.parametrize("bits", [2, 4, 16])
def test_key_copy_keeps_the_keys(bits):
    codec = BlockCodec(bits, 32, 128)
    rows, _, _ = make_rows(codec, 2, 3, bits)
    copy = key_copy(rows, codec)
    assert copy.shape == (2, 3, key_copy_bytes(codec)) and copy.shape[-1] < codec.row_bytes
    assert torch.equal(decode_keys(copy.view(6, -1), codec), codec.decode(rows.view(6, -1))[0])
    if bits == 4:
        assert key_copy_bytes(codec) == 2560 and codec.row_bytes == 4864  # the Llama-8B layout


@pytest.mark.parametrize("combine", ["max", "sum"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("bits, block_size, head_dim", [(4, 16, 64), (2, 16, 64), (8, 8, 32), (16, 16, 64), (2, 5, 6)])
def test_score_twin_is_block_max_of_combined_dot_products(combine, group, bits, block_size, head_dim):
    """The twin scores on codes (scale folded into the query); it must equal decoding first."""
    codec = BlockCodec(bits, block_size, head_dim)
    hkv, nb = 2, 3
    rows, _, _ = make_rows(codec, hkv, nb, 1)
    q = make_q(hkv * group, head_dim, F32, 2)
    k = codec.decode(rows.view(hkv * nb, -1))[0].view(hkv, nb, block_size, head_dim).cpu()
    want = torch.empty(hkv, nb)
    for h in range(hkv):
        for b in range(nb):
            per_head = torch.stack([k[h, b] @ q[h * group + g].cpu() for g in range(group)])  # [group, B]
            per_token = per_head.amax(0) if combine == "max" else per_head.sum(0)
            want[h, b] = per_token.max()
    got = score_blocks(q, rows, codec, combine=combine, backend="torch")
    for copy in (rows, key_copy(rows, codec)):  # whole rows and the compact key copy score the same
        assert torch.equal(score_blocks(q, copy, codec, combine=combine, backend="torch"), got)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group,tail", [(1, 0), (3, 37)])
@pytest.mark.parametrize("bits, block_size, head_dim", [(4, 16, 64), (2, 5, 6), (16, 8, 32)])
def test_block_mass_is_each_block_s_share_of_the_softmax_summed_over_the_group(group, tail, bits, block_size,
                                                                               head_dim):
    codec = BlockCodec(bits, block_size, head_dim)
    hkv, nb = 2, 5
    rows, _, _ = make_rows(codec, hkv, nb, 3)
    q = make_q(hkv * group, head_dim, F32, 4) * 4  # peaked attention: masses differ a lot
    tail_k = torch.randn(hkv, tail, head_dim, generator=gen(5)).to(DEVICE)
    k = codec.decode(rows.view(hkv * nb, -1))[0].view(hkv, nb * block_size, head_dim)
    want = torch.zeros(hkv, nb)
    for h in range(hkv):
        for g in range(group):
            p = torch.softmax(torch.cat((k[h], tail_k[h])).cpu() @ q[h * group + g].cpu() * head_dim**-0.5, dim=0)
            want[h] += p[: nb * block_size].view(nb, block_size).sum(dim=1)
    got = block_mass(q, key_copy(rows, codec), codec, tail_k, backend="torch")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block_mass(q, rows, codec, tail_k, backend="torch"), got)  # whole rows: the same
    no_tail = block_mass(q, rows, codec, tail_k[:, :0], backend="torch").sum(dim=1)
    torch.testing.assert_close(no_tail.cpu(), torch.full((hkv,), float(group)))  # every query's whole softmax


def test_adaptive_budgets_give_blocks_to_the_head_whose_attention_is_spread():
    # head 0 looks at one block, head 1 spreads evenly: 2 heads x 4 places (k=5, 1 sink)
    weights = torch.tensor([[0.0, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
                            [0.0, 0.19, 0.18, 0.17, 0.16, 0.15, 0.14, 0.13, 0.12, 0.11]])
    ids = adaptive_top_blocks(weights, 5, 1, backend="torch")
    assert ids.tolist() == [[0, 1, -1, -1, -1, -1, -1, -1],
                            [0, 1, 2, 3, 4, 5, 6, 7]]  # 1 + 7 places = 2 x 4
    assert ((ids >= 0).sum() == 2 * 5).item()
    uniform = torch.rand(3, 20, generator=gen(6))
    assert torch.equal(adaptive_top_blocks(uniform, 20, 1), torch.arange(20).expand(3, -1))  # k covers all


def test_adaptive_budgets_keep_the_sinks_and_the_heaviest_blocks_of_any_head():
    weights = torch.rand(4, 30, generator=gen(7))
    for k, sinks in [(1, 1), (6, 2), (29, 1)]:
        ids = adaptive_top_blocks(weights, k, sinks, backend="torch")
        assert (ids[:, :sinks] == torch.arange(sinks)).all()
        real = ids >= 0
        assert real.sum().item() == 4 * k and (real[:, :-1] >= real[:, 1:]).all()  # -1 only after a head's blocks
        assert all((row[row >= 0].diff() > 0).all() for row in ids)  # ascending
        chosen = torch.zeros_like(weights, dtype=torch.bool)
        chosen[torch.arange(4)[:, None].expand_as(ids)[real], ids[real]] = True
        free = weights[:, sinks:]
        picked = free[chosen[:, sinks:]]
        if picked.numel() and (~chosen[:, sinks:]).any():
            assert picked.min() >= free[~chosen[:, sinks:]].max()  # no left-out block outweighs a chosen one


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_bound_twin_bounds_the_exact_block_score(combine):
    """With the minmax scorer's kmin/kmax, the Quest bound is >= the exact block max of the original keys."""
    hkv, nb, group, b, d = 2, 13, 4, 16, 64
    codec = BlockCodec(4, b, d)
    _, k, v = make_rows(codec, hkv, nb, 3)
    summary = SCORERS["minmax"].summarize(k, codec, "torch")  # [kmin | kmax], rounded outward
    q = make_q(hkv * group, d, F32, 4)
    s = torch.einsum("hgd,htd->hgt", q.view(hkv, group, d), k)  # [hkv, group, nb*B]
    s = s.amax(1) if combine == "max" else s.sum(1)
    exact = s.view(hkv, nb, b).amax(-1)
    bound = bound_scores(q, summary[..., :d], summary[..., d:], combine=combine, backend="torch")
    assert (bound >= exact - 1e-4 * exact.abs().clamp(min=1)).all()


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("group,tail", [(1, 0), (3, 37), (4, 1)])
def test_attention_twin_with_all_blocks_is_dense_attention(bits, group, tail):
    """Exactness anchor: every block selected == dense softmax attention over the decoded K/V."""
    codec = BlockCodec(bits, 16, 64)
    hkv, nb = 2, 7
    rows, _, _ = make_rows(codec, hkv, nb, 5)
    tk, tv = (x.to(DEVICE) for x in make_kv(hkv, tail, 64, 6))
    q = make_q(hkv * group, 64, F32, 7)
    k, v = codec.decode(rows.view(hkv * nb, -1))
    k = torch.cat([k.view(hkv, nb * 16, 64), tk], dim=1).double()
    v = torch.cat([v.view(hkv, nb * 16, 64), tv], dim=1).double()
    want = F.scaled_dot_product_attention(q.double().view(hkv * group, 1, 64), k, v, enable_gqa=True)
    got = sparse_decode_attention(q, rows, codec, tk, tv, backend="torch")
    torch.testing.assert_close(got.double(), want.view(hkv * group, 64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,abs_tol,rel_tol", [(8, 0.005, 0.02), (4, 0.05, 0.15), (2, 0.25, 0.8)])
def test_compressed_attention_is_close_to_fp32_attention(bits, abs_tol, rel_tol):
    """Attention over packed rows vs attention over the original fp32 K/V (no tail).

    Data: 77 blocks of 16 tokens, head_dim 128, GQA 4, values ~N(0, 1), keys with outlier
    channels. Measured over 3 seeds: max abs error (in units of the values' std)
    8 bits 0.0011-0.0012, 4 bits 0.016-0.023, 2 bits 0.07-0.10; relative error
    ||o_bits - o_fp32|| / ||o_fp32|| 0.006, 0.10-0.11, 0.51-0.61 (the output itself is
    small, |o| <= 0.16: random values average out over ~1,200 tokens).
    """
    codec = BlockCodec(bits, 16, 128)
    hkv, nb, group = 2, 77, 4
    rows, k, v = make_rows(codec, hkv, nb, 8)
    q = make_q(hkv * group, 128, F32, 9)
    empty = torch.zeros(hkv, 0, 128, device=DEVICE)
    want = F.scaled_dot_product_attention(q.view(hkv * group, 1, 128), k, v, enable_gqa=True).view(-1, 128)
    got = sparse_decode_attention(q, rows, codec, empty, empty, backend="torch")
    assert max_err(got, want) < abs_tol
    assert ((got - want).norm() / want.norm()).item() < rel_tol


def test_attention_twin_masks_invalid_blocks_and_empty_heads():
    codec = BlockCodec(4, 16, 64)
    hkv, ksel = 2, 3
    rows, _, _ = make_rows(codec, hkv, ksel, 10)
    q = make_q(hkv * 2, 64, F32, 11)
    empty = torch.zeros(hkv, 0, 64, device=DEVICE)
    got = sparse_decode_attention(q, rows, codec, empty, empty, num_valid=torch.tensor([2, 0]), backend="torch")
    first_two = sparse_decode_attention(q[:2], rows[:1, :2], codec, empty[:1], empty[:1], backend="torch")
    torch.testing.assert_close(got[:2], first_two)
    assert torch.equal(got[2:], torch.zeros_like(got[2:]))  # a head with no tokens attends to nothing


@pytest.mark.parametrize("group,tail", [(1, 0), (3, 37)])
def test_attention_twin_rotates_keys_before_rope(group, tail):
    """Anchor: rows of keys before RoPE + block_ids/inv_freq == rows of the rotated keys.

    16-bit rows, so the only difference is where the keys were rounded to fp16 (before
    or after rotation; keys up to ~24, positions up to ~4K): measured max abs 1.2e-4 and
    1.3e-4, against 0.35 and 0.72 when the rotation is left out.
    """
    b, d, hkv, nb = 16, 64, 2, 5
    codec = BlockCodec(16, b, d)
    k, v = make_kv(hkv * nb, b, d, 13)  # k: the model's (rotated) keys
    ids = make_block_ids(hkv, nb, 14).cpu()
    inv = rope_inv_freq(d).cpu()
    k_pre = rotate_keys(k.view(hkv, nb * b, d), block_token_positions(ids, b), inv, inverse=True)
    rows_rot = codec.encode(k, v).view(hkv, nb, -1).to(DEVICE)
    rows_pre = codec.encode(k_pre.view(hkv * nb, b, d), v).view(hkv, nb, -1).to(DEVICE)
    tk, tv = (x.to(DEVICE) for x in make_kv(hkv, tail, d, 15))
    q = make_q(hkv * group, d, F32, 16)
    want = sparse_decode_attention(q, rows_rot, codec, tk, tv, backend="torch")
    got = sparse_decode_attention(q, rows_pre, codec, tk, tv, block_ids=ids.to(DEVICE),
                                  rope_inv_freq=inv.to(DEVICE), backend="torch")
    assert max_err(got, want) < 1e-3
    assert max_err(sparse_decode_attention(q, rows_pre, codec, tk, tv, backend="torch"), want) > 0.1


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_attention_rope_argument_errors(backend):
    codec = BlockCodec(4, 16, 64)
    hkv, ksel = 2, 3
    rows, _, _ = make_rows(codec, hkv, ksel, 17)
    empty = torch.zeros(hkv, 0, 64, device=DEVICE)
    q = make_q(hkv * 2, 64, F32, 18)
    ids, inv = make_block_ids(hkv, ksel, 19), rope_inv_freq(64)

    def attend(**kwargs):
        return sparse_decode_attention(q, rows, codec, empty, empty, backend=backend, **kwargs)

    for kwargs in (dict(block_ids=ids), dict(rope_inv_freq=inv)):
        with pytest.raises(ValueError, match="go together"):
            attend(**kwargs)
    for bad_ids in (ids[:, :2], ids[:1], ids.float()):
        with pytest.raises(ValueError, match="block_ids must be an int tensor"):
            attend(block_ids=bad_ids, rope_inv_freq=inv)
    for bad_freq in (inv[:-1], inv[None], rope_inv_freq(128)):
        with pytest.raises(ValueError, match="rope_inv_freq must be"):
            attend(block_ids=ids, rope_inv_freq=bad_freq)


def test_compress_twin_is_the_codec():
    codec = BlockCodec(4, 16, 64)
    hkv, n = 3, 5
    _, k, v = make_rows(codec, hkv, n, 12)
    rows = compress_blocks(k, v, codec, backend="torch")
    assert torch.equal(rows.view(hkv * n, -1), codec.encode(k.reshape(hkv * n, 16, 64), v.reshape(hkv * n, 16, 64)))


def test_a_key_copy_is_the_key_part_of_the_rows():
    for bits in (2, 4, 8, 16):
        codec = BlockCodec(bits, 16, 64)
        _, k, v = make_rows(codec, 2, 3, 13)
        rows = codec.encode(k.reshape(6, 16, 64), v.reshape(6, 16, 64))
        assert torch.equal(codec.encode_keys(k.reshape(6, 16, 64)), key_copy(rows, codec))


def test_fp16_rounding_helpers():
    x = torch.tensor([0.1, -0.1, 1.0, -65504.0, 1e-8, -1e-8, 0.0, 3.0e-5])
    down, up = round_down_f16(x), round_up_f16(x)
    assert (down.float() <= x).all() and (up.float() >= x).all()
    exact = x.half().float() == x
    assert torch.equal(down[exact], x.half()[exact]) and torch.equal(up[exact], x.half()[exact])
    assert (down.float() < x)[~exact].all() and (up.float() > x)[~exact].all()


# ---- Triton vs twin: block scores -------------------------------------------------------------

SCORE_CASES = [  # (num_blocks, head_dim, group, bits, block_size, dtype)
    # every awkward block count x GQA ratio, 4 bits; head_dim and dtype alternate
    *[(nb, 64 if i % 2 else 128, group, 4, 16, F32 if i % 3 else F16)
      for i, (nb, group) in enumerate((nb, g) for nb in (1, 3, 13, 77) for g in (1, 3, 4, 8))],
    # other bit widths, dtypes and layouts
    (1, 64, 1, 4, 16, F32),
    (3, 128, 3, 4, 16, F16),
    (13, 64, 4, 2, 16, F32),
    (77, 128, 8, 4, 16, F32),
    (13, 128, 1, 8, 5, BF16),
    (3, 64, 8, 16, 16, F16),
    (7, 24, 3, 4, 3, F32),
]


@needs_triton
@pytest.mark.parametrize("nb,d,group,bits,block_size,dtype", SCORE_CASES, ids=case_id)
def test_score_blocks_triton_matches_twin(nb, d, group, bits, block_size, dtype):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = make_rows(codec, hkv, nb, nb + d)
    q = make_q(hkv * group, d, dtype, group)
    copy = key_copy(rows, codec)  # the compact GPU-resident form must score the same
    for combine in ("max", "sum"):
        want, got = both(score_blocks, q, rows, codec, combine=combine)
        assert got.shape == (hkv, nb) and got.dtype == torch.float32
        assert max_err(got, want) <= SCORE_ATOL[dtype], combine
        if combine == "max":
            assert torch.equal(score_blocks(q, copy, codec, backend="torch"), want)
            assert torch.equal(score_blocks(q, copy, codec, backend="triton"), got)


BOUND_CASES = [  # (num_blocks, head_dim, group, dtype)
    (1, 64, 1, F32), (3, 128, 3, F16), (13, 64, 8, BF16), (77, 128, 4, F32), (40, 24, 3, F16),
]


@needs_triton
@pytest.mark.parametrize("nb,d,group,dtype", BOUND_CASES, ids=case_id)
def test_bound_scores_triton_matches_twin(nb, d, group, dtype):
    hkv = 3
    g = gen(nb)
    lo = torch.randn(hkv, nb, d, generator=g)
    kmin = lo.half().to(DEVICE)
    kmax = (lo + torch.rand(hkv, nb, d, generator=g) * 3).half().to(DEVICE)
    q = make_q(hkv * group, d, dtype, nb)
    for combine in ("max", "sum"):
        want, got = both(bound_scores, q, kmin, kmax, combine=combine)
        assert max_err(got, want) <= SCORE_ATOL[dtype], combine


# ---- Triton vs twin: sparse attention ----------------------------------------------------------

ATTN_CASES = [  # (k_selected, tail_len, head_dim, group, bits, block_size, dtype, split_blocks)
    # every selected count x tail length x GQA ratio, 4 bits fp32; head_dim and split alternate
    *[(ksel, tail, 64 if i % 2 else 128, group, 4, 16, F32, (None, 1, 2)[i % 3])
      for i, (ksel, tail, group) in enumerate(
          (k, t, g) for k in (1, 2, 7) for t in (0, 1, 37) for g in (1, 3, 4, 8))],
    # other bit widths, dtypes, block sizes and layouts
    (1, 0, 64, 1, 4, 16, F32, None),
    (2, 37, 128, 4, 4, 16, F32, 1),
    (7, 1, 64, 3, 4, 16, F16, 3),
    (7, 37, 128, 8, 4, 32, BF16, None),
    (2, 0, 128, 3, 2, 16, F32, 1),
    (7, 37, 64, 4, 8, 16, F16, 2),
    (1, 37, 64, 8, 16, 16, F32, 1),
    (0, 37, 64, 4, 4, 16, F32, None),
    (7, 1, 24, 3, 4, 5, F32, 2),
]


@needs_triton
@pytest.mark.parametrize("ksel,tail,d,group,bits,block_size,dtype,split", ATTN_CASES, ids=case_id)
def test_sparse_attention_triton_matches_twin(ksel, tail, d, group, bits, block_size, dtype, split):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = make_rows(codec, hkv, ksel, ksel * 7 + tail)
    tk, tv = (x.to(DEVICE, dtype) for x in make_kv(hkv, tail, d, tail + 1))
    q = make_q(hkv * group, d, dtype, d + group)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, split_blocks=split)
    assert got.shape == (hkv * group, d) and got.dtype == dtype
    assert max_err(got, want) <= ATTN_ATOL[dtype]


@needs_triton
@pytest.mark.parametrize("num_valid", [0, 5, "per_head"])
def test_sparse_attention_triton_num_valid(num_valid):
    codec = BlockCodec(4, 16, 64)
    hkv, ksel, group = 3, 7, 2
    rows, _, _ = make_rows(codec, hkv, ksel, 20)
    tk, tv = (x.to(DEVICE) for x in make_kv(hkv, 5, 64, 21))
    if num_valid == "per_head":
        num_valid = torch.tensor([7, 0, 2], dtype=torch.int32, device=DEVICE)
    q = make_q(hkv * group, 64, F32, 22)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, num_valid=num_valid, split_blocks=2)
    assert max_err(got, want) <= ATTN_ATOL[F32]


@needs_triton
def test_sparse_attention_triton_strided_inputs():
    """Rows at an odd byte offset (copied to align their fp16 segments) and a strided tail."""
    codec = BlockCodec(4, 16, 64)
    hkv, ksel, group = 2, 3, 4
    rows, _, _ = make_rows(codec, hkv, ksel, 30)
    padded = torch.zeros(hkv, ksel, codec.row_bytes + 1, dtype=torch.uint8, device=DEVICE)
    padded[..., 1:] = rows
    tk, tv = (x.to(DEVICE) for x in make_kv(hkv, 2 * 9, 64, 31))
    q = make_q(hkv * group, 64, F32, 32)
    want, got = both(sparse_decode_attention, q, padded[..., 1:], codec, tk[:, ::2], tv[:, 1::2])
    assert max_err(got, want) <= ATTN_ATOL[F32]
    direct = sparse_decode_attention(q, rows, codec, tk[:, ::2].contiguous(), tv[:, 1::2].contiguous(),
                                     backend="torch")
    torch.testing.assert_close(want, direct, rtol=1e-6, atol=1e-7)


@needs_triton
def test_sparse_attention_triton_no_tokens_gives_zeros():
    codec = BlockCodec(4, 16, 64)
    rows = torch.zeros(2, 0, codec.row_bytes, dtype=torch.uint8, device=DEVICE)
    empty = torch.zeros(2, 0, 64, device=DEVICE)
    want, got = both(sparse_decode_attention, make_q(4, 64, F32, 0), rows, codec, empty, empty)
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, got)


# keys before RoPE: (k_selected, tail_len, head_dim, group, bits, block_size, dtype, split_blocks,
# largest block id); block ids are distinct per KV head, in random order
ROPE_CASES = [
    (1, 0, 64, 1, 4, 16, F32, None, 250),
    (7, 37, 128, 4, 4, 16, F32, 2, 250),
    (7, 1, 64, 3, 4, 16, F16, 3, 250),
    (7, 37, 128, 8, 4, 32, BF16, None, 250),
    (2, 0, 128, 3, 2, 16, F32, 1, 250),
    (3, 5, 64, 2, 2, 16, BF16, 1, 250),
    (7, 37, 64, 4, 8, 16, F16, 2, 250),
    (3, 5, 64, 8, 16, 16, F32, 1, 250),
    (3, 0, 128, 2, 16, 16, BF16, 2, 250),
    (2, 9, 64, 4, 16, 16, F16, None, 250),
    (7, 1, 24, 3, 4, 5, F32, 2, 250),  # halves of 12 channels, padded to 16
    (3, 4, 24, 2, 2, 3, F16, 1, 250),  # 2 bits: the second half starts 3 code bytes in
    (0, 37, 64, 4, 4, 16, F32, None, 250),  # no rows: block_ids [hkv, 0]
    (5, 3, 64, 4, 4, 16, F32, 2, 40_000),  # positions ~640K: angles up to 6.4e5 rad
]


@needs_triton
@pytest.mark.parametrize("ksel,tail,d,group,bits,block_size,dtype,split,top", ROPE_CASES, ids=case_id)
def test_sparse_attention_triton_rope_matches_twin(ksel, tail, d, group, bits, block_size, dtype, split, top):
    codec = BlockCodec(bits, block_size, d)
    hkv = 2
    rows, _, _ = make_rows(codec, hkv, ksel, ksel * 5 + tail)
    tk, tv = (x.to(DEVICE, dtype) for x in make_kv(hkv, tail, d, tail + 2))
    q = make_q(hkv * group, d, dtype, d + group + 1)
    ids = make_block_ids(hkv, ksel, ksel + d, top, torch.int32 if ksel % 2 else torch.int64)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, split_blocks=split, block_ids=ids,
                     rope_inv_freq=rope_inv_freq(d))
    assert got.shape == (hkv * group, d) and got.dtype == dtype
    assert max_err(got, want) <= ATTN_ATOL[dtype]


@needs_triton
@pytest.mark.parametrize("num_valid,dtype", [(0, F32), (5, F32), ("per_head", F16), ("per_head", BF16)],
                         ids=case_id)
def test_sparse_attention_triton_rope_num_valid(num_valid, dtype):
    codec = BlockCodec(4, 16, 64)
    hkv, ksel, group = 3, 7, 2
    rows, _, _ = make_rows(codec, hkv, ksel, 23)
    tk, tv = (x.to(DEVICE, dtype) for x in make_kv(hkv, 5, 64, 24))
    if num_valid == "per_head":
        num_valid = torch.tensor([7, 0, 2], dtype=torch.int32, device=DEVICE)
    q = make_q(hkv * group, 64, dtype, 25)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, num_valid=num_valid, split_blocks=2,
                     block_ids=make_block_ids(hkv, ksel, 26), rope_inv_freq=rope_inv_freq(64))
    assert max_err(got, want) <= ATTN_ATOL[dtype]


@needs_triton
def test_sparse_attention_triton_rope_needs_halves_on_code_bytes():
    """2 bits, head_dim 12: the second half would start inside a code byte -> ValueError
    naming the way out; the twin takes it."""
    codec = BlockCodec(2, 4, 12)
    rows, _, _ = make_rows(codec, 1, 2, 27)
    empty = torch.zeros(1, 0, 12, device=DEVICE)
    args = (make_q(2, 12, F32, 28), rows, codec, empty, empty)
    rope = dict(block_ids=make_block_ids(1, 2, 29), rope_inv_freq=rope_inv_freq(12))
    with pytest.raises(ValueError, match="multiple of 8.*backend='torch'"):
        sparse_decode_attention(*args, backend="triton", **rope)
    assert sparse_decode_attention(*args, backend="torch", **rope).shape == (2, 12)


# ---- Triton vs twin: compress ---------------------------------------------------------------------


def adversarial_kv(kind: str, hkv: int, tokens: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[hkv, tokens, d]`` fp32 that stress the codec's rounding rules."""
    g = gen(seed)
    k = torch.randn(hkv, tokens, d, generator=g)
    v = torch.randn(hkv, tokens, d, generator=g)
    if kind == "outliers":
        k[:, :, d // 3] *= 300.0
        v[:, tokens // 2] *= 50.0
        k[0, 0, 0] = 30000.0
    elif kind == "constant":
        k[:, :, ::2] = torch.randn(hkv, 1, (d + 1) // 2, generator=g)  # constant channels
        k[:, :, ::4] = 0.75  # an fp16 constant: scale 0
        v[:, ::2, :] = 0.1  # constant tokens, not an fp16 number
    elif kind == "halves":  # codes land exactly on .5: round half to even decides
        k = torch.randint(0, 31, (hkv, tokens, d), generator=g).float() / 2
        k[:, 0], k[:, -1] = 0.0, 15.0
        v = torch.randint(0, 31, (hkv, tokens, d), generator=g).float() / 2
        v[..., 0], v[..., -1] = 0.0, 15.0
    elif kind == "zeros":
        k.zero_()
        v.zero_()
    elif kind == "tiny":  # subnormal fp16 range
        k *= 1e-6
        v *= 1e-7
    return k, v


COMPRESS_CASES = [  # (n, block_size, head_dim, bits, dtype, kind)
    (1, 16, 64, 4, F32, "gaussian"),
    (3, 16, 128, 4, F16, "outliers"),
    (2, 16, 64, 4, F32, "halves"),
    (3, 16, 64, 2, BF16, "constant"),
    (2, 32, 128, 8, F32, "outliers"),
    (2, 16, 64, 16, F32, "gaussian"),
    (1, 16, 128, 16, BF16, "tiny"),
    (3, 5, 24, 4, F32, "tiny"),
    (2, 3, 6, 4, F16, "zeros"),  # odd code bytes: the segment's pad byte
    (1, 1, 6, 8, F32, "constant"),
]


@needs_triton
@pytest.mark.parametrize("n,block_size,d,bits,dtype,kind", COMPRESS_CASES, ids=case_id)
def test_compress_triton_is_byte_identical(n, block_size, d, bits, dtype, kind):
    codec = BlockCodec(bits, block_size, d)
    hkv = 3
    k, v = adversarial_kv(kind, hkv, n * block_size + 2, d, n + d)
    k, v = k.to(DEVICE, dtype), v.to(DEVICE, dtype)
    k, v = k[:, : n * block_size], v[:, 1: n * block_size + 1]  # strided views, like the engine's tail
    want, got = both(compress_blocks, k, v, codec)
    assert want.shape == got.shape and want.dtype == got.dtype
    assert torch.equal(want, got), f"{(want != got).sum().item()} bytes differ"


@needs_triton
def test_compress_triton_no_blocks():
    codec = BlockCodec(4, 16, 64)
    k = torch.zeros(2, 0, 64, device=DEVICE)
    assert compress_blocks(k, k, codec, backend="triton").shape == (2, 0, codec.row_bytes)


# ---- Triton vs twin: gather ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("row_bytes,n", [(4864, 7), (1030, 1), (7, 13), (1, 2)])
def test_gather_triton_matches_twin(row_bytes, n):
    pool = torch.randint(0, 256, (40, row_bytes + 1), dtype=torch.uint8, generator=gen(n))
    if CUDA:
        pool = pool.pin_memory()
    pool = pool[:, 1:] if row_bytes > 1 else pool[:, :1]  # an unaligned view: byte-wise path
    slots = torch.randint(0, 40, (n,), generator=gen(row_bytes)).to(DEVICE)
    out = torch.empty(n, row_bytes, dtype=torch.uint8, device=DEVICE)
    want = gather_rows(pool, slots, backend="torch")
    got = gather_rows(pool, slots, out, backend="triton")
    assert got is out and torch.equal(got.cpu(), want.cpu()) and torch.equal(want.cpu(), pool[slots.cpu()])


@needs_triton
def test_gather_triton_word_path():
    pool = torch.randint(0, 256, (9, 4864), dtype=torch.uint8, generator=gen(0))
    if CUDA:
        pool = pool.pin_memory()
    slots = torch.tensor([8, 0, 3, 3], dtype=torch.int32, device=DEVICE)
    want, got = both(gather_rows, pool, slots)
    assert torch.equal(got.cpu(), want.cpu())


# ---- large shapes (GPU only) -------------------------------------------------------------------------


@needs_cuda
@needs_triton
@pytest.mark.parametrize("nb,group,dtype", [(311, 4, F16), (311, 8, BF16), (1110, 4, F32)])
def test_score_blocks_large(nb, group, dtype):
    codec = BlockCodec(4, 32, 128)
    rows, _, _ = make_rows(codec, 8, nb, nb)
    q = make_q(8 * group, 128, dtype, 1)
    for combine in ("max", "sum"):
        want, got = both(score_blocks, q, rows, codec, combine=combine)
        assert max_err(got, want) <= SCORE_ATOL[dtype]
    kmin = torch.randn(8, nb, 128, device=DEVICE).half()
    want, got = both(bound_scores, q, kmin, kmin + 1)
    assert max_err(got, want) <= SCORE_ATOL[dtype]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("ksel,tail,dtype,split", [(69, 37, F16, None), (69, 311, BF16, 4), (64, 0, F32, None)])
def test_sparse_attention_large(ksel, tail, dtype, split):
    codec = BlockCodec(4, 32, 128)
    rows, _, _ = make_rows(codec, 8, ksel, ksel)
    tk, tv = (x.to(DEVICE, dtype) for x in make_kv(8, tail, 128, 2))
    q = make_q(32, 128, dtype, 3)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, split_blocks=split)
    assert max_err(got, want) <= ATTN_ATOL[dtype]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("ksel,tail,dtype,top", [(69, 37, F16, 4000), (69, 311, BF16, 250), (64, 0, F32, 40_000)])
def test_sparse_attention_rope_large(ksel, tail, dtype, top):
    codec = BlockCodec(4, 32, 128)
    rows, _, _ = make_rows(codec, 8, ksel, ksel + 1)
    tk, tv = (x.to(DEVICE, dtype) for x in make_kv(8, tail, 128, 4))
    q = make_q(32, 128, dtype, 5)
    want, got = both(sparse_decode_attention, q, rows, codec, tk, tv, block_ids=make_block_ids(8, ksel, 6, top),
                     rope_inv_freq=rope_inv_freq(128, 500000.0))
    assert max_err(got, want) <= ATTN_ATOL[dtype]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("bits,dtype", [(4, F16), (2, BF16), (8, F32), (16, F16)])
def test_compress_large(bits, dtype):
    codec = BlockCodec(bits, 32, 128)
    k, v = adversarial_kv("outliers", 8, 311 * 32, 128, 0)
    want, got = both(compress_blocks, k.to(DEVICE, dtype), v.to(DEVICE, dtype), codec)
    assert torch.equal(want, got)


@needs_cuda
@needs_triton
def test_gather_large_from_pinned_pool():
    pool = torch.randint(0, 256, (4096, 4864), dtype=torch.uint8).pin_memory()
    slots = torch.randint(0, 4096, (2048,), device=DEVICE)
    want, got = both(gather_rows, pool, slots)
    assert torch.equal(got, want)


# ---- the kernel bench ---------------------------------------------------------------------------------


def test_kernel_bench_runs_and_reports(capsys):
    from edgekv.bench_kernels import run_kernel_bench

    rows = run_kernel_bench(device=DEVICE, shapes="small", context=512, repeats=1, warmup=0)
    kernels = {r["kernel"] for r in rows}
    assert {"sparse_attention", "dense SDPA (baseline)", "gather rows"} <= kernels
    for r in rows:
        assert r["torch_ms"] > 0 and r["bytes"] > 0
        assert (r["triton_ms"] is None) == (not CUDA or r["kernel"].startswith("dense"))
        has_numba_kernel = r["kernel"].startswith(("block_score", "sparse_attention"))
        assert (r["numba_ms"] is not None) == (has_numba_kernel and not CUDA and _backend.numba_available())
    table = capsys.readouterr().out
    assert "sparse_attention" in table and ("needs a GPU" in table) == (not CUDA)
    with pytest.raises(EdgekvError, match="unknown kernel bench shapes"):
        run_kernel_bench(device="cpu", shapes="huge")
