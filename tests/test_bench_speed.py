"""bench speed advances its engines in turns, in one thread, each timed only while it runs."""

from __future__ import annotations

import time

import pytest

from edgekv.bench_speed import edgekv_runner, run_in_turns
from edgekv.config import Policy
from edgekv.engine import Engine
from edgekv.loader import resolve_model


@pytest.fixture(scope="module")
def tiny_source(tiny_models):
    return resolve_model(tiny_models["llama3"])


def _runner(name: str, steps: int, log: list[str]):
    for _ in range(steps):
        log.append(name)
        yield
    return {"steps": steps}


def test_runners_take_turns_of_k_steps_until_each_ends():
    log: list[str] = []
    results = run_in_turns({"a": _runner("a", 5, log), "b": _runner("b", 2, log)}, turn_tokens=2)
    assert log == ["a", "a", "b", "b", "a", "a", "a"]
    assert results == {"a": {"steps": 5}, "b": {"steps": 2}}


def test_a_failing_runner_stops_the_bench_with_its_error():
    def broken():
        yield
        raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError, match="engine failed"):
        run_in_turns({"ok": _runner("ok", 3, []), "broken": broken()}, turn_tokens=1)
    with pytest.raises(ValueError, match="turn_tokens"):
        run_in_turns({}, 0)


def test_an_edgekv_runner_decodes_what_generate_does_and_leaves_out_the_time_between_turns(
        tiny_source, long_text, monkeypatch):
    e = Engine(tiny_source, Policy(block_size=16, offload=False))
    ids = e.encode(long_text[:400])
    expected = e.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    clock = [0.0]

    def perf_counter() -> float:  # a clock that moves 1 us per reading, and 10 s per neighbour turn
        clock[0] += 1e-6
        return clock[0]

    def slow_neighbour():
        for _ in range(6):
            clock[0] += 10.0
            yield
        return {}

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    figures = run_in_turns({"edgekv": edgekv_runner(e, ids, 6), "neighbour": slow_neighbour()}, 1)["edgekv"]
    monkeypatch.undo()
    assert e.cached_ids[len(ids):] == expected[:-1]  # the same greedy tokens went through the cache
    decode_s = 5 / figures["decode_tok_s"]  # 5 decode steps after the prefill's token
    assert decode_s < 1.0  # the neighbour's 60 s, taken between the runner's steps, are not in it
    e.close()
