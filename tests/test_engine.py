"""The engine's generate loop: greedy parity with transformers, sampling, stopping, KV reuse."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import edgekv
from edgekv.config import Policy
from edgekv.engine import ContextOverflowError, Engine
from edgekv.errors import EdgekvError
from edgekv.kvcache import PagedKVCache
from edgekv.loader import resolve_model


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return Engine(resolve_model(tiny_models["llama3"]), Policy(block_size=16, prefill_chunk=64))


@pytest.mark.real_model
def test_greedy_output_equals_transformers_generate_on_a_1k_document(engine, embedded_source, long_text):
    messages = [{"role": "user", "content": long_text[:4000] + "\n\nSummarise the text above."}]
    ids = engine.encode(messages)
    assert 900 <= len(ids) <= 1300
    engine.reset()
    ours = engine.generate(messages, max_new_tokens=64, ignore_eos=True).token_ids
    ref = AutoModelForCausalLM.from_pretrained(embedded_source.folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_reused_prefix_gives_the_same_tokens_as_a_fresh_run(tiny, long_text):
    doc = long_text[:3000]
    first = [{"role": "user", "content": doc + "\n\nQuestion one?"}]
    second = [{"role": "user", "content": doc + "\n\nAnother question entirely?"}]
    tiny.reset()
    tiny.generate(first, max_new_tokens=4)
    reused = tiny.generate(second, max_new_tokens=12, ignore_eos=True)
    tiny.reset()
    fresh = tiny.generate(second, max_new_tokens=12, ignore_eos=True)
    assert reused.stats["reused_tokens"] > 0.8 * reused.stats["prompt_tokens"]
    assert fresh.stats["reused_tokens"] == 0
    assert reused.token_ids == fresh.token_ids


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tiny):
    a = tiny.generate("Tell me a story.", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    b = tiny.generate("Tell me a story.", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    c = tiny.generate("Tell me a story.", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
    g = tiny.generate("Tell me a story.", max_new_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids  # the same seed, the same tokens
    assert a.token_ids != c.token_ids  # another seed, other tokens
    assert a.token_ids != g.token_ids  # sampling is not greedy decoding


def test_on_token_streams_the_text_and_false_cancels(tiny):
    pieces = []
    full = tiny.generate("Count.", max_new_tokens=10, ignore_eos=True, on_token=pieces.append)
    assert "".join(pieces) == full.text and full.stats["finish_reason"] == "length"
    seen = []
    cancelled = tiny.generate("Count.", max_new_tokens=10, ignore_eos=True,
                              on_token=lambda p: seen.append(p) or len(seen) < 3)
    assert cancelled.stats["finish_reason"] == "cancelled"
    assert len(cancelled.token_ids) < 10


def test_stream_yields_one_piece_per_token_and_returns_what_generate_returns(tiny):
    full = tiny.generate("Count.", max_new_tokens=10, ignore_eos=True)
    steps = tiny.stream("Count.", max_new_tokens=10, ignore_eos=True)
    pieces = []
    with pytest.raises(StopIteration) as done:
        while True:
            pieces.append(next(steps))
    assert len(pieces) == 10 and "".join(pieces) == full.text
    assert done.value.value.token_ids == full.token_ids
    steps = tiny.stream("Count.", max_new_tokens=10, ignore_eos=True)
    next(steps), next(steps)
    with pytest.raises(StopIteration) as stopped:
        steps.send(False)
    assert stopped.value.value.stats["finish_reason"] == "cancelled"
    assert len(stopped.value.value.token_ids) == 2


def test_stop_string_ends_generation_and_is_excluded(tiny):
    full = tiny.generate("Count.", max_new_tokens=20, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[4:7]
    stopped = tiny.generate("Count.", max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert stopped.stats["finish_reason"] == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_context_overflow_names_both_counts(tiny):
    with pytest.raises(ContextOverflowError) as err:
        tiny.generate(list(range(100, 2100)), max_new_tokens=100)
    assert "2000" in str(err.value) and "2048" in str(err.value) and "--truncate" in str(err.value)


def test_bad_generate_arguments_are_user_errors(tiny):
    with pytest.raises(EdgekvError, match="empty prompt"):
        tiny.generate([], max_new_tokens=1)
    with pytest.raises(EdgekvError, match="max_new_tokens"):
        tiny.generate("hi", max_new_tokens=-1)
    with pytest.raises(EdgekvError, match="top_p"):
        tiny.generate("hi", top_p=0.0)


def test_unknown_policy_key_is_an_error_with_a_suggestion(tiny_models):
    with pytest.raises(EdgekvError, match="did you mean 'block_size'"):
        edgekv.load(tiny_models["llama3"], blok_size=16)
    with pytest.raises(EdgekvError, match="kv_bits"):
        Policy(kv_bits=3)
    assert Policy(budget="10 %".replace(" ", "")).budget == "10%"
    assert Policy(budget="all").budget == "all" and Policy(budget="512").budget == 512


def test_update_policy_validates_and_drops_kv_when_the_layout_changes(tiny):
    tiny.generate("hello", max_new_tokens=2)
    assert tiny.cached_ids
    with pytest.raises(EdgekvError):
        tiny.update_policy(prefill_chunk=0)
    tiny.update_policy(prefill_chunk=32)
    assert tiny.cached_ids and tiny.policy.prefill_chunk == 32
    tiny.update_policy(block_size=8)
    assert not tiny.cached_ids and tiny.kv.layout.block_size == 8


def test_update_policy_threads_takes_effect(tiny):
    before = torch.get_num_threads()
    try:
        tiny.update_policy(threads=1)
        assert torch.get_num_threads() == 1 and tiny.policy.threads == 1
        tiny.update_policy(threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_paged_cache_reads_the_same_tokens_through_an_out_of_order_block_table():
    torch.manual_seed(0)
    cache = PagedKVCache(num_layers=1, num_kv_heads=2, head_dim=8, block_size=4,
                         dtype=torch.float32, device=torch.device("cpu"), initial_blocks=2)
    k, v = torch.randn(2, 11, 8), torch.randn(2, 11, 8)
    cache.attend(0, torch.randn(4, 11, 8), k, v)
    cache.commit(11)
    assert cache.capacity_blocks >= 3  # grew past its initial two blocks
    # cut back and shuffle the table by hand: the layout must not matter
    cache.block_table = cache.block_table[::-1]
    slots = cache.block_table
    for i, slot in enumerate(slots):
        n = min(4, 11 - 4 * i)
        cache.k_pool[0][:, slot, :n] = k[:, 4 * i:4 * i + n]
        cache.v_pool[0][:, slot, :n] = v[:, 4 * i:4 * i + n]
    keys, values = cache.keys_values(0)
    assert torch.equal(keys, k) and torch.equal(values, v)
    cache.truncate(5)
    assert cache.length == 5 and len(cache.block_table) == 2
    assert torch.equal(cache.keys_values(0)[0], k[:, :5])
