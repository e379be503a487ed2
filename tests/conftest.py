"""Shared fixtures: the embedded model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from tests
# document caches written by tests go to a throwaway folder, not the user's cache
os.environ.setdefault("EDGEKV_DOC_CACHE_DIR", tempfile.mkdtemp(prefix="edgekv-test-docs-"))

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors, in its interpreter

import edgekv
from edgekv.documents import pydoc_text
from edgekv.loader import resolve_model

# Property tests draw the same examples on every run (a suite that passes, passes again);
# HYPOTHESIS_PROFILE=explore searches fresh random examples each run.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def long_text() -> str:
    return pydoc_text()


@pytest.fixture(scope="session")
def embedded_source():
    return resolve_model(None)


@pytest.fixture(scope="session")
def engine(embedded_source):
    """The embedded SmolLM2-135M-Instruct with the dense, exact KV cache (the reference path)."""
    return edgekv.load(offload=False)


def make_tiny_model(folder: Path, kind: str, embedded_folder: Path, seed: int = 0) -> Path:
    """A random tiny model of the given family in a Hugging Face folder, with a real tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    vocab = 49152  # the embedded tokenizer's vocabulary
    if kind == "llama3":
        config = LlamaConfig(vocab_size=vocab, **TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    elif kind == "qwen2":
        config = Qwen2Config(vocab_size=vocab, **TINY, tie_word_embeddings=False)
    elif kind == "mistral":
        config = MistralConfig(vocab_size=vocab, **TINY, sliding_window=None, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # random biases so the qkv-bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded_folder / f).exists():
            shutil.copy(embedded_folder / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_source) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_model(root / k, k, embedded_source.folder) for k in ("llama3", "qwen2", "mistral")}
