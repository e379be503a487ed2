"""Reusing a processed document across runs through the persistent document cache.

The prompt is laid out document-first, so the tokens up to the end of the document are
the same whatever the question. `document_prefix` finds that prefix; `warm_prefix` makes
the engine's KV cache hold it — from memory (same engine), from the document cache
(another run), or by prefilling it and saving the result for next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .doccache import DocumentCache, cache_key
from .documents import document_messages


def stable_prefix(engine, messages: list[dict]) -> list[int]:
    """Token ids of `messages` that stay the same whatever text follows in the last message."""
    ids = engine.encode(messages)
    *head, last = messages
    other = engine.encode([*head, {**last, "content": last["content"] + "\u2023 …"}])
    shared = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        shared += 1
    return ids[:shared]


def document_prefix(engine, document: str) -> list[int]:
    """Token ids shared by every prompt about `document`: template header + document."""
    return stable_prefix(engine, document_messages(document, ""))


def layout_tag(engine) -> str:
    """Everything besides model, tokens and block size that decides the cached bytes."""
    p = engine.policy
    dtypes = "-".join(str(t).removeprefix("torch.") for t in (engine.dtype, engine.weight_dtype))
    split = getattr(engine, "recompute_split", None)
    recompute = f"-recompute{split.share:g}x{p.recompute_bits}" if split is not None and split.share else ""
    return f"kv{p.kv_bits}-window{p.recent_window}-{dtypes}{recompute}"


def warm_prefix(engine, cache: DocumentCache, prefix: list[int],
                on_progress: Callable[[int, int], None] | None = None) -> str:
    """Make the engine's KV hold `prefix`; returns "memory", "disk" or "computed"."""
    if engine.cached_ids[: len(prefix)] == prefix and engine.kv.length >= len(prefix):
        return "memory"
    if not engine.kv.persistent:  # the dense reference cache is not kept
        engine.prefill(prefix, on_progress)
        return "computed"
    key = cache_key(model_id=engine.source.identity, token_ids=prefix, codec=layout_tag(engine),
                    block_size=engine.policy.block_size)
    loaded = cache.load(key)
    if loaded is not None:
        state, _meta = loaded
        engine.load_state(prefix, state)
        return "disk"
    engine.prefill(prefix, on_progress)
    cache.save(key, engine.kv.export_state(), {
        "model": engine.model_name, "tokens": len(prefix), "codec": layout_tag(engine),
        "block_size": engine.policy.block_size,
    })
    return "computed"


def fold_warmup(stats: dict, *, source: str, seconds: float, prefix_tokens: int) -> None:
    """Count the prefix warm-up in a generate call's stats (time to first token included).

    stats are updated in place: the warm-up's time joins prefill and TTFT, and a prefix
    computed in this run is not counted as reused.
    """
    stats["document_kv"] = source
    stats["ttft_s"] = round(stats["ttft_s"] + seconds, 6)
    stats["prefill_s"] = round(stats["prefill_s"] + seconds, 6)
    if source == "computed":
        stats["reused_tokens"] = max(0, stats["reused_tokens"] - prefix_tokens)
    prefilled = stats["prompt_tokens"] - stats["reused_tokens"]
    stats["prefill_tok_s"] = round(prefilled / stats["prefill_s"], 3) if stats["prefill_s"] > 0 else 0.0


def ask_about_document(engine, document: str, question: str, *, cache: DocumentCache | None,
                       on_progress: Callable[[int, int], None] | None = None, **generate_kwargs):
    """Generate an answer about `document`, reusing its KV from memory or `cache` if possible.

    Returns the engine's GenerateResult; its stats count the document's warm-up (loading
    or prefilling it) in prefill time and time to first token, and say where the
    document's KV came from (stats["document_kv"]: "memory", "disk" or "computed").
    """
    ids = engine.encode(document_messages(document, question))  # tokenized once, generated from ids
    if cache is None or len(ids) > engine.max_context:  # overlong: generate says why
        return engine.generate(ids, on_progress=on_progress, **generate_kwargs)
    started = time.perf_counter()
    prefix = document_prefix(engine, document)
    source = warm_prefix(engine, cache, prefix, on_progress)
    warm_s = time.perf_counter() - started
    result = engine.generate(ids, on_progress=on_progress, **generate_kwargs)
    fold_warmup(result.stats, source=source, seconds=warm_s, prefix_tokens=len(prefix))
    return result


def process_document(engine, messages: list[dict], cache: DocumentCache,
                     on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Put `messages` (ending with a document) in the KV cache ahead of a question.

    The stable prefix comes from memory, the document cache or a prefill (then saved);
    returns the stats of that work, `document_kv` saying where the KV came from.
    """
    started = time.perf_counter()
    prefix = stable_prefix(engine, messages)
    source = warm_prefix(engine, cache, prefix, on_progress)
    seconds = time.perf_counter() - started
    result = engine.generate(prefix, max_new_tokens=0)
    fold_warmup(result.stats, source=source, seconds=seconds, prefix_tokens=len(prefix))
    return result.stats
