"""`edgekv bench quality`: what compression and sparsity cost, against dense.

Every configuration runs the same engine path that `generate` runs (offloaded tiers,
codecs, block selection, the weights' bit width); the reference is the dense, exact KV
cache (`offload=False`) on the same model, with its own weights (weight_bits auto), and
the same tokens. Tasks, in the order they run and are reported:

- kld (the headline measure, as llama.cpp's `--kl-divergence`): several documents of
  real text (Python's pydoc topics at even offsets), each prefilled but for its last M
  tokens, which are fed as decode steps (teacher-forced: the same tokens for every
  configuration). At each step the KL divergence KL(dense || config) of the next-token
  distributions, in nats, computed in float32 from the log-softmax of each, both rounded
  to float16 alike (`stored_logprobs`: a run identical to dense scores exactly 0);
  reported as the mean over all positions of all documents (and per document), its
  median, 99th percentile
  and maximum, top-1 agreement (share of positions where config's and dense's argmax
  agree), the perplexity ratio over the same tokens, and the share of top-1
  disagreements that fall on near-ties of dense (top-two logit margin below NEAR_TIE).
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
- extract: questions about real Python source (standard-library modules, concatenated):
  "what is the default value of parameter P of function F?" and "what does function F
  return?", with F placed at depths 5%..95% of the document; the expected answers come
  from `ast`, so they depend on the running Python's standard library.

passkey and extract at long contexts: with `trials_per_document` above 1, trials share a
document (named passkeys at spread depths of one haystack; questions about functions at
spread depths of one source window) asked one after another with the document first in
the prompt, so its KV is prefilled once per configuration rather than once per trial.
Every configuration is asked the same trials; besides accuracy, the share of trials
answered exactly as dense answered them pairs the two runs trial by trial.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench_speed import prompt_ids
from .documents import pydoc_text
from .errors import EdgekvError

TASKS = ("kld", "ppl", "agreement", "passkey", "extract")
DEFAULT_TASKS = ("kld", "ppl", "agreement")
NEAR_TIE = 0.25  # logits: a top-two margin below it is counted as a near-tie of the reference
DEPTHS = tuple(i / 4 * 0.9 + 0.05 for i in range(5))  # 5%, 27.5%, 50%, 72.5%, 95%: where needles go


def trial_depth(trial: int) -> float:
    """The depth (share of the document before the needle) of a passkey/extract trial."""
    return DEPTHS[trial % len(DEPTHS)]


def haystack_text(tokens: int, tokenizer, seed: int) -> str:
    """The first ~`tokens` tokens of the pydoc text with its topics shuffled by `seed`."""
    ids = tokenizer.encode(pydoc_text(seed), add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


def passkey_messages(tokenizer, context: int, depth: float, key: int, seed: int) -> list[dict]:
    hay = haystack_text(context - 80, tokenizer, seed)
    cut = int(len(hay) * depth)
    cut = hay.rfind("\n", 0, cut) + 1 if "\n" in hay[:cut] else cut
    needle = f"\nThe secret passkey is {key}. Remember it.\n"
    text = hay[:cut] + needle + hay[cut:]
    return [{"role": "user", "content": text + "\n\nWhat is the secret passkey? Answer with the number only."}]


# names of the vaults whose passkeys a shared haystack holds, one per trial of a document
VAULTS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
          "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "aspen", "basalt", "coral", "dune",
          "falcon", "glacier", "heron", "iris", "jasper", "kelp", "lotus", "marble", "nickel", "orchid")


def spread_depths(count: int) -> list[float]:
    """`count` depths evenly from 5% to 95% (one: 50%): where a shared document's needles go."""
    return [0.5] if count == 1 else [0.05 + 0.9 * i / (count - 1) for i in range(count)]


def shared_passkey_document(tokenizer, context: int, keys: list[int], seed: int) -> tuple[str, list[str]]:
    """A haystack of about `context` tokens (room left for a question and the answer)
    holding one needle per key, "The passkey of the NAME vault is KEY.", at
    `spread_depths(len(keys))` of it in order; returns (text, the vault names)."""
    names = list(VAULTS[:len(keys)])
    hay = haystack_text(context - 80 - 20 * len(keys), tokenizer, seed)
    pieces, start = [], 0
    for name, key, depth in zip(names, keys, spread_depths(len(keys))):
        cut = int(len(hay) * depth)
        cut = max(start, hay.rfind("\n", start, cut) + 1 if "\n" in hay[start:cut] else cut)
        pieces += [hay[start:cut], f"\nThe passkey of the {name} vault is {key}. Remember it.\n"]
        start = cut
    return "".join(pieces) + hay[start:], names


def shared_passkey_question(name: str) -> str:
    return f"What is the passkey of the {name} vault? Answer with the number only."


def run_passkey(engine, context: int, trials: int, per_document: int = 1) -> dict:
    """Passkeys hidden in haystacks of about `context` tokens: {"accuracy", "trials"}, each
    trial's {key, answer, depth, hit}.

    per_document 1: a haystack per trial with one needle at `trial_depth(trial)`.
    More: each haystack holds `per_document` named needles (`shared_passkey_document`),
    asked one after another with the document first in the prompt, so its KV is
    prefilled once and reused (`Engine.prefill` keeps the shared prefix)."""
    results = []
    for first in range(0, trials, per_document):
        group = range(first, min(first + per_document, trials))
        keys = [random.Random(1000 + t).randint(10000, 99999) for t in group]
        if per_document == 1:
            depths = [trial_depth(first)]
            prompts = [passkey_messages(engine.tokenizer, context, depths[0], keys[0], seed=first)]
        else:
            text, names = shared_passkey_document(engine.tokenizer, context, keys, seed=first)
            depths = spread_depths(len(keys))
            prompts = [[{"role": "user", "content": f"{text}\n\n{shared_passkey_question(n)}"}] for n in names]
        for key, depth, messages in zip(keys, depths, prompts):  # a named key's answer often restates the name
            answer = engine.generate(messages, max_new_tokens=12 if per_document == 1 else 24, stop=["\n"]).text
            hit = str(key) in re.sub(r"\D", "", answer) or str(key) in answer
            results.append(dict(key=key, answer=answer.strip(), depth=round(depth, 3), hit=bool(hit)))
    return {"accuracy": sum(r["hit"] for r in results) / trials, "trials": results}


