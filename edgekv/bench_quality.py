"""`edgekv bench quality`: what compression (and later sparsity) costs, against dense.

Every configuration runs the same engine path that `generate` runs (offloaded tiers,
codecs); the reference is the dense, exact KV cache (`offload=False`) on the same model
and tokens. Tasks:

- ppl: teacher-forced perplexity of the last N tokens of a long real document (Python's
  pydoc topics), those tokens fed as decode steps; reported as a ratio to the reference.
- agreement: greedy tokens of a summary of a document, compared position by position
  with the reference's (fraction equal, and the length of the identical prefix), and
  teacher-forced: the reference tokens fed back, the share of positions where the
  config's greedy choice is the reference token. With several documents (taken at
  even offsets through the pydoc text) the shares are means and `identical_docs`
  counts the documents whose tokens all match: greedy identity hangs on near-ties
  between the top two logits, so one document says little about a codec. Each first
  difference is reported with the reference's top-two logit margin at that step: a
  small one (a near-tie) means any small change of the logits could have flipped it.
- passkey: a number hidden at several depths of a real-text haystack; the answer must
  contain it (accuracy over trials).
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from .bench_speed import prompt_ids
from .errors import EdgekvError

TASKS = ("ppl", "agreement", "passkey")
NEAR_TIE = 0.25  # logits: a top-two margin below it is counted as a near-tie of the reference


def haystack_text(tokens: int, tokenizer, seed: int) -> str:
    """~`tokens` tokens of pydoc text starting at a seeded offset."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(seed).shuffle(keys)
    text = "\n\n".join(topics[k] for k in keys)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


def passkey_messages(tokenizer, context: int, depth: float, key: int, seed: int) -> list[dict]:
    hay = haystack_text(context - 80, tokenizer, seed)
    cut = int(len(hay) * depth)
    cut = hay.rfind("\n", 0, cut) + 1 if "\n" in hay[:cut] else cut
    needle = f"\nThe secret passkey is {key}. Remember it.\n"
    text = hay[:cut] + needle + hay[cut:]
    return [{"role": "user", "content": text + "\n\nWhat is the secret passkey? Answer with the number only."}]


def run_ppl(engine, ids: list[int], score_tokens: int) -> tuple[float, dict]:
    """Perplexity of the last `score_tokens` tokens, and the selection figures of those steps."""
    engine.reset()
    nll = engine.score(ids, prefill=len(ids) - score_tokens)
    counters = getattr(engine.kv, "counters", None)
    selection = counters.as_stats(score_tokens - 1) if counters is not None else {}
    engine.reset()
    return math.exp(float(nll.mean())), selection


def agreement_documents(tokenizer, doc_tokens: int, count: int) -> list[list[int]]:
    """`count` documents of `doc_tokens` token ids of the pydoc text: the first at its start
    (`prompt_ids`), the others at even offsets through it."""
    from pydoc_data.topics import topics

    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)
    while len(ids) < doc_tokens:
        ids = ids + ids
    step = (len(ids) - doc_tokens) // count
    return [ids[i * step:i * step + doc_tokens] for i in range(count)]


def run_agreements(engine, documents: list[list[int]], new_tokens: int,
                   references: list[dict] | None) -> dict:
    """`run_agreement` over several documents. Without references (the reference run
    itself): `references`, one {"tokens", "margins"} per document. With them: the mean
    shares, the first document's identical prefix, every document's
    (`identical_prefixes`), the reference's top-two logit margin at each first difference
    (`first_difference_margins`, None where identical) and how many documents match in
    full (`identical_docs`)."""
    results = [run_agreement(engine, doc, new_tokens, None if references is None else references[i])
               for i, doc in enumerate(documents)]
    if references is None:
        return {"references": results}
    prefixes = [r["identical_prefix"] for r in results]
    return dict(agreement=sum(r["agreement"] for r in results) / len(results),
                identical_prefix=prefixes[0], identical_prefixes=prefixes,
                first_difference_margins=[ref["margins"][p] if p < len(ref["margins"]) else None
                                          for p, ref in zip(prefixes, references)],
                identical_docs=sum(p == new_tokens for p in prefixes),
                forced_agreement=sum(r["forced_agreement"] for r in results) / len(results))


