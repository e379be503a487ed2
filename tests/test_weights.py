"""weight_bits: projection weights at 4 or 8 bits in the decoder, from GGUF blocks or floats."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import edgekv
from edgekv.cli import app
from edgekv.config import Policy
from edgekv.errors import EdgekvError
from edgekv.kernels.qlinear import QuantizedWeight
from edgekv.shapes import random_engine, shape_config
from edgekv.loader import load_config
from edgekv.weights import LazyState, gguf_source, load_weights, quantized_bits, weight_bytes, weights_nbytes

runner = CliRunner()


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_the_weights_a_decoder_holds_are_what_the_accounting_says(bits):
    engine = random_engine("tiny", weight_bits=bits)
    assert weight_bytes(engine.model) == {"cpu": weights_nbytes(engine.config, bits)}
    layer = engine.model.layers[0]
    assert isinstance(layer["qkv"], QuantizedWeight) == (bits < 16)
    if bits < 16:
        assert layer["qkv"].bits == bits and engine.model.lm_head.bits == 8  # the head stays at 8 bits


def test_an_8b_model_at_4_bits_fits_in_5_and_a_half_gb():
    config = shape_config("llama-3.1-8b")
    assert weights_nbytes(config, 4) <= 5.5e9 < weights_nbytes(config, 8) < weights_nbytes(config, 16)


def test_quantized_weights_give_nearly_the_float_logits_and_the_same_alone_or_in_a_chunk():
    ids = torch.arange(3, 40)
    logits = {}
    for bits in (16, 8, 4):
        engine = random_engine("tiny", weight_bits=bits, weight_dtype="float32", offload=False)
        hidden = engine.model(ids, torch.arange(len(ids)), engine.kv)  # one chunk
        logits[bits] = engine.model.logits(hidden[-1:])[0]
        if bits == 4:  # the last token fed alone (a decode step's matrix-vector kernel) after the rest
            engine.reset()
            engine.model(ids[:-1], torch.arange(len(ids) - 1), engine.kv)
            alone = engine.model.logits(engine.model(ids[-1:], torch.arange(len(ids) - 1, len(ids)), engine.kv))[0]
            assert (alone - logits[4]).abs().max() < 1e-4
    scale = logits[16].abs().max()
    assert (logits[8] - logits[16]).abs().max() < 0.02 * scale
    assert 0 < (logits[4] - logits[16]).abs().max() < 0.2 * scale


def test_the_embedded_model_at_4_bits_holds_its_gguf_blocks_exactly(embedded_source):
    """The GGUF stores every projection as Q4_1: the 4-bit weights are the file's values,
    which the converted float weights are too."""
    assert gguf_source(embedded_source.folder) is not None
    config = load_config(embedded_source)
    state = load_weights(embedded_source, config, 4)
    floats = LazyState(embedded_source.folder)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        qw = state[name]
        assert isinstance(qw, QuantizedWeight) and qw.bits == 4 and qw.group_size == 32
        assert torch.equal(qw.dequantize(), floats[name].float()), name
    head = state["model.embed_tokens.weight"]  # Q8_0 in the file: kept at 8 bits
    assert head.bits == 8 and torch.equal(head.dequantize(), floats["model.embed_tokens.weight"].float())


def test_quantized_weights_are_cached_outside_the_model_folder(embedded_source, monkeypatch):
    """The cache lives under the edgekv cache folder: the model's folder (what identifies
    the model) is left as it was."""
    import edgekv.weights as weights
    from edgekv.loader import resolve_model

    config = load_config(embedded_source)
    weights._cache_file(embedded_source, 4).unlink(missing_ok=True)
    before = sorted(embedded_source.folder.iterdir())
    first = load_weights(embedded_source, config, 4)
    assert weights._cache_file(embedded_source, 4).is_file()
    assert sorted(embedded_source.folder.iterdir()) == before
    assert resolve_model(None).identity == embedded_source.identity
    monkeypatch.setattr(weights, "gguf_quantized", lambda *a: pytest.fail("the cache was not used"))
    second = load_weights(embedded_source, config, 4)
    name = "model.layers.3.mlp.gate_proj.weight"
    assert torch.equal(first[name].codes, second[name].codes)


@pytest.mark.real_model
def test_auto_keeps_the_gguf_blocks_and_decodes_like_the_float_weights(embedded_source, long_text):
    engine = edgekv.load(offload=False)  # auto: the file's own 4-bit blocks
    assert engine.weight_bits == 4 and quantized_bits("lm_head.weight", 4) == 8
    messages = [{"role": "user", "content": long_text[:3000] + "\n\nSummarise the text above."}]
    quantized = engine.generate(messages, max_new_tokens=24, ignore_eos=True)
    floats = edgekv.load(offload=False, weight_bits=16, weight_dtype="float32")
    reference = floats.generate(messages, max_new_tokens=24, ignore_eos=True)
    same = sum(a == b for a, b in zip(quantized.token_ids, reference.token_ids))
    assert same >= 20  # the same weights: only fp32 summation order differs
    assert quantized.stats["weights_bytes"]["cpu"] < 0.3 * reference.stats["weights_bytes"]["cpu"]


def test_bad_weight_bits_are_one_clear_error(tmp_path):
    with pytest.raises(EdgekvError, match="invalid weight_bits 3: use 16, 8, 4 or auto"):
        Policy(weight_bits=3)
    assert Policy(weight_bits="4").weight_bits == 4  # as the command line gives it
    doc = tmp_path / "d.txt"
    doc.write_text("A short document.")
    result = runner.invoke(app, ["generate", str(doc), "-p", "q", "--weight-bits", "5"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: invalid weight_bits 5: use 16, 8, 4 or auto"


def test_info_prints_the_weights_bytes_at_each_width():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    line = next(x for x in result.stdout.splitlines() if x.startswith("weights"))
    assert "16-bit" in line and "8-bit" in line and "4-bit" in line and "the GGUF's own blocks: 4-bit" in line