def run_ppl(engine, ids: list[int], score_tokens: int) -> tuple[float, dict]:
    """Perplexity of the last `score_tokens` tokens, and the selection figures of those steps."""
    engine.reset()
    nll = engine.score(ids, prefill=len(ids) - score_tokens)
    selection = selection_figures(engine, score_tokens - 1)
    engine.reset()
    return math.exp(float(nll.mean())), selection


SELECTION_KEYS = ("selected_fraction", "prefetch_hit_rate")


def selection_figures(engine, decode_steps: int) -> dict:
    """The selection figures of the cache's last `decode_steps` decode steps that the
    table shows (share of blocks attended, speculation's prefetch hit rate); {} for the
    dense cache, and a figure is left out when it does not apply (None)."""
    stats = engine.kv.decode_stats(decode_steps)
    return {k: stats[k] for k in SELECTION_KEYS if stats.get(k) is not None}


def agreement_documents(tokenizer, doc_tokens: int, count: int) -> list[list[int]]:
    """`count` documents of `doc_tokens` token ids of the pydoc text (`pydoc_text()`): the
    first at its start (as `prompt_ids`), the others at even offsets through it."""
    ids = tokenizer.encode(pydoc_text(), add_special_tokens=False)
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


# ---- kld: how far each next-token distribution moves from dense's --------------------


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats over the last dimension, computed in float32, where P =
    softmax(reference) and Q = softmax(other).

    Either argument may be logits or log-probabilities: both are renormalised with
    log-softmax, so a float16-rounded copy of log-probabilities is a distribution again.
    Tokens P gives no probability add nothing; a token P gives some and Q none makes KL
    infinite; float rounding below zero is clamped to zero. Equal arguments give exactly 0."""
    p_log = torch.log_softmax(reference.float(), dim=-1)
    q_log = torch.log_softmax(other.float(), dim=-1)
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1).clamp_min(0.0)


def stored_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The log-softmax of `logits` rounded to float16, on the CPU: how the kld task keeps
    the reference's distributions, and how it rounds every configuration's before
    comparing (so identical logits give a KL of exactly 0, and the rounding of both
    sides is alike)."""
    return torch.log_softmax(logits.float(), dim=-1).to("cpu", torch.float16)


@dataclass
class KldReference:
    """What the dense run of the kld task keeps, one entry per document: the log-softmax
    of its logits at each scored position (`stored_logprobs`, float16 [tokens, vocab] on
    the CPU: 2 bytes x tokens x vocabulary, e.g. 4 documents x 256 positions x 151,936
    tokens are 311 MB), its greedy choice (int64 [tokens]), its top-two logit margin
    (float32 [tokens], logits) and the NLL of the scored tokens (float32 [tokens], nats)."""

    logprobs: list[torch.Tensor] = field(default_factory=list)
    argmax: list[torch.Tensor] = field(default_factory=list)
    margins: list[torch.Tensor] = field(default_factory=list)
    nll: list[torch.Tensor] = field(default_factory=list)


class _KldStep:
    """`Engine.score`'s on_logits callback for one document: records the reference (when
    `record`) and measures KL and top-1 agreement against it, per scored position."""

    def __init__(self, reference: KldReference, doc: int, tokens: int, record: bool):
        self.reference, self.doc, self.record = reference, doc, record
        self.kl = torch.zeros(tokens)
        self.same = torch.zeros(tokens, dtype=torch.bool)
        if record:
            reference.argmax.append(torch.zeros(tokens, dtype=torch.int64))
            reference.margins.append(torch.zeros(tokens))

    def __call__(self, j: int, logits: torch.Tensor) -> None:
        ref = self.reference
        logprobs = stored_logprobs(logits)
        if self.record:
            if j == 0:
                ref.logprobs.append(torch.empty(len(self.kl), logits.shape[-1], dtype=torch.float16))
            ref.logprobs[self.doc][j] = logprobs
            top2 = logits.float().topk(2).values
            ref.argmax[self.doc][j] = int(logits.argmax())
            ref.margins[self.doc][j] = float(top2[0] - top2[1])
        self.kl[j] = kl_divergence(ref.logprobs[self.doc][j], logprobs)
        self.same[j] = int(logits.argmax()) == int(ref.argmax[self.doc][j])


def run_kld(engine, documents: list[list[int]], tokens: int,
            reference: KldReference | None, reverse: bool = False) -> tuple[dict, KldReference]:
    """Score the last `tokens` tokens of each document (token ids) as decode steps and
    compare every next-token distribution with the reference's.

    Without a reference this run is the reference: it is recorded, and its figures compare
    it with itself (KL 0, top-1 1.0, perplexity ratio 1.0). Returns (figures, reference): see `kld_figures`; the
    figures also carry the selection figures of the scored steps (block share attended,
    prefetch hit rate: means over the documents). `reverse` scores the documents last to
    first (the figures keep the documents' order): an engine whose cache holds the last
    document another configuration scored starts with it, its prefill reused."""
    record = reference is None
    reference = KldReference() if record else reference
    if record and reverse:
        raise EdgekvError("the reference run scores the documents in order")  # pragma: no cover
    count = len(documents)
    kls, agree, nlls, selections = [None] * count, [None] * count, [None] * count, []
    for d in (reversed(range(count)) if reverse else range(count)):
        doc = documents[d]
        step = _KldStep(reference, d, tokens, record)
        nll = engine.score(doc, prefill=len(doc) - tokens, on_logits=step)
        selections.append(selection_figures(engine, tokens - 1))
        if record:
            reference.nll.append(nll)
        kls[d], agree[d], nlls[d] = step.kl, step.same, nll
    figures = kld_figures(kls, agree, nlls, reference)
    for key in SELECTION_KEYS:
        values = [s[key] for s in selections if key in s]
        if values:
            figures[key] = round(sum(values) / len(values), 4)
    return figures, reference