def run_agreement(engine, doc: list[int], new_tokens: int, reference: dict | None) -> dict:
    """Greedy summary of a document (token ids), against the reference run's when given.

    Without a reference: {"tokens", "margins"}, the greedy tokens and the top-two logit
    margin at each of their steps. With one: agreement: share of positions where the
    free-running greedy tokens equal the reference's (one early difference changes every
    later token); identical_prefix: how many come before the first difference;
    forced_agreement: with the reference tokens fed back (teacher forcing), the share of
    positions where this config's greedy choice is the reference token — each position
    judged on the same prefix.
    """
    text = engine.tokenizer.decode(doc)
    prompt = engine.encode([{"role": "user", "content": text + "\n\nSummarise the text above."}])
    engine.reset()
    tokens = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids
    if reference is None:  # the prompt's KV is reused
        _, margins = engine.score(prompt + tokens, prefill=len(prompt), margin=True)
        engine.reset()
        return {"tokens": tokens, "margins": [round(float(m), 4) for m in margins]}
    same = [a == b for a, b in zip(tokens, reference["tokens"])]
    _, best = engine.score(prompt + reference["tokens"], prefill=len(prompt), argmax=True)  # reuses the prompt's KV
    engine.reset()
    return dict(agreement=sum(same) / len(same),
                identical_prefix=next((i for i, s in enumerate(same) if not s), len(same)),
                forced_agreement=float((best == torch.tensor(reference["tokens"])).float().mean()))


def run_passkey(engine, context: int, trials: int) -> float:
    hits = 0
    for t in range(trials):
        depth = (t % 5) / 4 * 0.9 + 0.05  # 5%, 27.5%, 50%, 72.5%, 95%
        key = random.Random(1000 + t).randint(10000, 99999)
        engine.reset()
        answer = engine.generate(passkey_messages(engine.tokenizer, context, depth, key, seed=t),
                                 max_new_tokens=12).text
        hits += str(key) in re.sub(r"\D", "", answer) or str(key) in answer
    engine.reset()
    return hits / trials


def run_quality_bench(model: str | None, configs: dict[str, dict], *, tasks: list[str], ppl_context: int,
                      score_tokens: int, agreement_doc: int, agreement_tokens: int,
                      passkey_contexts: list[int], passkey_trials: int, plot: Path | None,
                      agreement_docs: int = 4) -> list[dict]:
    """Run each task for the dense reference and every config; print a table, plot, return rows."""
    from .engine import load

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EdgekvError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    reference = load(model, progress=False, offload=False)
    ids = prompt_ids(reference.tokenizer, ppl_context) if "ppl" in tasks else []
    if max(ppl_context, agreement_doc + agreement_tokens + 32, *passkey_contexts) > reference.max_context:
        raise EdgekvError(f"contexts must be <= the model's {reference.max_context} tokens")
    if agreement_docs < 1:
        raise EdgekvError(f"--agreement-docs must be at least 1 (got {agreement_docs})")
    documents = agreement_documents(reference.tokenizer, agreement_doc, agreement_docs) if "agreement" in tasks else []
    rows = []
    all_configs = {"dense": {"offload": False}, **configs}
    ref_ppl = references = None
    for n, (label, policy) in enumerate(all_configs.items()):
        started = time.perf_counter()
        print(f"[{n + 1}/{len(all_configs)}] {label}: {', '.join(tasks)} …", file=sys.stderr, flush=True)
        engine = reference if label == "dense" else load(model, progress=False, **policy)
        row: dict = {"config": label, "policy": policy}
        if "ppl" in tasks:
            row["ppl"], selection = run_ppl(engine, ids, score_tokens)
            ref_ppl = ref_ppl or row["ppl"]
            row["ppl_ratio"] = row["ppl"] / ref_ppl
            row.update({k: v for k, v in selection.items() if v is not None})
        if "agreement" in tasks:
            result = run_agreements(engine, documents, agreement_tokens, references)
            if references is None:  # the dense run is the reference: it agrees with itself
                references = result.pop("references")
                result.update(agreement=1.0, identical_prefix=agreement_tokens, forced_agreement=1.0,
                              identical_prefixes=[agreement_tokens] * len(documents),
                              first_difference_margins=[None] * len(documents),
                              identical_docs=len(documents),
                              near_ties=[sum(m < NEAR_TIE for m in ref["margins"]) for ref in references])
            row.update(result)
        if "passkey" in tasks:
            for context in passkey_contexts:
                row[f"passkey@{context}"] = run_passkey(engine, context, passkey_trials)
        row["seconds"] = round(time.perf_counter() - started, 1)
        if engine is not reference:
            engine.close()
        rows.append(row)
        print("   " + format_row(row), file=sys.stderr, flush=True)
    print(format_table(rows, tasks))
    if plot:
        write_plot(rows, tasks, plot)
        print(f"plot written to {plot}", file=sys.stderr)
    return rows


