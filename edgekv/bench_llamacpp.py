"""llama.cpp on the same GGUF file, as one more engine of `edgekv bench speed`.

The peer people compare edgekv with: llama.cpp through llama-cpp-python (an optional
extra: ``pip install llama-cpp-python``, which builds llama.cpp from source — about 9
minutes on 2 cores). It runs the very GGUF file edgekv converted its weights from, with
the same threads, its KV cache in f16, greedy decoding on the same token ids, taking
turns with the other engines. Absent, the bench says so and runs without it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator
from pathlib import Path

ABSENT = ("llama.cpp: not installed, left out (pip install llama-cpp-python: it builds llama.cpp from "
          "source, ~9 minutes on 2 cores)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_file(model: str | None) -> Path | None:
    """The GGUF file behind `model` (None: the embedded model's), or None for a folder model."""
    from .loader import embedded_model_file

    if model is None:
        return embedded_model_file()
    path = Path(model).expanduser()
    return path if path.suffix.lower() == ".gguf" else None


def load_llamacpp(path: Path, *, context: int, threads: int):
    """llama.cpp on `path` with room for `context` tokens, f16 KV, `threads` threads."""
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 n_ubatch=512, logits_all=False, verbose=False)


def llamacpp_runner(llm, ids: list[int], decode_tokens: int) -> Generator[None, None, dict]:
    """Greedy decoding with llama.cpp, one token per step (the first step prefills), timed
    like the other engines' runners."""
    import time

    import numpy as np

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return int(logits.argmax())

    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    token = greedy()
    ttft = time.perf_counter() - start
    decode_s = 0.0
    for _ in range(decode_tokens - 1):
        yield
        start = time.perf_counter()
        llm.eval([token])
        token = greedy()
        decode_s += time.perf_counter() - start
    return {"prefill_tok_s": len(ids) / ttft, "ttft_s": ttft,
            "decode_tok_s": (decode_tokens - 1) / decode_s if decode_s > 0 else 0.0}
