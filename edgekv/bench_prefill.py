"""`edgekv bench prefill`: prefill tok/s over context lengths and chunk sizes, in one run.

For each context, every (configuration, chunk) prefills the same token ids from an empty
cache, one after another, `repeats` rounds in a row; a figure is the fastest round (a
slower round is the same work plus someone else's on a shared machine). Configurations:
edgekv with the exact KV (offload off) and with 4-bit tiers (the default path, which also
compresses finished blocks and reads stored rows back for each later chunk), and
transformers' forward over the whole context at once (its prefill).

What it tells: whether prefill stays linear in the context (the rate at the longest
context over the rate at the shortest: a quadratic attention shows as a collapse), which
chunk is fastest on this machine (`best_chunk`: the highest geometric mean rate over the
contexts), and what the offloaded KV costs a prefill (tiers vs exact, same chunk).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .errors import EdgekvError

CONFIGS = {"exact KV": {"offload": False}, "4-bit tiers": {"kv_bits": 4}}


def prefill_seconds(engine, ids: list[int]) -> float:
    """Seconds for `engine` to prefill `ids` from an empty cache."""
    engine.reset()
    started = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - started


def transformers_seconds(model, ids: list[int]) -> float:
    """Seconds of transformers' forward over `ids` (one pass, its KV cache built)."""
    x = torch.tensor([ids])
    started = time.perf_counter()
    with torch.inference_mode():
        model(x, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started


def best_chunk(rows: list[dict], config: str, chunks: list[int]) -> int:
    """The chunk with the highest geometric mean prefill rate of `config` over the contexts."""
    def score(chunk: int) -> float:
        return sum(math.log(r[f"{config} @{chunk}"]) for r in rows) / len(rows)

    return max(chunks, key=score)


def run_prefill_bench(model: str | None, contexts: list[int], chunks: list[int], *, repeats: int = 2,
                      transformers: bool = True, plot: Path | None = None, threads: int | None = None) -> dict:
    """Time every configuration at every chunk and context (see the module doc); print a
    table and return {"rows": [{context, "<config> @<chunk>": tok/s, "transformers": tok/s}],
    "best_chunk": {config: chunk}, "linearity": {config: rate at longest / rate at shortest}}."""
    from .engine import load
    from .bench_speed import prompt_ids

    if threads:
        torch.set_num_threads(threads)
    if repeats < 1 or not chunks or min(chunks) < 16:
        raise EdgekvError("give --repeats >= 1 and --chunks of at least 16 tokens each, e.g. 256,512,1024")
    engines = {name: load(model, progress=False, **policy) for name, policy in CONFIGS.items()}
    first = next(iter(engines.values()))
    if max(contexts) > first.max_context:
        raise EdgekvError(f"context {max(contexts)} exceeds the model's {first.max_context}: lower --contexts")
    reference = None
    if transformers:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(first.source.folder, dtype=first.dtype).eval()
    print(f"bench prefill: {first.model_name} on {first.device} ({torch.get_num_threads()} threads), "
          f"chunks {', '.join(map(str, chunks))}, best of {repeats} rounds", file=sys.stderr)
    rows = []
    for n in contexts:
        ids = prompt_ids(first.tokenizer, n)
        fastest: dict[str, float] = {}  # seconds, the fastest round
        for _ in range(repeats):
            for name, engine in engines.items():
                for chunk in chunks:
                    engine.update_policy(prefill_chunk=chunk)
                    key = f"{name} @{chunk}"
                    fastest[key] = min(fastest.get(key, math.inf), prefill_seconds(engine, ids))
            if reference is not None:
                fastest["transformers"] = min(fastest.get("transformers", math.inf),
                                              transformers_seconds(reference, ids))
        rows.append({"context": n, **{k: n / s for k, s in fastest.items()}})
        for engine in engines.values():
            engine.reset()
        print(f"  context {n:>6}: done", file=sys.stderr)
    for engine in engines.values():
        engine.close()
    best = {c: best_chunk(rows, c, chunks) for c in CONFIGS}
    report = {"rows": rows, "best_chunk": best,
              "linearity": {c: rows[-1][f"{c} @{best[c]}"] / rows[0][f"{c} @{best[c]}"] for c in CONFIGS}}
    print(format_table(report, chunks))
    if plot:
        write_plot(report, chunks, plot)
        print(f"plot written to {plot}", file=sys.stderr)
    return report


def format_table(report: dict, chunks: list[int]) -> str:
    """Prefill tok/s per context (rows) and configuration @ chunk (columns), then the best
    chunk per configuration, its rate at the longest context over the shortest, and the
    ratio to transformers at the best chunk."""
    rows = report["rows"]
    keys = [k for k in rows[0] if k != "context"]
    head = f"{'context':>8}  " + "  ".join(f"{k:>18}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['context']:>8}  " + "  ".join(f"{r[k]:>18.0f}" for k in keys))
    for config, chunk in report["best_chunk"].items():
        line = (f"{config}: fastest chunk {chunk}; rate at {rows[-1]['context']} tokens / rate at "
                f"{rows[0]['context']}: {report['linearity'][config]:.2f}")
        if "transformers" in rows[0]:
            ratios = ", ".join(f"{r[f'{config} @{chunk}'] / r['transformers']:.2f}x" for r in rows)
            line += f"; vs transformers per context: {ratios}"
        lines.append(line)
    return "\n".join(lines)


def write_plot(report: dict, chunks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    rows = report["rows"]
    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in (k for k in rows[0] if k != "context"):
        style = "--" if key == "transformers" else "-"
        ax.plot(ctx, [r[key] for r in rows], style, marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("prefill tokens / s")
    ax.set_title("prefill rate over context, per chunk size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