def format_row(row: dict) -> str:
    parts = [f"{row['config']}"]
    if "ppl" in row:
        parts.append(f"ppl {row['ppl']:.4f} (x{row['ppl_ratio']:.4f})")
    if "agreement" in row:
        parts.append(f"agreement {row['agreement']:.0%} (identical first {row['identical_prefix']}, "
                     f"teacher-forced {row['forced_agreement']:.0%})")
        if "near_ties" in row:
            parts.append(f"steps with a top-two margin below {NEAR_TIE} logits: "
                         f"{', '.join(map(str, row['near_ties']))} per document")
        elif len(row["identical_prefixes"]) > 1 or row["identical_docs"] == 0:
            firsts = [f"{p} (reference margin {m:.2f})" if m is not None else str(p)
                      for p, m in zip(row["identical_prefixes"], row["first_difference_margins"])]
            parts.append(f"identical on {row['identical_docs']} of {len(firsts)} documents "
                         f"(first differences: {', '.join(firsts)})")
    parts += [f"{k} {v:.0%}" for k, v in row.items() if k.startswith("passkey@")]
    if "selected_fraction" in row:
        parts.append(f"blocks attended {row['selected_fraction']:.1%}")
    if "prefetch_hit_rate" in row:
        parts.append(f"prefetch hit rate {row['prefetch_hit_rate']:.1%}")
    return " · ".join(parts) + f" · {row['seconds']} s"


def format_table(rows: list[dict], tasks: list[str]) -> str:
    head = f"{'config':<24}"
    if "ppl" in tasks:
        head += f" {'ppl':>8} {'vs dense':>9}"
    if "agreement" in tasks:
        head += f" {'agree':>6} {'same first':>10} {'forced':>7} {'docs same':>9}"
    passkeys = [k for k in rows[0] if k.startswith("passkey@")]
    head += "".join(f" {k:>13}" for k in passkeys)
    head += f" {'blocks':>7} {'hit rate':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['config']:<24}"
        if "ppl" in tasks:
            line += f" {r['ppl']:>8.4f} {r['ppl_ratio']:>8.4f}x"
        if "agreement" in tasks:
            docs = f"{r['identical_docs']}/{len(r['identical_prefixes'])}"
            line += f" {r['agreement']:>6.0%} {r['identical_prefix']:>10} {r['forced_agreement']:>7.0%} {docs:>9}"
        line += "".join(f" {r[k]:>13.0%}" for k in passkeys)
        line += f" {_share(r.get('selected_fraction')):>7} {_share(r.get('prefetch_hit_rate')):>8}"
        lines.append(line)
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def write_plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    metrics = [m for m in rows[0] if m in ("ppl_ratio", "agreement", "forced_agreement") or m.startswith("passkey@")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    labels = [r["config"] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        ax.bar(labels, [r[metric] for r in rows], color="tab:blue")
        ax.set_title({"ppl_ratio": "perplexity / dense", "agreement": "greedy agreement with dense",
                      "forced_agreement": "teacher-forced greedy agreement"}.get(
            metric, f"passkey accuracy, {metric.removeprefix('passkey@')} tokens"))
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def parse_configs(kv_bits: str, budgets: str, scorers: str = "keys4", head_budgets: str = "auto",
                  **selection: object) -> dict[str, dict]:
    """Configurations to compare: every kv_bits x budget (x scorer x head budget, for
    sparse budgets) combination; `selection` (dense_layers, sink_blocks, speculate)
    applies to all of them."""
    from .config import HEAD_BUDGETS, SCORER_NAMES, Policy, parse_budget

    try:
        bits = [int(b) for b in kv_bits.split(",") if b.strip()]
    except ValueError:
        raise EdgekvError(f"invalid --kv-bits {kv_bits!r}: give a list such as 16,8,4,2") from None
    budget_list = [parse_budget(b.strip()) for b in budgets.split(",") if b.strip()]
    scorer_list = [x.strip() for x in scorers.split(",") if x.strip()]
    for name in scorer_list:
        if name not in SCORER_NAMES:
            raise EdgekvError(f"invalid scorer {name!r}: use one of {', '.join(SCORER_NAMES)}")
    head_list = [x.strip() for x in head_budgets.split(",") if x.strip()]
    for name in head_list:
        if name not in HEAD_BUDGETS:
            raise EdgekvError(f"invalid head budget {name!r}: use one of {', '.join(HEAD_BUDGETS)}")
    extra = {k: v for k, v in selection.items() if v is not None}
    configs = {}
    for b in bits:
        for budget in budget_list:
            sparse = budget != "all"
            for scorer in scorer_list if sparse else scorer_list[:1]:
                for heads in head_list if sparse else head_list[:1]:
                    label = f"{b}-bit"
                    if sparse:
                        label += f", {budget}" + (f", {scorer}" if len(scorer_list) > 1 else "")
                        label += f", {heads} heads" if len(head_list) > 1 else ""
                    configs[label] = {"kv_bits": b, "budget": budget, "scorer": scorer, "head_budget": heads, **extra}
                    Policy.from_kwargs(**configs[label])  # bad values fail before any run
    return configs
