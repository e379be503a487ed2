"""The engine's offloaded decode path runs the same tokens on the Triton kernels as on their torch twins."""

from __future__ import annotations

import os

import pytest
import torch

import edgekv

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors: its interpreter


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_greedy_tokens_of_every_backend_equal_the_torch_twins(kind, tiny_models, long_text):
    # Interpreted Triton is slow: a tiny two-layer model keeps the real engine path quick.
    messages = [{"role": "user", "content": long_text[:1500] + "\n\nWhat is this about?"}]
    tokens = {}
    for kernels in ("torch", "numba", "triton"):
        engine = edgekv.load(tiny_models[kind], kernels=kernels, block_size=16, recent_window=16)
        result = engine.generate(messages, max_new_tokens=8, ignore_eos=True)
        assert engine.kv.num_blocks >= 10  # most of the prompt sits in packed 4-bit rows
        tokens[kernels] = result.token_ids
        engine.close()
    assert tokens["triton"] == tokens["torch"] and tokens["numba"] == tokens["torch"]


@pytest.mark.real_model
def test_budget_all_over_16bit_tiers_gives_the_dense_tokens(engine, long_text):
    messages = [{"role": "user", "content": long_text[:4000] + "\n\nSummarise the text above."}]
    engine.reset()
    dense = engine.generate(messages, max_new_tokens=32, ignore_eos=True).token_ids
    tiers = edgekv.load(kv_bits=16, budget="all")
    assert tiers.generate(messages, max_new_tokens=32, ignore_eos=True).token_ids == dense
    tiers.close()
