"""edgekv's direct tokenizer gives exactly transformers' token ids and chat prompts."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from edgekv.loader import load_tokenizer
from edgekv.tokenizer import FastTokenizer


@pytest.fixture(scope="module")
def pair(embedded_source):
    return load_tokenizer(embedded_source), AutoTokenizer.from_pretrained(embedded_source.folder)


def test_the_loader_uses_the_direct_tokenizer(pair):
    assert isinstance(pair[0], FastTokenizer)


def test_encode_and_decode_match_transformers(pair, long_text):
    ours, theirs = pair
    text = long_text[:20000] + " café 東京 🙂\n\n\tend"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    ids = theirs.encode(text)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == theirs.eos_token_id


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is a decorator?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Doc:\n\nline  two\n\nQ?"}],
])
def test_chat_template_matches_transformers(pair, messages):
    ours, theirs = pair
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == list(expected)
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
