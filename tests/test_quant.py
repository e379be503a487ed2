"""Specification of the compressed KV block row (`edgekv.quant.BlockCodec`).

Keys are quantized per channel over the block's tokens, values per token in groups of
channels (KIVI), both asymmetric with fp16 scale and zero, packed into one uint8 row
per KV head per block.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgekv.errors import EdgekvError
from edgekv.quant import BlockCodec, dense_row_bytes

HEAD_DIMS = (8, 16, 64, 128)
KINDS = ("gaussian", "constant_channels", "outlier_channel", "zeros", "negative", "mixed_scale")
FP32_SLACK = 2.0**-20  # relative slack for fp32 arithmetic in encode/decode


# ---- inputs -------------------------------------------------------------------------------


def make_block(kind: str, n: int, b: int, d: int, seed: int) -> torch.Tensor:
    """One ``[n, b, d]`` fp32 tensor of the given kind of data (all within fp16 range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b, d, generator=g)
    if kind == "constant_channels":
        # every other channel constant over tokens (keys), every other token constant
        # over channels (values); some constants are fp16 numbers, some are not
        x[:, :, ::2] = torch.randn(n, 1, (d + 1) // 2, generator=g) * 3
        x[:, :, ::4] = 0.75
        x[:, ::2, :] = torch.randn(n, (b + 1) // 2, 1, generator=g)
    elif kind == "outlier_channel":
        x[:, :, d // 3] *= 200.0
        x[:, b // 2, :] *= 20.0
        x[0, 0, 0] = 30000.0
    elif kind == "zeros":
        x.zero_()
    elif kind == "negative":
        x = -x.abs() * 5 - 100
    elif kind == "mixed_scale":
        x = x * 10.0 ** (torch.rand(n, 1, d, generator=g) * 7 - 4)
    return x


@st.composite
def cases(draw, kinds=KINDS, bits=(2, 4, 8)):
    """(codec, k, v) with odd shapes, any value group, any input float dtype."""
    d = draw(st.sampled_from(HEAD_DIMS))
    group = draw(st.sampled_from([g for g in (4, 8, 16, 32, 64, 128, 256) if d % g == 0 or g > d]))
    codec = BlockCodec(draw(st.sampled_from(bits)), draw(st.integers(1, 70)), d, group)
    n = draw(st.integers(1, 5))
    kind_k, kind_v = draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    k = make_block(kind_k, n, codec.block_size, d, seed).to(dtype)
    v = make_block(kind_v, n, codec.block_size, d, seed + 1).to(dtype)
    return codec, k, v


def value_groups(codec: BlockCodec, v: torch.Tensor) -> torch.Tensor:
    """``[n, B, D]`` -> ``[n, B, G, group]`` (one value group per last-dim slice)."""
    return v.reshape(v.shape[0], codec.block_size, codec.num_groups, codec.group)


def segment_f16(codec: BlockCodec, rows: torch.Tensor, name: str) -> torch.Tensor:
    start, end = codec.offsets[name]
    return rows[:, start:end].contiguous().view(torch.float16).float()


def assert_within_half_step(x, x_hat, lo, hi, qmax):
    """|x - x_hat| <= one half quantization step of the slice's ideal range, where the
    step allows for fp16 storage of scale and zero (an fp16 ulp on each)."""
    step = ((hi - lo) + 2.0**-10 * lo.abs() + 2.0**-24) / qmax * (1 + 2.0**-9) + 2.0**-24
    tol = step / 2 + FP32_SLACK * (x.abs() + lo.abs() + hi.abs())
    err = (x - x_hat).abs()
    worst = (err - tol).max()
    assert worst <= 0, f"error exceeds half a step by {worst.item():.3g}"


# ---- round trip ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(cases())
def test_every_element_decodes_within_half_a_quantization_step(case):
    codec, k, v = case
    qmax = 2**codec.bits - 1
    k_hat, v_hat = codec.decode(codec.encode(k, v))
    k, v = k.float(), v.float()
    # keys: one range per channel, over the block's tokens
    assert_within_half_step(k, k_hat, k.amin(1, keepdim=True), k.amax(1, keepdim=True), qmax)
    # values: one range per token per group of channels
    vg, vg_hat = value_groups(codec, v), value_groups(codec, v_hat)
    assert_within_half_step(vg, vg_hat, vg.amin(-1, keepdim=True), vg.amax(-1, keepdim=True), qmax)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_stored_grid_covers_each_range_and_decode_stays_within_half_its_step(case):
    codec, k, v = case
    qmax = 2**codec.bits - 1
    rows = codec.encode(k, v)
    k_hat, v_hat = codec.decode(rows)
    n, b, d, g = k.shape[0], codec.block_size, codec.head_dim, codec.num_groups
    k_scale = segment_f16(codec, rows, "k_scale").view(n, 1, d)
    k_zero = segment_f16(codec, rows, "k_zero").view(n, 1, d)
    v_scale = segment_f16(codec, rows, "v_scale").view(n, b, g, 1)
    v_zero = segment_f16(codec, rows, "v_zero").view(n, b, g, 1)
    for x, x_hat, scale, zero, dim in (
        (k.float(), k_hat, k_scale, k_zero, 1),
        (value_groups(codec, v.float()), value_groups(codec, v_hat), v_scale, v_zero, -1),
    ):
        assert (scale >= 0).all()
        assert (zero <= x.amin(dim, keepdim=True)).all()
        assert (zero + qmax * scale >= x.amax(dim, keepdim=True)).all()
        slack = FP32_SLACK * (x.abs() + zero.abs() + qmax * scale)
        assert ((x - x_hat).abs() <= scale / 2 + slack).all()


def test_an_outlier_key_channel_or_value_token_does_not_blur_the_others():
    codec = BlockCodec(4, 32, 64)
    k = make_block("gaussian", 4, 32, 64, seed=0)
    v = make_block("gaussian", 4, 32, 64, seed=1)
    k[:, :, 7] *= 1000.0
    v[:, 5, :] *= 1000.0
    k_hat, v_hat = codec.decode(codec.encode(k, v))
    others = torch.ones(64, dtype=torch.bool)
    others[7] = False
    assert (k - k_hat)[:, :, others].abs().max() < 0.5
    assert (v - v_hat)[:, torch.arange(32) != 5, :].abs().max() < 0.5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_constant_fp16_channel_decodes_exactly_with_zero_scale(bits):
    codec = BlockCodec(bits, 16, 8, value_group=4)
    k = make_block("gaussian", 2, 16, 8, seed=3)
    v = make_block("gaussian", 2, 16, 8, seed=4)
    k[:, :, 2] = -1.5
    v[:, 3, :4] = 0.0
    rows = codec.encode(k, v)
    k_hat, v_hat = codec.decode(rows)
    assert torch.equal(k_hat[:, :, 2], k[:, :, 2])
    assert torch.equal(v_hat[:, 3, :4], v[:, 3, :4])
    assert (segment_f16(codec, rows, "k_scale").view(2, 8)[:, 2] == 0).all()
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 17, 16), (2, 32, 64), (1, 70, 128)])
def test_16_bit_rows_are_raw_fp16_and_round_trip_exactly(shape):
    codec = BlockCodec(16, shape[1], shape[2])
    k = (torch.randn(shape) * 100).half()
    v = torch.randn(shape).half()
    rows = codec.encode(k, v)
    k_hat, v_hat = codec.decode(rows, dtype=torch.float16)
    assert torch.equal(k_hat, k) and torch.equal(v_hat, v)
    start, end = codec.offsets["k"]
    assert torch.equal(rows[:, start:end].contiguous().view(torch.float16).view(shape), k)
    assert set(codec.offsets) == {"k", "v"}


@pytest.mark.parametrize("head_dim", [6, 12, 20])
@pytest.mark.parametrize("bits", [2, 4])
def test_code_counts_that_do_not_fill_whole_bytes_still_round_trip(bits, head_dim):
    codec = BlockCodec(bits, 3, head_dim)
    k = make_block("gaussian", 2, 3, head_dim, seed=5)
    v = make_block("outlier_channel", 2, 3, head_dim, seed=6)
    k_hat, v_hat = codec.decode(codec.encode(k, v))
    qmax = 2**bits - 1
    assert_within_half_step(k, k_hat, k.amin(1, keepdim=True), k.amax(1, keepdim=True), qmax)
    assert_within_half_step(v, v_hat, v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), qmax)


