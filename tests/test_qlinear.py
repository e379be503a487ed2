"""Quantized projection weights (`edgekv.kernels.qlinear`): the format, its GGUF mapping
and the matrix product's backends against the twin.

Tolerances: a backend's output may differ from the twin (``dequantize`` then
``F.linear`` in fp32) by ``2e-5 * sum_c |W[r, c] x[c]|`` (fp32 summation order over up
to a few thousand terms; observed differences are at most 1/30 of it). GGUF mappings are
bit-identical to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgekv.kernels import _backend
from edgekv.kernels.qlinear import (QuantizedWeight, from_gguf, qlinear, quantize_weight, stack_rows,
                                    transformers_row_order)

SUM_RTOL = 2e-5
BACKENDS = ["torch"] + (["numba"] if _backend.numba_available() else [])
EMBEDDED_SHAPES = [(960, 576), (576, 576), (576, 1536)]  # q/k/v stacked, o, down of the embedded model
AWKWARD_SHAPES = [(961, 576), (7, 40), (33, 100), (5, 1)]  # odd rows; in < group; in not a multiple of it


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights like a trained projection's: gaussian rows of different spreads, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (0.02 + 0.05 * torch.rand(rows, 1, generator=g))
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)] *= 8
    return w


def random_k_blocks(kind: GT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes shaped as GGUF K-quant blocks, with finite positive fp16 d (and dmin)
    fields: every such byte string is a valid block (gguf cannot quantize K-quants)."""
    block_bytes = {GT.Q4_K: 144, GT.Q5_K: 176, GT.Q6_K: 210}[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    halves = lambda: (rng.random((rows, cols // 256)) * 0.01).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if kind == GT.Q6_K:
        raw[..., 208:210] = halves()
    else:
        raw[..., 0:2], raw[..., 2:4] = halves(), halves()
    return raw.reshape(rows, -1)


def gguf_weight(kind: GT, rows: int, cols: int, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """A weight of GGUF type ``kind`` mapped by `from_gguf`, and gguf's own dequantization of it."""
    if kind in (GT.Q4_K, GT.Q5_K, GT.Q6_K):
        raw = random_k_blocks(kind, rows, cols, seed)
    else:
        raw = gguf_quantize(gaussian(rows, cols, seed).numpy(), kind)
    return from_gguf(kind, raw, (rows, cols)), torch.from_numpy(gguf_dequantize(raw, kind).reshape(rows, cols))


def weights_under_test() -> list[tuple[str, QuantizedWeight]]:
    """Every form of the format: flat 4 and 8 bits at several group sizes, and GGUF's forms."""
    out = []
    for rows, cols in AWKWARD_SHAPES:
        for bits, group in ((4, None), (4, 32), (8, None), (8, 16)):
            out.append((f"q{bits}g{group}-{rows}x{cols}", quantize_weight(gaussian(rows, cols), bits, group)))
    for kind in (GT.Q4_0, GT.Q4_1, GT.Q8_0, GT.Q5_0, GT.Q5_1):
        out.append((f"{kind.name}-33x96", gguf_weight(kind, 33, 96)[0]))
    for kind in (GT.Q4_K, GT.Q5_K, GT.Q6_K):
        out.append((f"{kind.name}-17x512", gguf_weight(kind, 17, 512)[0]))
    return out


WEIGHTS = weights_under_test()


def assert_close_to_twin(y: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, bias=None) -> None:
    w = qw.dequantize()
    twin = torch.nn.functional.linear(x.float(), w, bias)
    bound = SUM_RTOL * (x.float().abs() @ w.abs().t()) + 1e-7
    if bias is not None:  # the bias is added once, rounded once
        bound = bound + bias.abs() * torch.finfo(torch.float32).eps
    assert y.shape == twin.shape
    excess = (y.float() - twin).abs() - bound
    assert excess.max() <= 0, f"max |diff| beyond the bound by {excess.max().item():.3g}"


# ----------------------------------------------------------------------------- quantize_weight

@pytest.mark.parametrize("shape", EMBEDDED_SHAPES + AWKWARD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits", [4, 8])
def test_every_weight_decodes_within_half_a_step_of_its_input(bits, shape):
    w = gaussian(*shape)
    qw = quantize_weight(w, bits)
    scale, _ = qw.group_params()
    step = scale.repeat_interleave(qw.group_size, dim=1)[:, :shape[1]]
    err = (qw.dequantize() - w).abs()
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()
    assert qw.dequantize().shape == shape


@pytest.mark.parametrize("bits, bound", [(4, 0.11), (8, 0.007)])
def test_round_trip_error_relative_to_the_weights_spread(bits, bound):
    """Gaussian groups of 64 span ~4.8 sigma: a uniform grid of 15 (4 bits) or 254 (8 bits)
    steps over it has an RMS error of ~0.09 or ~0.005 sigma."""
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(1))
    err = quantize_weight(w, bits).dequantize() - w
    assert err.pow(2).mean().sqrt() / w.std() < bound


def test_clip_search_never_increases_a_groups_error_and_lowers_the_total():
    w = gaussian(256, 576)
    plain, searched = quantize_weight(w, 4), quantize_weight(w, 4, clip_search=True)
    group_err = (lambda q: (q.dequantize() - w).pow(2).view(256, -1, 64).sum(-1))
    assert (group_err(searched) <= group_err(plain) * (1 + 1e-5) + 1e-12).all()
    assert group_err(searched).sum() < 0.97 * group_err(plain).sum()


def test_zero_groups_and_4_bit_constant_groups_decode_exactly():
    w = torch.zeros(3, 130)
    assert torch.equal(quantize_weight(w, 8).dequantize(), w)
    w[1] = 0.25
    w[2, :64] = -3.0
    assert torch.equal(quantize_weight(w, 4).dequantize(), w)


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (4096, 4096)], ids=str)
def test_4_bit_weights_are_at_most_0_6_bytes_per_parameter(shape):
    qw = quantize_weight(torch.randn(*shape), 4)
    assert qw.nbytes == sum(t.numel() * t.element_size() for t in (qw.codes, qw.scale, qw.zero))
    assert qw.nbytes / (shape[0] * shape[1]) <= 0.6
    assert quantize_weight(torch.randn(*shape), 8).bytes_per_parameter <= 1.05


# ----------------------------------------------------------------------------- qlinear backends

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 7, 12])  # 12: past the per-token matvecs, the widened-tile path
@pytest.mark.parametrize("name, qw", WEIGHTS, ids=[n for n, _ in WEIGHTS])
def test_every_backend_equals_the_twin(name, qw, tokens, backend):
    gen = torch.Generator().manual_seed(tokens)
    x, bias = torch.randn(tokens, qw.in_features, generator=gen), torch.randn(qw.out_features, generator=gen)
    assert_close_to_twin(qlinear(x, qw, backend=backend), x, qw)
    assert_close_to_twin(qlinear(x, qw, bias, backend=backend), x, qw, bias)


SMALL_FORMS = [(name, qw) for name, qw in WEIGHTS if name.endswith(("33x96", "7x40", "33x100", "5x1"))
               or name.startswith(("Q4_K", "Q5_K", "Q6_K"))]


@pytest.mark.skipif(not _backend.triton_available(), reason="the triton package is not installed")
@pytest.mark.parametrize("tokens", [1, 5, 20])  # 20: past the fused kernel, the decoded matrix
@pytest.mark.parametrize("name, qw", SMALL_FORMS, ids=[n for n, _ in SMALL_FORMS])
def test_the_triton_kernels_equal_the_twin(name, qw, tokens):
    """Small shapes: on a CPU the kernels run in Triton's interpreter (tests/conftest.py)."""
    if qw.in_features > 512:
        qw = qw.take_rows(torch.arange(min(qw.out_features, 40)))
    gen = torch.Generator().manual_seed(tokens)
    x, bias = torch.randn(tokens, qw.in_features, generator=gen), torch.randn(qw.out_features, generator=gen)
    assert_close_to_twin(qlinear(x, qw, bias, backend="triton"), x, qw, bias)


@pytest.mark.skipif(not _backend.triton_available(), reason="the triton package is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_multiplies_half_activations_in_their_precision_and_sums_in_fp32(dtype):
    """Like any half-precision matrix product: decoded weights rounded to x's dtype for the
    tensor cores, products summed in fp32, the output rounded once."""
    qw = quantize_weight(gaussian(64, 128), 4)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = qlinear(x, qw, backend="triton")
    assert y.dtype == dtype
    w = qw.dequantize()
    twin = x.float() @ w.t()
    eps = torch.finfo(dtype).eps  # the weights' rounding to x's dtype (none under the interpreter: fp32 dots)
    bound = (SUM_RTOL + eps) * (x.float().abs() @ w.abs().t()) + twin.abs() * eps
    assert ((y.float() - twin).abs() <= bound).all()


@pytest.mark.parametrize("blocks", ["one block", "several blocks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_gets_the_same_output_alone_or_in_a_chunk(backend, blocks, monkeypatch):
    if blocks == "several blocks":  # the CPU kernel widens the matrix in blocks of at most TILE_FLOATS
        from edgekv.kernels import qlinear_numba
        monkeypatch.setattr(qlinear_numba, "TILE_FLOATS", 1 << 20)
    qw = quantize_weight(gaussian(600, 4096), 4)
    x = torch.randn(12, 4096, generator=torch.Generator().manual_seed(12))
    chunk = qlinear(x, qw, backend=backend)
    bound = SUM_RTOL * (x.abs() @ qw.dequantize().abs().t()) + 1e-7
    for t in range(12):
        assert ((qlinear(x[t:t + 1], qw, backend=backend) - chunk[t:t + 1]).abs() <= bound[t]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_activations_are_computed_in_fp32_and_returned_in_their_dtype(backend, dtype):
    qw = quantize_weight(gaussian(64, 128), 4)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = qlinear(x, qw, backend=backend)
    assert y.dtype == dtype
    twin = torch.nn.functional.linear(x.float(), qw.dequantize())  # x's narrow values, computed in fp32
    bound = SUM_RTOL * (x.float().abs() @ qw.dequantize().abs().t()) + twin.abs() * torch.finfo(dtype).eps
    assert ((y.float() - twin).abs() <= bound).all()  # fp32 summation order, then one rounding to dtype


@pytest.mark.skipif(not _backend.numba_available(), reason="the numba package is not installed")
def test_auto_runs_the_compiled_kernel_on_the_cpu():
    qw = quantize_weight(gaussian(96, 256), 4)
    x = torch.randn(1, 256)
    assert torch.equal(qlinear(x, qw), qlinear(x, qw, backend="numba"))


# ----------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("kind, bits", [(GT.Q4_0, 4), (GT.Q4_1, 4), (GT.Q4_K, 4), (GT.Q8_0, 8), (GT.Q5_0, 8),
                                        (GT.Q5_1, 8), (GT.Q5_K, 8), (GT.Q6_K, 8)], ids=lambda v: getattr(v, "name", v))
def test_gguf_blocks_map_exactly(kind, bits):
    rows, cols = 7, 512
    qw, expected = gguf_weight(kind, rows, cols, seed=3)
    assert qw.bits == bits and (qw.out_features, qw.in_features) == (rows, cols)
    assert torch.equal(qw.dequantize(), expected)


def test_gguf_bytes_per_parameter():
    sizes = {kind: gguf_weight(kind, 32, 512)[0].bytes_per_parameter
             for kind in (GT.Q4_0, GT.Q4_1, GT.Q4_K, GT.Q8_0, GT.Q6_K)}
    assert sizes == {GT.Q4_0: 0.625, GT.Q4_1: 0.625, GT.Q4_K: 0.578125, GT.Q8_0: 1.0625, GT.Q6_K: 1.0703125}


@pytest.mark.parametrize("kind", [GT.F32, GT.F16, GT.BF16, GT.Q2_K, GT.Q3_K, GT.IQ4_NL], ids=lambda k: k.name)
def test_gguf_types_without_an_exact_mapping_give_none(kind):
    assert from_gguf(kind, np.zeros(1, np.uint8), (1, 256)) is None


def test_gguf_bytes_of_the_wrong_size_or_shape_raise():
    raw = gguf_quantize(np.zeros((4, 64), np.float32), GT.Q4_1)
    with pytest.raises(ValueError, match="bytes"):
        from_gguf(GT.Q4_1, raw, (5, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        from_gguf(GT.Q4_1, raw, (4, 60))


def test_llama_q_and_k_rows_are_put_back_in_transformers_order():
    """llama.cpp interleaves the two rotary halves of each head: rows (h, i, p) in the
    file are rows (h, p, i) in transformers."""
    order = transformers_row_order("llama", "blk.3.attn_k.weight", num_heads=4, num_kv_heads=2, rows=8)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert transformers_row_order("llama", "blk.3.attn_v.weight", 4, 2, 8) is None
    assert transformers_row_order("qwen2", "blk.3.attn_q.weight", 4, 2, 16) is None
    qw = quantize_weight(gaussian(8, 64), 4)
    assert torch.equal(qw.take_rows(order).dequantize(), qw.dequantize()[order])


def test_embedded_model_layer_0_matches_transformers_converted_weights(embedded_source):
    """The embedded GGUF (Q4_1 projections, Q8_0 embedding) mapped and un-permuted gives
    transformers' dequantized matrices bit for bit."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from edgekv.loader import embedded_model_file

    tensors = {t.name: t for t in GGUFReader(embedded_model_file()).tensors}
    with safe_open(embedded_source.folder / "model.safetensors", "pt") as converted:
        for gguf_name, hf_name in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                                   ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
                                   ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
            t = tensors[gguf_name]
            shape = tuple(int(s) for s in reversed(t.shape))
            qw = from_gguf(t.tensor_type, t.data, shape)
            order = transformers_row_order("llama", gguf_name, num_heads=9, num_kv_heads=3, rows=shape[0])
            if order is not None:
                qw = qw.take_rows(order)
            assert torch.equal(qw.dequantize(), converted.get_tensor(hf_name)), gguf_name


QWEN_GGUF = Path(os.environ.get("EDGEKV_QWEN_GGUF", "~/.cache/edgekv/models-src/"
                                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")).expanduser()


@pytest.mark.skipif(not QWEN_GGUF.exists(), reason="opt-in: fetch Qwen2.5-Coder-0.5B Q4_K_M with "
                    "/work/shared/models/fetch-qwen2.5-coder-0.5b.sh (or set EDGEKV_QWEN_GGUF)")
def test_qwen_k_quant_tensors_map_exactly():
    """Qwen2.5-Coder-0.5B Q4_K_M: ffn_down is Q4_K or Q6_K, the rest Q5_0/Q8_0; the first
    tensor of each quantized type maps bit for bit."""
    from gguf import GGUFReader

    seen = set()
    for t in GGUFReader(QWEN_GGUF).tensors:
        if len(t.shape) != 2 or t.tensor_type in seen or t.name in ("token_embd.weight", "output.weight"):
            continue
        seen.add(t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))
        qw = from_gguf(t.tensor_type, t.data, shape)
        assert qw is not None, t.tensor_type.name
        assert torch.equal(qw.dequantize(), torch.from_numpy(gguf_dequantize(t.data, t.tensor_type))), t.name
    assert {GT.Q4_K, GT.Q6_K} <= seen


# ----------------------------------------------------------------------------- structure and errors

def test_stacked_rows_decode_as_the_stacked_matrices():
    q, k, v = (quantize_weight(gaussian(r, 96, seed=r), 4) for r in (12, 4, 4))
    qkv = stack_rows(q, k, v)
    assert qkv.out_features == 20
    assert torch.equal(qkv.dequantize(), torch.cat([q.dequantize(), k.dequantize(), v.dequantize()]))
    with pytest.raises(ValueError, match="different forms"):
        stack_rows(q, quantize_weight(gaussian(4, 96), 8))


@pytest.mark.parametrize("bits", [3, 2, 16])
def test_unsupported_bit_widths_raise(bits):
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_weight(torch.randn(4, 64), bits)


@pytest.mark.parametrize("w, match", [(torch.randn(64), "2-d"), (torch.zeros(0, 64), "non-empty"),
                                      (torch.randint(0, 3, (4, 64)), "float"),
                                      (torch.full((2, 64), float("nan")), "finite"),
                                      (torch.full((2, 64), 1e6), "fp16 range")])
def test_bad_weights_raise(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(w, 4)


def test_bad_group_sizes_and_malformed_weights_raise():
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 64), 4, group_size=33)
    good = quantize_weight(torch.randn(4, 64), 4)
    with pytest.raises(ValueError, match="codes must be"):
        QuantizedWeight(4, 4, 64, 64, good.codes[:, :-1].contiguous(), good.scale, good.zero)
    with pytest.raises(ValueError, match="zero point"):
        QuantizedWeight(4, 4, 64, 64, good.codes, good.scale, None)
    with pytest.raises(ValueError, match="scale must be"):
        QuantizedWeight(4, 4, 64, 64, good.codes, good.scale.float(), good.zero)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_activations_raise(backend):
    qw = quantize_weight(torch.randn(8, 64), 4)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[T, 64\]"):
        qlinear(torch.randn(1, 63), qw, backend=backend)
    with pytest.raises(ValueError, match=r"x must be a float tensor"):
        qlinear(torch.randn(64), qw, backend=backend)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        qlinear(torch.randn(1, 64), qw, torch.zeros(7), backend=backend)
