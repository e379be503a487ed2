"""Opt-in checks of a 32K-context model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M; qwen2
architecture, 24 layers, 14 query / 2 KV heads, head dim 64, vocabulary 151,936).

Skipped unless the environment variable EDGEKV_TEST_MODEL_32K names the model's .gguf
file. To run them:

    bash /work/shared/models/fetch-qwen2.5-coder-0.5b.sh /work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    EDGEKV_TEST_MODEL_32K=/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        python -m pytest -q tests/test_model_32k.py

The first load converts the GGUF file once into edgekv's cache (~90 s and ~3.9 GB peak
RSS on a 2-core CPU); later loads read the converted folder (~4 s). transformers loads
the same converted folder, so both sides run the same dequantised weights in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MODEL = os.environ.get("EDGEKV_TEST_MODEL_32K")
pytestmark = pytest.mark.skipif(not MODEL, reason="set EDGEKV_TEST_MODEL_32K to the .gguf path to run these")

TOL = 1e-3  # max |logit difference|, float32 on both sides: same maths, float rounding apart (measured 1e-5)
TOL_FP16_WEIGHTS = 0.1  # edgekv's CPU default stores weights as float16 (measured 0.0097)


@pytest.fixture(scope="module")
def engine():
    import edgekv

    if not Path(MODEL).is_file():
        pytest.fail(f"EDGEKV_TEST_MODEL_32K={MODEL} is not a file")
    engine = edgekv.load(MODEL, progress=False, offload=False, weight_bits=16, weight_dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.source.folder, dtype=torch.float32).eval()


def _pydoc_ids(engine, tokens: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return engine.tokenizer.encode(text, add_special_tokens=False)[:tokens]


def test_the_model_is_a_32k_qwen2(engine):
    assert engine.config.model_type == "qwen2" and engine.max_context == 32768
    s = engine.shape
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (24, 14, 2, 64, 151936)


def test_logits_equal_transformers_over_a_prefill_and_decode_steps(engine, hf_model):
    ids = _pydoc_ids(engine, 200)
    engine.reset()
    worst = []
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids]), use_cache=True)
        ours, _ = engine.prefill(ids)
        worst.append(float((ours - theirs.logits[0, -1]).abs().max()))
        cache = theirs.past_key_values
        for _ in range(8):  # greedy decode steps, each side fed the same token
            token = int(ours.argmax())
            theirs = hf_model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = theirs.past_key_values
            ours = engine._decode_step(token)
            worst.append(float((ours - theirs.logits[0, -1]).abs().max()))
    engine.reset()
    assert max(worst) <= TOL, worst


def test_float16_weights_stay_close_to_transformers_float32(engine, hf_model):
    import edgekv

    fp16 = edgekv.load(MODEL, progress=False, offload=False, device="cpu", weight_bits=16)
    assert fp16.weight_dtype == torch.float16  # the CPU default
    ids = _pydoc_ids(fp16, 200)
    with torch.inference_mode():
        ours, _ = fp16.prefill(ids)
        theirs = hf_model(torch.tensor([ids])).logits[0, -1]
    fp16.close()
    assert float((ours - theirs).abs().max()) <= TOL_FP16_WEIGHTS


def test_dense_greedy_tokens_equal_transformers_generate_on_a_1k_document(engine, hf_model):
    doc = engine.tokenizer.decode(_pydoc_ids(engine, 1000))
    prompt = engine.encode([{"role": "user", "content": doc + "\n\nSummarise the text above in detail."}])
    assert 1000 <= len(prompt) <= 1100
    engine.reset()
    ours = engine.generate(prompt, max_new_tokens=32).token_ids
    engine.reset()
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=32, do_sample=False, temperature=None, top_p=None, top_k=None)
    theirs = out[0, len(prompt):].tolist()
    stops = [i for i, t in enumerate(theirs) if t in engine.eos_ids]
    theirs = theirs[:stops[0]] if stops else theirs  # transformers keeps the EOS token, edgekv does not
    assert len(ours) >= 16 and ours == theirs


def test_the_chat_template_writes_qwen_turns(engine):
    from transformers import AutoTokenizer

    message = [{"role": "user", "content": "What does `yield` do?"}]
    text = engine.tokenizer.decode(engine.encode(message))
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
                    "You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat does `yield` do?<|im_end|>\n<|im_start|>assistant\n")
    hf = AutoTokenizer.from_pretrained(engine.source.folder)
    assert engine.encode(message) == list(hf.apply_chat_template(message, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False))
    im_end = engine.tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in engine.eos_ids  # the end of a turn stops generation