def test_fp16_stepping_used_for_directed_rounding_matches_nextafter_everywhere():
    from edgekv.quant import f16_step

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[torch.isfinite(every)]
    for direction, target in ((+1, torch.inf), (-1, -torch.inf)):
        expected = torch.nextafter(every, torch.full_like(every, target))
        assert torch.equal(f16_step(every, direction).float(), expected.float())


# ---- byte layout --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,block_size,head_dim,value_group",
    [(b, bs, d, g) for b in (2, 4, 8, 16) for bs, d, g in
     [(32, 64, 64), (32, 128, 32), (1, 8, 64), (3, 6, 6), (17, 16, 4), (70, 128, 128)]],
)
def test_row_bytes_follow_the_documented_layout(bits, block_size, head_dim, value_group):
    codec = BlockCodec(bits, block_size, head_dim, value_group)
    if bits == 16:
        expected = dense_row_bytes(block_size, head_dim)
        assert expected == 2 * 2 * block_size * head_dim
        names = ["k", "v"]
    else:
        code_bytes = -(-block_size * head_dim * bits // 8)
        code_bytes += code_bytes % 2  # padded so fp16 segments stay 2-byte aligned
        groups = head_dim // min(value_group, head_dim)
        expected = 2 * code_bytes + 2 * (2 * head_dim) + 2 * (2 * block_size * groups)
        names = ["k", "v", "k_scale", "k_zero", "v_scale", "v_zero"]
    assert codec.row_bytes == expected
    assert list(codec.offsets) == names
    ranges = list(codec.offsets.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == codec.row_bytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % 2 == 0 and end % 2 == 0 for start, end in ranges)
    rows = codec.encode(torch.randn(2, block_size, head_dim), torch.randn(2, block_size, head_dim))
    assert rows.dtype == torch.uint8 and rows.shape == (2, codec.row_bytes)


def test_4_bit_rows_are_under_30_percent_of_fp16():
    codec = BlockCodec(4, block_size=32, head_dim=64, value_group=64)
    assert codec.row_bytes <= 0.30 * dense_row_bytes(32, 64)
    assert codec.compression_ratio == codec.row_bytes / dense_row_bytes(32, 64)
    assert BlockCodec(2, 32, 64).row_bytes < codec.row_bytes < BlockCodec(8, 32, 64).row_bytes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_packed_lowest_bits_first_in_row_major_order(bits):
    """A kernel reading the row by the documented rule gets what `decode` returns."""
    codec = BlockCodec(bits, 5, 16, value_group=8)
    k, v = torch.randn(3, 5, 16), torch.randn(3, 5, 16) * 4
    rows = codec.encode(k, v)
    k_hat, v_hat = codec.decode(rows)
    cpb, mask = 8 // bits, 2**bits - 1
    i = torch.arange(5 * 16)
    channel, token = i % 16, i // 16

    def codes(name):
        start, _ = codec.offsets[name]
        byte = rows[:, start + i // cpb].long()
        return (byte >> (bits * (i % cpb))) & mask  # [n, B*D]

    k_ref = codes("k") * segment_f16(codec, rows, "k_scale")[:, channel] \
        + segment_f16(codec, rows, "k_zero")[:, channel]
    group = token * 2 + channel // 8
    v_ref = codes("v") * segment_f16(codec, rows, "v_scale")[:, group] \
        + segment_f16(codec, rows, "v_zero")[:, group]
    torch.testing.assert_close(k_hat.reshape(3, -1), k_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_hat.reshape(3, -1), v_ref, rtol=1e-6, atol=1e-6)


# ---- determinism and fixed points ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(cases())
def test_encode_is_deterministic_and_blocks_are_encoded_independently(case):
    codec, k, v = case
    rows = codec.encode(k, v)
    assert torch.equal(rows, codec.encode(k.clone(), v.clone()))
    one_by_one = torch.cat([codec.encode(k[i : i + 1], v[i : i + 1]) for i in range(len(k))])
    assert torch.equal(rows, one_by_one)


@settings(max_examples=60, deadline=None)
@given(cases(kinds=("gaussian", "outlier_channel", "zeros", "negative"), bits=(2, 4, 8, 16)))
def test_re_encoding_a_decoded_block_gives_identical_bytes(case):
    """Holds while every scale is a normal fp16 number (or 0). A slice whose range is
    below qmax * 2**-14 gets a subnormal scale with only a few significant bits: its
    maximum may then land a code below the top of the grid (e.g. 254.4 steps at 8 bits),
    still within half a step, but re-encoding fits a smaller scale to it."""
    codec, k, v = case
    k, v = k.half(), v.half()  # a model's KV arrives as fp16 (or bf16) numbers
    rows = codec.encode(k, v)
    if codec.bits < 16:
        scales = torch.cat([segment_f16(codec, rows, name) for name in ("k_scale", "v_scale")], dim=1)
        assume(bool(((scales == 0) | (scales >= 2**-14)).all()))
    assert torch.equal(codec.encode(*codec.decode(rows)), rows)


# ---- quality ------------------------------------------------------------------------------


def test_relative_rmse_on_gaussian_data_falls_with_more_bits():
    k = make_block("gaussian", 64, 32, 64, seed=7)
    v = make_block("gaussian", 64, 32, 64, seed=8)

    def rel_rmse(bits):
        k_hat, v_hat = BlockCodec(bits, 32, 64).decode(BlockCodec(bits, 32, 64).encode(k, v))
        x, x_hat = torch.cat([k, v]), torch.cat([k_hat, v_hat])
        return ((x - x_hat).pow(2).mean() / x.pow(2).mean()).sqrt().item()

    e2, e4, e8, e16 = (rel_rmse(b) for b in (2, 4, 8, 16))
    assert e16 < e8 < e4 < e2
    assert e4 < 0.15 and e8 < 0.01 and e16 < 1e-3


# ---- interface ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 32])
def test_unsupported_bits_raise_a_user_error(bits):
    with pytest.raises(EdgekvError, match=rf"kv_bits must be one of 2, 4, 8, 16 \(got {bits}\)"):
        BlockCodec(bits, 32, 64)


def test_value_group_must_divide_head_dim_and_is_capped_at_head_dim():
    with pytest.raises(ValueError, match="value_group"):
        BlockCodec(4, 32, 64, value_group=24)
    with pytest.raises(ValueError):
        BlockCodec(4, 32, 64, value_group=0)
    with pytest.raises(ValueError):
        BlockCodec(4, 0, 64)
    wide = BlockCodec(4, 32, 16, value_group=64)
    assert wide.group == 16 and wide.num_groups == 1


def test_wrong_shapes_and_dtypes_are_rejected():
    codec = BlockCodec(4, 32, 64)
    with pytest.raises(ValueError):
        codec.encode(torch.randn(2, 31, 64), torch.randn(2, 31, 64))
    with pytest.raises(ValueError):
        codec.encode(torch.randn(2, 32, 64), torch.randn(3, 32, 64))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(2, codec.row_bytes + 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(2, codec.row_bytes, dtype=torch.int8))


def test_decode_accepts_row_views_and_returns_the_requested_dtype():
    codec = BlockCodec(4, 32, 64)
    rows = codec.encode(torch.randn(6, 32, 64), torch.randn(6, 32, 64))
    k, v = codec.decode(rows)
    assert k.shape == v.shape == (6, 32, 64) and k.dtype == torch.float32
    k_sub, v_sub = codec.decode(rows[1::2])
    assert torch.equal(k_sub, k[1::2]) and torch.equal(v_sub, v[1::2])
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8), rows.flatten()])[1:].view(rows.shape)
    assert torch.equal(codec.decode(odd)[0], k)  # storage offset not 2-byte aligned
    k16, v16 = codec.decode(rows, dtype=torch.float16)
    assert k16.dtype == v16.dtype == torch.float16
    assert torch.equal(k16, k.half()) and torch.equal(v16, v.half())


@pytest.mark.parametrize("bits,head_dim", [(4, 64), (2, 6), (8, 16), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_into_caller_buffers_matches_a_fresh_decode(bits, head_dim, dtype):
    codec = BlockCodec(bits, 3, head_dim)
    rows = codec.encode(torch.randn(4, 3, head_dim), torch.randn(4, 3, head_dim))
    out = (torch.full((4, 3, head_dim), torch.nan, dtype=dtype),
           torch.full((4, 3, head_dim), torch.nan, dtype=dtype))
    got = codec.decode(rows, dtype=dtype, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    expected = codec.decode(rows, dtype=dtype)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(rows, dtype=dtype, out=(out[0][:2], out[1][:2]))