def kld_figures(kls: list[torch.Tensor], agree: list[torch.Tensor], nlls: list[torch.Tensor],
                reference: KldReference) -> dict:
    """The kld task's figures from per-document, per-position values: KL in nats (mean over
    all positions of all documents, per-document means, median, 99th percentile, max),
    top1 (share of positions whose argmax is the reference's), kld_ppl_ratio (perplexity
    over the same tokens / the reference's), top1_disagreements (count) and near_tie_share:
    the share of those disagreements where the reference's top-two logit margin is below
    NEAR_TIE (None without disagreements)."""
    every = torch.cat(kls).double()
    same = torch.cat(agree)
    missed = ~same
    margins = torch.cat(reference.margins)
    ppl = math.exp(float(torch.cat(nlls).double().mean()))
    ref_ppl = math.exp(float(torch.cat(reference.nll).double().mean()))
    return dict(kld_mean=float(every.mean()), kld_p99=float(torch.quantile(every, 0.99)),
                kld_median=float(torch.quantile(every, 0.5)), kld_max=float(every.max()),
                kld_doc_means=[float(k.double().mean()) for k in kls],
                top1=float(same.double().mean()), top1_disagreements=int(missed.sum()),
                near_tie_share=float((margins[missed] < NEAR_TIE).double().mean()) if missed.any() else None,
                kld_ppl=ppl, kld_ppl_ratio=ppl / ref_ppl, kld_positions=every.numel())


# ---- extract: questions about real Python source at chosen depths ----------------------

# Standard-library modules concatenated into the source the questions are about; a
# document is a window of it, and a context as long as the whole is refused, so a window
# never wraps onto itself.
EXTRACT_MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "configparser", "pathlib",
                   "shutil", "tempfile", "calendar", "ftplib", "gzip", "bz2", "lzma", "cmd", "email.utils",
                   "difflib", "tarfile", "zipfile", "inspect", "pydoc")
EXTRACT_KINDS = ("default", "return")  # the question kinds there are
# what the task asks by default: a "return" question is often answered by a small model
# with a description of the value instead of the returned name, so it measures the model
# more than the KV cache; ask for it with extract_kinds=("default", "return")
# (`--extract-kinds default,return`)
EXTRACT_DEFAULT_KINDS = ("default",)
EXTRACT_ANSWER_TOKENS = 40  # most tokens generated per answer (it ends at its first line break)


@dataclass(frozen=True)
class ExtractQuestion:
    """One question about a function of the source corpus.

    kind "default": what is the default of `parameter`; `answer` is the literal as
    `ast.unparse` writes it (a number or a short string: None, booleans and empty strings
    are left out, a guess would hit them too often). kind "return": what the function's
    only `return` returns; `answer` is a name or dotted name (not `self`).
    `first_line`: the corpus line index of the `def`; `last_line`: the last line a
    document must hold for the question to be answerable (the signature's for
    "default", the function's for "return")."""

    kind: str
    function: str
    parameter: str | None
    answer: str
    first_line: int
    last_line: int

    @property
    def text(self) -> str:
        if self.kind == "default":
            return (f"In the code above, what is the default value of the parameter `{self.parameter}` "
                    f"of the function `{self.function}`? Answer with the value only.")
        return (f"In the code above, what does the function `{self.function}` return? "
                f"Quote its return statement exactly as written in the code.")


@dataclass
class SourceCorpus:
    """The modules' source as lines (each ending in a newline, one `# ---- module NAME ----`
    line before each module), the tokens of each line (encoded alone: their sum is above
    the whole's, by a share that depends on the tokenizer; `extract_messages` makes up for
    it),
    and the questions by kind."""

    lines: list[str]
    tokens: list[int]
    questions: dict[str, list[ExtractQuestion]]

    def span_tokens(self, question: ExtractQuestion) -> int:
        """Tokens from the asked function's `def` line through the question's last line."""
        return sum(self.tokens[question.first_line:question.last_line + 1])


