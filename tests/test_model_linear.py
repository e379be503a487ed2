"""Projections over weights stored narrower than the activations (`model.linear`)."""

from __future__ import annotations

import pytest
import torch

from edgekv.model import linear


def _inputs(tokens: int, dtype: torch.dtype = torch.float16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 200, generator=g)
    weight = (torch.randn(300, 200, generator=g) * 0.05).to(dtype)
    bias = torch.randn(300, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_token_gets_the_same_outputs_alone_or_in_a_prefill_chunk(dtype):
    x, weight, bias = _inputs(9, dtype)
    chunk = linear(x, weight, bias)
    alone = torch.cat([linear(x[i:i + 1], weight, bias) for i in range(len(x))])
    assert chunk.dtype == alone.dtype == torch.float32
    # both round the fp32-accumulated product to the weights' dtype: equal bits but for
    # the rare sum that fp32 summation order moves across a rounding boundary
    assert (chunk == alone).float().mean() > 0.99
    torch.testing.assert_close(chunk, alone, rtol=2**-7, atol=1e-6)


def test_narrow_weights_stay_within_fp16_rounding_of_the_fp32_product():
    x, weight, bias = _inputs(5)
    exact = x @ weight.float().T + bias
    for got in (linear(x, weight, bias), linear(x[:1], weight, bias)):
        err = (got - exact[: len(got)]).norm() / exact[: len(got)].norm()
        assert err < 2e-3


def test_same_dtype_weights_are_a_plain_product():
    x, weight, bias = _inputs(4, torch.float32)
    torch.testing.assert_close(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0)
