"""`edgekv bench speed`: prefill and decode speed of edgekv vs transformers, in one run.

Both run the same model files, the same token ids and the same greedy decoding on the
same device and threads. At each context the engines decode in turns of a few tokens
(`run_in_turns`), each timed only while it runs, all in the calling thread: torch's
speed depends on which Python thread calls it (its OpenMP team is per thread; on an idle
2-core machine a decode ran 2x slower in a second thread, under load it ran faster), so
every engine runs under the same threading. On a shared machine the speed drifts by
tens of percent over seconds to minutes; timed one after another, two engines would see
different machines and their ratio would carry that drift.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Generator
from pathlib import Path

import torch

from . import bench_llamacpp as llamacpp
from .bench_baseline import baseline_runner
from .errors import EdgekvError


def parse_contexts(text: str, flag: str = "--contexts") -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 16:
        raise EdgekvError(f"invalid {flag} {text!r}: give comma-separated token counts >= 16, e.g. 1024,4096")
    return values


def prompt_ids(tokenizer, length: int) -> list[int]:
    """`length` token ids of real English text (Python's own pydoc topics, repeated if short)."""
    from .documents import pydoc_text

    ids = tokenizer.encode(pydoc_text(), add_special_tokens=False)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def run_in_turns(runners: dict[str, Generator], turn_tokens: int) -> dict[str, dict]:
    """Advance `runners` (name -> generator: each next() one unit of work, the figures
    as its return value) in turns of `turn_tokens` steps, in this thread, until all end."""
    if turn_tokens < 1:
        raise ValueError("turn_tokens must be >= 1")
    results: dict[str, dict] = {}
    active = dict(runners)
    while active:
        for name, runner in list(active.items()):
            for _ in range(turn_tokens):
                try:
                    next(runner)
                except StopIteration as done:
                    results[name] = done.value
                    del active[name]
                    break
    return results


def transformers_runner(model, ids: list[int], decode_tokens: int) -> Generator[None, None, dict]:
    """Greedy decoding with transformers' model and its DynamicCache, one token per step
    (the first step prefills): what its generate runs per token, without the loop around it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)  # as generate does: no logits for the prompt's other positions
        token = out.logits[0, -1].argmax()
    ttft = time.perf_counter() - start
    decode_s = 0.0
    for _ in range(decode_tokens - 1):
        yield
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
        decode_s += time.perf_counter() - start
    return {"prefill_tok_s": len(ids) / ttft, "ttft_s": ttft,
            "decode_tok_s": (decode_tokens - 1) / decode_s if decode_s > 0 else 0.0}


def edgekv_runner(engine, ids: list[int], decode_tokens: int) -> Generator[None, None, dict]:
    """`Engine.stream` one token per step (the first step prefills), timed only while it runs."""
    engine.reset()
    steps = engine.stream(ids, max_new_tokens=decode_tokens, ignore_eos=True)
    next(steps)  # prefill and the first token
    decode_s = 0.0
    while True:
        yield
        start = time.perf_counter()
        try:
            next(steps)
        except StopIteration as done:
            result = done.value
            break
        finally:
            decode_s += time.perf_counter() - start
    s, steps_run = result.stats, len(result.token_ids) - 1  # the first token comes from the prefill
    out = {"prefill_tok_s": s["prefill_tok_s"], "ttft_s": s["ttft_s"],
           "decode_tok_s": steps_run / decode_s if steps_run > 0 and decode_s > 0 else 0.0}
    if s.get("decode_ms_per_token"):
        out["decode_ms_per_token"] = s["decode_ms_per_token"]
    return out


ENGINES = {"edgekv dense": {"offload": False}, "edgekv 4-bit tiers": {"kv_bits": 4}}


def engine_configs(budgets: list[int | str], weight_bits: list[int] = (),
                   profile_policy: dict | None = None) -> dict[str, dict]:
    """The edgekv configurations timed: dense, 4-bit tiers, and 4-bit tiers at each sparse
    budget; each at every weight width of `weight_bits` (named "… w4"), or at the model's
    own when it is empty; and the policy of a profile ("edgekv profile")."""
    base = dict(ENGINES)
    for budget in budgets:
        if budget != "all":
            base[f"edgekv 4-bit {budget}"] = {"kv_bits": 4, "budget": budget}
    configs = {f"{name} w{bits}": {**policy, "weight_bits": bits} for bits in weight_bits
               for name, policy in base.items()} if weight_bits else base
    if profile_policy:
        configs["edgekv profile"] = dict(profile_policy)
    return configs


def dense_of(name: str, names: list[str]) -> str:
    """The dense configuration a configuration's decode is compared with: the one at the
    same weight width ("edgekv 4-bit 10% w4" -> "edgekv dense w4"), else the first dense."""
    head, _, bits = name.rpartition(" w")
    if head and bits.isdigit() and f"edgekv dense w{bits}" in names:
        return f"edgekv dense w{bits}"
    return "edgekv dense" if "edgekv dense" in names else next(n for n in names if n.startswith("edgekv dense"))


TURN_TOKENS = 2  # decode tokens an engine runs before the next one takes its turn


def run_speed_bench(model: str | None, contexts: list[int], *, decode_tokens: int, plot: Path,
                    threads: int | None, budgets: list[int | str] = (), baseline: str | None = None,
                    weight_bits: list[int] = (), profile_policy: dict | None = None,
                    transformers: bool = True) -> list[dict]:
    """Time transformers and each edgekv configuration at every context, taking turns
    (see the module doc); print ratios to transformers, and of each sparse budget to
    edgekv dense. baseline: a git ref whose edgekv also runs each configuration, in a
    worker process, in the same turns (`edgekv.bench_baseline`). transformers=False
    leaves transformers out (at long contexts its whole-prompt forward is the slowest
    part of the run); the ratios to it are then None."""
    from transformers import AutoModelForCausalLM

    from .engine import load

    if threads:
        torch.set_num_threads(threads)
    configs = engine_configs(budgets, weight_bits, profile_policy)
    engines = {name: load(model, progress=False, **policy) for name, policy in configs.items()}
    worker = None
    if baseline:
        from .bench_baseline import BaselineWorker

        worker = BaselineWorker(baseline, threads=threads or torch.get_num_threads())
        for name, policy in configs.items():
            worker.ask(load=name, policy=policy, model=model)
    ceiling = load(model, progress=False, **ENGINES["edgekv dense"])  # dense over a short context, in turn with the rest
    first = next(iter(engines.values()))
    if max(contexts) + decode_tokens > first.max_context:
        raise EdgekvError(f"context {max(contexts)} + {decode_tokens} decode tokens exceeds the model's {first.max_context}")
    reference = (AutoModelForCausalLM.from_pretrained(first.source.folder, dtype=first.dtype).to(first.device).eval()
                 if transformers else None)
    llm = None
    if llamacpp.available() and (gguf := llamacpp.gguf_file(model)) is not None and first.device.type == "cpu":
        llm = llamacpp.load_llamacpp(gguf, context=max(contexts) + decode_tokens + 64, threads=torch.get_num_threads())
    else:
        print(llamacpp.ABSENT if not llamacpp.available() else "llama.cpp: left out (a GGUF model on the CPU only)",
              file=sys.stderr)
    weights, activations = (str(t).removeprefix("torch.") for t in (first.weight_dtype, first.dtype))
    print(f"bench speed: {first.model_name} on {first.device} ({torch.get_num_threads()} threads), "
          f"{decode_tokens} decode tokens per context, engines taking turns every {TURN_TOKENS}; "
          f"edgekv weights {weights} with {activations} activations"
          + (f", transformers all {activations}" if reference is not None else ", transformers left out"),
          file=sys.stderr)
    short = prompt_ids(first.tokenizer, 64)
    names = [n for name in configs for n in (name, *([f"{name} @{baseline}"] if worker else []))]
    warm_up = {name: edgekv_runner(engine, short, 4) for name, engine in {**engines, "ceiling": ceiling}.items()}
    if worker:
        warm_up.update({f"{name} @{baseline}": baseline_runner(worker, name, short, 4) for name in configs})
    if llm:
        warm_up["llama.cpp"] = llamacpp.llamacpp_runner(llm, short, 4)
    if reference is not None:
        warm_up["transformers"] = transformers_runner(reference, short, 4)
    run_in_turns(warm_up, 1)
    rows = []
    for n in contexts:
        ids = prompt_ids(first.tokenizer, n)
        runners = {"transformers": transformers_runner(reference, ids, decode_tokens)} if reference is not None else {}
        for name, engine in engines.items():
            runners[name] = edgekv_runner(engine, ids, decode_tokens)
            if worker:
                runners[f"{name} @{baseline}"] = baseline_runner(worker, name, ids, decode_tokens)
        if llm:
            runners["llama.cpp"] = llamacpp.llamacpp_runner(llm, ids, decode_tokens)
        # decode over a short context: what a step costs besides long-context attention
        runners["ceiling"] = edgekv_runner(ceiling, short, decode_tokens)
        row = {"context": n, **run_in_turns(runners, TURN_TOKENS)}
        floor_tok_s = row.pop("ceiling")["decode_tok_s"]
        for engine in engines.values():
            engine.reset()  # free this context's KV before the next context
        for name in names:
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[name][key.replace("_tok_s", "_ratio")] = (row[name][key] / row["transformers"][key]
                                                              if reference is not None else None)
            row[name]["decode_vs_dense"] = row[name]["decode_tok_s"] / row[dense_of(name, names)]["decode_tok_s"]
        if llm:
            for name in names:
                row[name]["vs_llamacpp"] = {key: row[name][key] / row["llama.cpp"][key]
                                            for key in ("prefill_tok_s", "decode_tok_s")}
        for name in configs if worker else ():  # this checkout against the baseline, config by config
            old = row[f"{name} @{baseline}"]
            row[name]["vs_baseline"] = {key: row[name][key] / old[key] for key in ("prefill_tok_s", "decode_tok_s")}
        row["short_context_decode_tok_s"] = floor_tok_s
        row["ceiling_vs_dense"] = floor_tok_s / row[dense_of("edgekv dense", names)]["decode_tok_s"]
        rows.append(row)
        print(f"  context {n:>6}: done", file=sys.stderr)
    for engine in (*engines.values(), ceiling):
        engine.close()
    if worker:
        worker.close()
    print(format_table(rows, names))
    write_plot(rows, plot, names)
    print(f"plot written to {plot}", file=sys.stderr)
    return rows


def format_table(rows: list[dict], names: list[str]) -> str:
    """One line per context and engine: tok/s, the ratio to transformers, decode vs edgekv dense,
    and where a decode step's KV time goes (ms per token: select, fetch, attend); then the
    ceiling: dense decode over a 64-token context vs dense at this context (what a step
    costs besides attention bounds what any sparse budget can gain)."""
    head = (f"{'context':>8}  {'engine':<30} {'prefill tok/s':>14} {'x transf.':>10} {'decode tok/s':>13} "
            f"{'x transf.':>10} {'x dense':>8}  kv ms/token")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r.get("transformers")
        if t:
            lines.append(f"{r['context']:>8}  {'transformers':<30} {t['prefill_tok_s']:>14.0f} {'':>10} "
                         f"{t['decode_tok_s']:>13.1f}")
        else:
            lines.append(f"{r['context']:>8}  (transformers left out)")
        if "llama.cpp" in r:
            c = r["llama.cpp"]
            lines.append(f"{'':>8}  {'llama.cpp (same GGUF)':<30} {c['prefill_tok_s']:>14.0f} "
                         f"{_times(c['prefill_tok_s'] / t['prefill_tok_s'] if t else None)} {c['decode_tok_s']:>13.1f} "
                         f"{_times(c['decode_tok_s'] / t['decode_tok_s'] if t else None)}")
        for name in names:
            e = r[name]
            split = e.get("decode_ms_per_token")
            where = "  " + " ".join(f"{k} {v:.1f}" for k, v in split.items()) if split else ""
            for label, key in (("llama.cpp", "vs_llamacpp"), ("baseline", "vs_baseline")):
                if versus := e.get(key):
                    where += f"  vs {label}: prefill {versus['prefill_tok_s']:.2f}x, decode {versus['decode_tok_s']:.2f}x"
            lines.append(f"{'':>8}  {name:<30} {e['prefill_tok_s']:>14.0f} {_times(e['prefill_ratio'])}"
                         f" {e['decode_tok_s']:>13.1f} {_times(e['decode_ratio'])} {e['decode_vs_dense']:>7.2f}x{where}")
        if "ceiling_vs_dense" in r:
            lines.append(f"{'':>8}  {'ceiling':<30} {'':>14} {'':>10} {r['short_context_decode_tok_s']:>13.1f} {'':>10} "
                         f"{r['ceiling_vs_dense']:>7.2f}x  dense decode at a 64-token context: the most any "
                         f"budget can gain here were its attention free")
    return "\n".join(lines)


def _times(ratio: float | None) -> str:
    """A ratio in the table's 10-character column ("—" without transformers)."""
    return f"{ratio:>9.2f}x" if ratio is not None else f"{'—':>10}"


def write_plot(rows: list[dict], path: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    ctx = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for name in (*(n for n in ("transformers", "llama.cpp") if n in rows[0]), *names):
            ax.plot(ctx, [r[name][key] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