def source_corpus(tokenizer, modules: tuple[str, ...] = EXTRACT_MODULES) -> SourceCorpus:
    """Concatenate the modules' source (`inspect.getsource`) and find the questions: the
    functions (and methods) whose name is defined once in the whole corpus, with a
    literal default (kind "default", one question per such parameter) or a single
    `return NAME` / `return a.b` (kind "return", functions of at most 30 lines)."""
    lines: list[str] = []
    trees = []
    for name in modules:
        source = inspect.getsource(importlib.import_module(name))
        lines.append(f"# ---- module {name} ----\n")
        trees.append((ast.parse(source), len(lines)))  # the corpus index of the module's line 1
        lines.extend(line + "\n" for line in source.removesuffix("\n").split("\n"))
    functions = [(node, offset) for tree, offset in trees for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    defined: dict[str, int] = {}
    for node, _ in functions:
        defined[node.name] = defined.get(node.name, 0) + 1
    questions: dict[str, list[ExtractQuestion]] = {kind: [] for kind in EXTRACT_KINDS}
    for node, offset in functions:
        if defined[node.name] == 1:
            for q in _questions_about(node, offset):
                questions[q.kind].append(q)
    tokens = [len(tokenizer.encode(line, add_special_tokens=False)) or 1 for line in lines]
    return SourceCorpus(lines=lines, tokens=tokens, questions=questions)


def _questions_about(node: ast.FunctionDef | ast.AsyncFunctionDef, offset: int) -> list[ExtractQuestion]:
    first = offset + node.lineno - 1
    signature_last = offset + max(node.lineno, node.body[0].lineno - 1) - 1
    args = node.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    found = [ExtractQuestion("default", node.name, arg.arg, literal, first, signature_last)
             for arg, default in pairs if (literal := _telling_literal(default)) is not None]
    if (returned := _single_return(node)) is not None:
        found.append(ExtractQuestion("return", node.name, None, returned, first, offset + node.end_lineno - 1))
    return found


def _telling_literal(node: ast.expr) -> str | None:
    """A default worth asking about, as source: a number (possibly negative) or a short
    one-line string with something visible in it; None for anything else."""
    inner = node.operand if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else node
    if not isinstance(inner, ast.Constant) or isinstance(inner.value, bool):
        return None
    value = inner.value
    if isinstance(value, (int, float)):
        return ast.unparse(node)
    if isinstance(value, str) and inner is node and 0 < len(value) <= 20 and value.isprintable() and value.strip():
        return ast.unparse(node)
    return None


def _single_return(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The expression of a function's only `return`, when it is a name or a dotted name
    of 3 to 40 characters (not `self`, not the function's own name: `s` would be found in
    "it's") and the function is short (< 30 lines) with no nested function, class,
    lambda or yield."""
    inner = [n for n in ast.walk(node) if n is not node]
    if node.end_lineno - node.lineno >= 30 or any(
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Yield, ast.YieldFrom))
            for n in inner):
        return None
    returns = [n for n in inner if isinstance(n, ast.Return)]
    if len(returns) != 1 or not _dotted_name(returns[0].value):
        return None
    text = ast.unparse(returns[0].value)
    return None if text in ("self", node.name) or not 3 <= len(text) <= 40 else text


def _dotted_name(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Name):
        return True
    return isinstance(node, ast.Attribute) and _dotted_name(node.value)


def answer_matches(answer: str, expected: str) -> bool:
    """Whether a model's answer states `expected` (a literal or dotted name as
    `ast.unparse` writes it) as a whole token.

    "The default is `None`." states None; "10" does not state 0, nor does "0.5", "-1" or
    "0x"; "self.result" and "result_list" do not state result. A string literal may come
    in any quotes (', ", `), or bare when it has two or more characters and a letter or
    digit ("utf-8" for 'utf-8', but not r for 'r'). A plain lowercase word (`next`,
    `result`, 'strict') counts only quoted, in backticks, as the whole answer or after
    `return ` (a quoted return statement): "returns the next header" describes, it does
    not state `next`."""
    variants = [expected]
    try:
        value = ast.literal_eval(expected)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, str):
        variants += [f"'{value}'", f'"{value}"', f"`{value}`"]
        if len(value) >= 2 and any(c.isalnum() for c in value):
            variants.append(value)
    whole = answer.strip().rstrip(".").strip().strip("`'\"")
    for v in variants:
        if re.fullmatch(r"[a-z]+", v):  # an English word as well: only marked, alone or returned
            if (whole == v or any(f"{q}{v}{q}" in answer for q in "`'\"")
                    or re.search(rf"\breturn {v}(?!\w|\.\w)", answer)):
                return True
        elif re.search(rf"(?<![\w.\-]){re.escape(v)}(?!\w|\.\w)", answer):
            return True
    return False


def extract_question(corpus: SourceCorpus, trial: int, source_tokens: int,
                     kinds: tuple[str, ...] = EXTRACT_DEFAULT_KINDS) -> ExtractQuestion:
    """The question of trial `trial` (the same at every context where it fits): the
    `kinds` alternate; among the questions whose asked span takes at most a quarter of the
    `source_tokens` the document holds, an answer is drawn first (seeded by the trial,
    each distinct answer alike), then a question with that answer. Drawn by question, a
    third of the defaults would be 0: a model answering 0 every time would score that."""
    kind = kinds[trial % len(kinds)]
    fits = [q for q in corpus.questions[kind] if corpus.span_tokens(q) <= source_tokens // 4]
    if not fits:
        raise EdgekvError(f"no {kind!r} question fits a document of {source_tokens} tokens of source: "
                          f"use a longer --extract-contexts")
    rng = random.Random(3000 + trial)
    answer = rng.choice(sorted({q.answer for q in fits}))
    return rng.choice([q for q in fits if q.answer == answer])


def _extract_messages(code: str, question: ExtractQuestion) -> list[dict]:
    return [{"role": "user", "content": "Here is Python source code from the standard library.\n\n"
                                        f"```python\n{code}```\n\n{question.text}"}]


def _source_window(corpus: SourceCorpus, question: ExtractQuestion, budget: int, depth: float) -> tuple[str, float]:
    """Consecutive corpus lines (wrapping round its end) of at most `budget` tokens, the
    asked function's `def` line at `depth` of them, or earlier when its asked span would
    not fit after it; returns (text, the def line's depth in tokens)."""
    n, tok = len(corpus.lines), corpus.tokens
    goal = min(round(depth * budget), budget - corpus.span_tokens(question))
    start, before = question.first_line, 0
    while before + tok[(start - 1) % n] <= goal:
        start -= 1
        before += tok[start % n]
    end, total = question.first_line, before
    while total + tok[end % n] <= budget:
        total += tok[end % n]
        end += 1
    return "".join(corpus.lines[i % n] for i in range(start, end)), before / max(total, 1)


def extract_messages(encode, corpus: SourceCorpus, question: ExtractQuestion, context: int,
                     depth: float) -> tuple[list[dict], float]:
    """The chat messages of one extraction trial: source lines around the asked function
    (its `def` at `depth`), then the question; with EXTRACT_ANSWER_TOKENS of answer they
    fill `context` tokens to within 2% (never past it). `encode(messages) -> token ids`
    applies the model's chat template (`Engine.encode`). Returns (messages, the def
    line's depth)."""
    target = context - EXTRACT_ANSWER_TOKENS
    budget = target - len(encode(_extract_messages("", question)))
    best = None
    for _ in range(6):  # lines encoded alone count more tokens than the whole has: adjust
        code, placed = _source_window(corpus, question, budget, depth)
        messages = _extract_messages(code, question)
        total = len(encode(messages))
        if total > target:
            budget -= total - target + 8
            continue
        best = messages, placed
        if total >= target - context // 50:
            break
        budget += target - total
    if best is None:
        raise EdgekvError(f"cannot fit an extraction document into {context} tokens")  # pragma: no cover
    return best


def shared_extract_document(encode, corpus: SourceCorpus, context: int, count: int,
                            kinds: tuple[str, ...], seed: int) -> tuple[str, list[tuple[ExtractQuestion, float]]]:
    """One window of the corpus (consecutive lines, never wrapping) and `count` questions
    about functions inside it, their `def` lines as near as the source allows to
    `spread_depths(count)` of it, the kinds alternating, an answer drawn before a question
    (as `extract_question`) among the functions near each depth, no question twice. Of up
    to 400 windows (starts drawn by `seed`) holding enough questions of each kind, the
    one whose picks come nearest their depths (mean distance). With the longest question
    and EXTRACT_ANSWER_TOKENS of answer every prompt fits `context` tokens. Returns (the
    code, [(question, the def line's depth in tokens)])."""
    n, tok = len(corpus.lines), corpus.tokens
    after = [0] * (n + 1)  # tokens from line i to the corpus's end
    for i in range(n - 1, -1, -1):
        after[i] = after[i + 1] + tok[i]
    wanted = {kind: len(range(k, count, len(kinds))) for k, kind in enumerate(kinds)}

    def window(start: int, budget: int) -> tuple[int, list[tuple[ExtractQuestion, float]] | None]:
        """(end line, the picks with their depths; None when too few questions fit)."""
        end, total = start, 0
        while end < n and total + tok[end] <= budget:
            total += tok[end]
            end += 1
        inside = {kind: [q for q in corpus.questions[kind] if start <= q.first_line and q.last_line < end]
                  for kind in kinds}
        if any(len(inside[k]) < wanted[k] for k in kinds):
            return end, None
        before = [0] * (end - start + 1)
        for i in range(start, end):
            before[i - start + 1] = before[i - start] + tok[i]
        picks, used, rng = [], set(), random.Random(6000 + seed)
        for i, depth in enumerate(spread_depths(count)):
            free = [q for q in inside[kinds[i % len(kinds)]] if q not in used]
            near = sorted(free, key=lambda q: abs(before[q.first_line - start] / total - depth))
            pool = [q for q in near if abs(before[q.first_line - start] / total - depth) <= 0.45 / count] or near[:1]
            answer = rng.choice(sorted({q.answer for q in pool}))
            question = rng.choice([q for q in pool if q.answer == answer])
            used.add(question)
            picks.append((question, before[question.first_line - start] / total))
        return end, picks

    def miss(picks) -> float:
        return sum(abs(d - goal) for (_, d), goal in zip(picks, spread_depths(count))) / count

    budget = context - EXTRACT_ANSWER_TOKENS - 200
    starts = [i for i in range(n) if after[i] >= context]
    random.Random(5000 + seed).shuffle(starts)
    found = [(miss(picks), start) for start in starts[:400] if (picks := window(start, budget)[1]) is not None]
    if not found:
        raise EdgekvError(f"no window of {context} tokens of the source holds {count} questions: "
                          f"use fewer --trials-per-document or a longer context")
    start = min(found)[1]
    for _ in range(6):  # lines encoded alone count more tokens than the whole has: adjust
        end, picks = window(start, budget)
        code = "".join(corpus.lines[start:end])
        longest = max(len(encode(_extract_messages(code, q))) for q, _ in picks) + EXTRACT_ANSWER_TOKENS
        if longest > context:
            budget -= longest - context + 8
            continue
        if longest >= context - context // 50:
            break
        budget += context - longest
    if longest > context:
        raise EdgekvError(f"cannot fit an extraction document into {context} tokens")  # pragma: no cover
    return code, picks


def run_extract(engine, corpus: SourceCorpus, context: int, trials: int,
                kinds: tuple[str, ...] = EXTRACT_DEFAULT_KINDS, per_document: int = 1) -> dict:
    """Greedy answers to `trials` extraction questions (of the `kinds`, alternating) in
    documents of about `context` tokens: accuracy overall and per kind, and each trial's
    {kind, function, parameter, expected, answer, depth, hit}.

    per_document 1: a document per question, depths cycling 5%..95%. More: each document
    (`shared_extract_document`) is asked `per_document` questions spread over its depths,
    the source first in the prompt, so its KV is prefilled once and reused."""
    results = []
    source_tokens = context - 200  # a safe lower bound of what the window holds, for drawing questions
    for first in range(0, trials, per_document):
        group = range(first, min(first + per_document, trials))
        if per_document == 1:
            question = extract_question(corpus, first, source_tokens, kinds)
            asked = [extract_messages(engine.encode, corpus, question, context, trial_depth(first)) + (question,)]
        else:
            code, picks = shared_extract_document(engine.encode, corpus, context, len(group), kinds, seed=first)
            asked = [(_extract_messages(code, q), depth, q) for q, depth in picks]
        for messages, depth, question in asked:
            answer = engine.generate(messages, max_new_tokens=EXTRACT_ANSWER_TOKENS, stop=["\n"]).text
            results.append(dict(kind=question.kind, function=question.function, parameter=question.parameter,
                                expected=question.answer, answer=answer.strip(), depth=round(depth, 3),
                                hit=answer_matches(answer, question.answer)))
    figures = {"accuracy": sum(r["hit"] for r in results) / trials, "trials": results}
    for kind in kinds:
        hits = [r["hit"] for r in results if r["kind"] == kind]
        figures[kind] = sum(hits) / len(hits) if hits else None
    return figures


# ---- the bench ------------------------------------------------------------------------


def check_options(tasks: list[str], *, kld_docs: int, kld_context: int, kld_tokens: int, agreement_docs: int,
                  passkey_contexts: list[int], passkey_trials: int, extract_contexts: list[int],
                  extract_trials: int, extract_kinds: tuple[str, ...] = EXTRACT_DEFAULT_KINDS,
                  trials_per_document: int = 1) -> None:
    """Reject bad options before any model loads: one EdgekvError naming the option."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EdgekvError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    if not tasks:
        raise EdgekvError(f"no task given: choose from {', '.join(TASKS)}")
    if "kld" in tasks:
        if kld_docs < 1:
            raise EdgekvError(f"--kld-docs must be at least 1 (got {kld_docs})")
        if not 0 < kld_tokens < kld_context:
            raise EdgekvError(f"--kld-tokens must be at least 1 and below --kld-context {kld_context} "
                              f"(got {kld_tokens})")
    if "agreement" in tasks and agreement_docs < 1:
        raise EdgekvError(f"--agreement-docs must be at least 1 (got {agreement_docs})")
    if "passkey" in tasks and (passkey_trials < 1 or not passkey_contexts):
        raise EdgekvError(f"passkey needs --passkey-trials >= 1 (got {passkey_trials}) and a --passkey-context")
    if "extract" in tasks:
        if extract_trials < 1:
            raise EdgekvError(f"--extract-trials must be at least 1 (got {extract_trials})")
        if not extract_contexts or min(extract_contexts) < 256:
            raise EdgekvError(f"--extract-contexts needs token counts >= 256 (got {extract_contexts})")
        if not extract_kinds or set(extract_kinds) - set(EXTRACT_KINDS):
            raise EdgekvError(f"--extract-kinds must be some of {', '.join(EXTRACT_KINDS)} "
                              f"(got {', '.join(extract_kinds)})")
    if not 1 <= trials_per_document <= len(VAULTS):
        raise EdgekvError(f"--trials-per-document must be 1 to {len(VAULTS)} (got {trials_per_document})")


def run_quality_bench(model: str | None, configs: dict[str, dict], *, tasks: list[str] = DEFAULT_TASKS,
                      ppl_context: int = 8192, score_tokens: int = 512, agreement_doc: int = 1024,
                      agreement_tokens: int = 64, passkey_contexts: list[int] = (4096,), passkey_trials: int = 25,
                      plot: Path | None = None, agreement_docs: int = 4, kld_docs: int = 4, kld_context: int = 8192,
                      kld_tokens: int = 256, extract_contexts: list[int] = (4096,),
                      extract_trials: int = 25, extract_kinds: tuple[str, ...] = EXTRACT_DEFAULT_KINDS,
                      trials_per_document: int = 1) -> list[dict]:
    """Run each task for the dense reference and every config; print a table, plot, return rows.

    kld: `kld_docs` documents of `kld_context` tokens, the last `kld_tokens` of each scored
    as decode steps. extract: `extract_trials` questions (of `extract_kinds`, alternating)
    at each of `extract_contexts` (tokens). passkey and extract: `trials_per_document`
    trials share one document (its KV prefilled once per configuration). The module
    docstring describes every task.

    A configuration that differs from the one before only in selection keys (budget,
    scorer knobs: not the KV layout nor the weights) reuses its engine through
    `Engine.update_policy`, and with it the KV of the documents that engine last held
    (prefill does not depend on those keys)."""
    from .engine import load

    tasks = list(tasks)
    passkey_contexts, extract_contexts = list(passkey_contexts), list(extract_contexts)
    check_options(tasks, kld_docs=kld_docs, kld_context=kld_context, kld_tokens=kld_tokens,
                  agreement_docs=agreement_docs, passkey_contexts=passkey_contexts, passkey_trials=passkey_trials,
                  extract_contexts=extract_contexts, extract_trials=extract_trials, extract_kinds=tuple(extract_kinds),
                  trials_per_document=trials_per_document)
    reference = load(model, progress=False, offload=False)
    needed = {"kld": [("--kld-context", kld_context)], "ppl": [("--ppl-context", ppl_context)],
              "agreement": [("--agreement-doc + --agreement-tokens + 32", agreement_doc + agreement_tokens + 32)],
              "passkey": [("--passkey-context", c) for c in passkey_contexts],
              "extract": [("--extract-contexts", c) for c in extract_contexts]}
    for task in tasks:
        for option, tokens in needed[task]:
            if tokens > reference.max_context:
                raise EdgekvError(f"{option} {tokens} exceeds the model's context of {reference.max_context} tokens")
    tok = reference.tokenizer
    ids = prompt_ids(tok, ppl_context) if "ppl" in tasks else []
    documents = agreement_documents(tok, agreement_doc, agreement_docs) if "agreement" in tasks else []
    kld_docs_ids = agreement_documents(tok, kld_context, kld_docs) if "kld" in tasks else []
    corpus = source_corpus(tok) if "extract" in tasks else None
    if corpus is not None and sum(corpus.tokens) <= max(extract_contexts):
        raise EdgekvError(f"the source corpus has {sum(corpus.tokens)} tokens: --extract-contexts must be below that")
    rows = []
    all_configs = {"dense": {"offload": False}, **configs}
    ref_ppl = references = kld_reference = None
    engine = previous = None
    reverse = False  # whether the last kld run scored its documents last to first
    dense_trials: dict[str, list[dict]] = {}  # the dense answers of passkey and extract, by task@context
    for n, (label, policy) in enumerate(all_configs.items()):
        started = time.perf_counter()
        print(f"[{n + 1}/{len(all_configs)}] {label}: {', '.join(tasks)} …", file=sys.stderr, flush=True)
        changes = selection_changes(previous, policy) if engine is not None and engine is not reference else None
        if label == "dense":
            engine = reference
        elif changes is not None:
            engine.update_policy(**changes)
        else:
            if engine is not None and engine is not reference:
                engine.close()
            engine = load(model, progress=False, **policy)
        previous = policy
        row: dict = {"config": label, "policy": policy}
        if "kld" in tasks:
            reverse = changes is not None and not reverse  # start with the document the cache holds
            figures, kld_reference = run_kld(engine, kld_docs_ids, kld_tokens, kld_reference, reverse)
            if engine is reference:
                figures["near_tie_positions"] = sum(int((m < NEAR_TIE).sum()) for m in kld_reference.margins)
            row.update(figures)
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
                result = run_passkey(engine, context, passkey_trials, trials_per_document)
                row[f"passkey@{context}"] = result["accuracy"]
                row[f"passkey_trials@{context}"] = result["trials"]
                row[f"passkey_same@{context}"] = same_answers(result["trials"], dense_trials, f"passkey@{context}")
        if "extract" in tasks:
            for context in extract_contexts:
                result = run_extract(engine, corpus, context, extract_trials, extract_kinds, trials_per_document)
                row[f"extract@{context}"] = result["accuracy"]
                for kind in extract_kinds:
                    row[f"extract_{kind}@{context}"] = result[kind]
                row[f"extract_trials@{context}"] = result["trials"]
                row[f"extract_same@{context}"] = same_answers(result["trials"], dense_trials, f"extract@{context}")
        row["seconds"] = round(time.perf_counter() - started, 1)
        if engine is reference:
            reference.reset()  # its KV is not needed again
        rows.append(row)
        print("   " + format_row(row), file=sys.stderr, flush=True)
    if engine is not reference:
        engine.close()
    reference.close()
    print(format_table(rows, tasks))
    if plot:
        write_plot(rows, tasks, plot)
        print(f"plot written to {plot}", file=sys.stderr)
    return rows


def same_answers(trials: list[dict], dense_trials: dict[str, list[dict]], key: str) -> float:
    """The share of `trials` whose answer is dense's answer to the same trial (the dense
    run records its own, and scores 1.0): a paired figure, where accuracy alone hides
    which trials moved."""
    reference = dense_trials.setdefault(key, trials)
    return sum(a["answer"] == b["answer"] for a, b in zip(trials, reference)) / len(trials)


# policy keys an engine takes through `Engine.update_policy` keeping its KV
SELECTION_POLICY_KEYS = ("budget", "sink_blocks", "dense_layers", "speculate", "head_budget")


def selection_changes(before: dict, after: dict) -> dict | None:
    """The policy changes from config `before` to `after` (both as given to `load`) when
    they are all selection keys, else None (the next config needs an engine of its own)."""
    from .config import Policy

    defaults = Policy()
    keys = set(before) | set(after)
    changed = {k: after.get(k, getattr(defaults, k)) for k in keys
               if before.get(k, getattr(defaults, k)) != after.get(k, getattr(defaults, k))}
    return changed if set(changed) <= set(SELECTION_POLICY_KEYS) else None


def _is_accuracy(key: str) -> bool:
    """Row keys that hold an accuracy per context: passkey@N and extract@N."""
    return key.startswith(("passkey@", "extract@"))


def format_row(row: dict) -> str:
    parts = [f"{row['config']}"]
    if "kld_mean" in row:
        docs = ", ".join(f"{k:.6f}" for k in row["kld_doc_means"])
        parts.append(f"KLD mean {row['kld_mean']:.6f} nats (per document {docs}), median {row['kld_median']:.6f}, "
                     f"p99 {row['kld_p99']:.6f}, max {row['kld_max']:.6f} · top-1 {row['top1']:.2%} · "
                     f"ppl x{row['kld_ppl_ratio']:.4f} over the same tokens")
        if row["near_tie_share"] is not None:
            parts.append(f"{row['top1_disagreements']} top-1 differences, {row['near_tie_share']:.0%} "
                         f"at dense margins below {NEAR_TIE}")
        if "near_tie_positions" in row:
            parts.append(f"{row['near_tie_positions']} of {row['kld_positions']} positions have a top-two "
                         f"margin below {NEAR_TIE} logits")
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
    for key, value in row.items():
        if key.startswith("passkey@"):
            context = key.removeprefix("passkey@")
            parts.append(f"{key} {value:.0%} (answers as dense's: {row[f'passkey_same@{context}']:.0%})")
        elif key.startswith("extract@"):
            context = key.removeprefix("extract@")
            kinds = ", ".join(f"{kind} {_share(row[f'extract_{kind}@{context}'], 0)}" for kind in EXTRACT_KINDS
                              if f"extract_{kind}@{context}" in row)
            parts.append(f"{key} {value:.0%} ({kinds}; answers as dense's: {row[f'extract_same@{context}']:.0%})")
    if "selected_fraction" in row:
        parts.append(f"blocks attended {row['selected_fraction']:.1%}")
    if "prefetch_hit_rate" in row:
        parts.append(f"prefetch hit rate {row['prefetch_hit_rate']:.1%}")
    return " · ".join(parts) + f" · {row['seconds']} s"


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """KLD and top-1 first (the headline), then the other tasks' columns."""
    head = f"{'config':<24}"
    if "kld" in tasks:
        head += f" {'KLD mean':>9} {'p99':>9} {'median':>9} {'max':>9} {'top-1':>7} {'ppl x':>7} {'ties':>5}"
    if "ppl" in tasks:
        head += f" {'ppl':>8} {'vs dense':>9}"
    if "agreement" in tasks:
        head += f" {'agree':>6} {'same first':>10} {'forced':>7} {'docs same':>9}"
    accuracies = [k for k in rows[0] if _is_accuracy(k)]
    head += "".join(f" {k:>13} {'=dense':>6}" for k in accuracies)
    head += f" {'blocks':>7} {'hit rate':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['config']:<24}"
        if "kld" in tasks:
            line += "".join(f" {r[k]:>9.6f}" for k in ("kld_mean", "kld_p99", "kld_median", "kld_max"))
            line += f" {r['top1']:>7.2%} {r['kld_ppl_ratio']:>7.4f} {_share(r['near_tie_share'], 0):>5}"
        if "ppl" in tasks:
            line += f" {r['ppl']:>8.4f} {r['ppl_ratio']:>8.4f}x"
        if "agreement" in tasks:
            docs = f"{r['identical_docs']}/{len(r['identical_prefixes'])}"
            line += f" {r['agreement']:>6.0%} {r['identical_prefix']:>10} {r['forced_agreement']:>7.0%} {docs:>9}"
        line += "".join(f" {r[k]:>13.0%} {r[k.replace('@', '_same@')]:>6.0%}" for k in accuracies)
        line += f" {_share(r.get('selected_fraction')):>7} {_share(r.get('prefetch_hit_rate')):>8}"
        lines.append(line)
    if "kld" in tasks:
        lines.append(f"KLD: KL(dense || config) in nats per scored position; top-1: argmax equal to dense's; "
                     f"ppl x: perplexity / dense's over the same tokens; ties: share of top-1 differences "
                     f"where dense's top-two margin is below {NEAR_TIE} logits")
    if accuracies:
        lines.append("=dense: share of trials answered exactly as dense answered them")
    return "\n".join(lines)


def _share(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}%}"


PLOT_TITLES = {"kld_mean": "mean KL(dense || config), nats (p99 hatched)", "top1": "top-1 agreement with dense",
               "ppl_ratio": "perplexity / dense", "agreement": "greedy agreement with dense",
               "forced_agreement": "teacher-forced greedy agreement"}


def write_plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    """One panel per figure, KLD (log scale, mean and p99) and top-1 first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    metrics = [m for m in PLOT_TITLES if m in rows[0]] + [k for k in rows[0] if _is_accuracy(k)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    labels = [r["config"] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        if metric == "kld_mean":
            compared = [r for r in rows if r["config"] != "dense"] or rows
            x = range(len(compared))
            ax.bar([i - 0.2 for i in x], [r["kld_mean"] for r in compared], width=0.4, color="tab:blue", label="mean")
            ax.bar([i + 0.2 for i in x], [r["kld_p99"] for r in compared], width=0.4, color="tab:blue",
                   hatch="//", alpha=0.5, label="p99")
            ax.set_xticks(list(x), [r["config"] for r in compared])
            if all(r["kld_mean"] > 0 for r in compared):  # configs span decades of KLD
                ax.set_yscale("log")
                ax.set_ylim(min(r["kld_mean"] for r in compared) / 4, max(r["kld_p99"] for r in compared) * 2)
            ax.legend()
        else:
            ax.bar(labels, [r[metric] for r in rows], color="tab:blue")
            if metric != "ppl_ratio":  # shares
                ax.set_ylim(0, 1.02)
        kind, _, context = metric.partition("@")
        ax.set_title(PLOT_TITLES.get(metric) or f"{kind} accuracy, {context} tokens")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def parse_configs(kv_bits: str, budgets: str, scorers: str = "keys4", head_budgets: str = "auto",
                  weight_bits: str = "auto", **selection: object) -> dict[str, dict]:
    """Configurations to compare: every weight_bits x kv_bits x budget (x scorer x head
    budget, for sparse budgets) combination, from comma-separated lists (weight bits:
    auto, 16, 8, 4; KV bits: 16, 8, 4, 2; budgets: all, a token count, a share such as
    10%). `selection` (dense_layers, sink_blocks, speculate) applies to all of them.

    Labels: "4-bit" is the KV's bit width, then the budget ("4-bit, 10%"), the scorer and
    head budget when several are compared; weight bits other than a lone "auto" lead as
    "w8" ("w8, 4-bit, 10%", "w auto, 4-bit"). The dense reference keeps the model's own
    weights (weight_bits auto)."""
    from .config import HEAD_BUDGETS, SCORER_NAMES, Policy, parse_budget

    try:
        bits = [int(b) for b in kv_bits.split(",") if b.strip()]
    except ValueError:
        raise EdgekvError(f"invalid --kv-bits {kv_bits!r}: give a list such as 16,8,4,2") from None
    weights: list[int | str] = []
    for w in (x.strip() for x in weight_bits.split(",") if x.strip()):
        if w != "auto" and not w.isdigit():
            raise EdgekvError(f"invalid --weight-bits {weight_bits!r}: give a list such as 16,8,4 (or auto)")
        weights.append(w if w == "auto" else int(w))
    budget_list = [parse_budget(b.strip()) for b in budgets.split(",") if b.strip()]
    scorer_list = [x.strip() for x in scorers.split(",") if x.strip()]
    for name in scorer_list:
        if name not in SCORER_NAMES:
            raise EdgekvError(f"invalid scorer {name!r}: use one of {', '.join(SCORER_NAMES)}")
    head_list = [x.strip() for x in head_budgets.split(",") if x.strip()]
    for name in head_list:
        if name not in HEAD_BUDGETS:
            raise EdgekvError(f"invalid head budget {name!r}: use one of {', '.join(HEAD_BUDGETS)}")
    for option, values in (("--kv-bits", bits), ("--weight-bits", weights), ("--budgets", budget_list),
                           ("--scorers", scorer_list), ("--head-budgets", head_list)):
        if not values:
            raise EdgekvError(f"{option} is empty: give at least one value")
    extra = {k: v for k, v in selection.items() if v is not None}
    labelled_weights = weights != ["auto"]
    configs = {}
    for w in weights:
        for b in bits:
            for budget in budget_list:
                sparse = budget != "all"
                for scorer in scorer_list if sparse else scorer_list[:1]:
                    for heads in head_list if sparse else head_list[:1]:
                        label = (f"w{w}, " if w != "auto" else "w auto, ") * labelled_weights + f"{b}-bit"
                        if sparse:
                            label += f", {budget}" + (f", {scorer}" if len(scorer_list) > 1 else "")
                            label += f", {heads} heads" if len(head_list) > 1 else ""
                        config = {"kv_bits": b, "budget": budget, "scorer": scorer, "head_budget": heads, **extra}
                        if w != "auto":
                            config["weight_bits"] = w
                        Policy.from_kwargs(**config)  # bad values fail before any run
                        configs[label] = config
    return configs
