"""`edgekv bench quality`: KL divergence against dense, extraction from real source, the
other tasks, and its options. Models: the suite's tiny random ones (contexts of a few
hundred tokens), so every test here runs in seconds."""

from __future__ import annotations

import ast
import json
import math
import re
import textwrap
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from edgekv import bench_quality
from edgekv.bench_quality import (DEPTHS, EXTRACT_ANSWER_TOKENS, EXTRACT_KINDS, NEAR_TIE, KldReference,
                                  agreement_documents, answer_matches, extract_messages, extract_question,
                                  kl_divergence, kld_figures, parse_configs, run_agreements, run_extract,
                                  run_passkey, run_quality_bench, selection_changes, shared_extract_document,
                                  shared_passkey_document, shared_passkey_question, source_corpus, spread_depths, stored_logprobs)
from edgekv.cli import app
from edgekv.engine import load
from edgekv.errors import EdgekvError


@pytest.fixture(scope="module")
def tiny_engine(tiny_models):
    engine = load(str(tiny_models["llama3"]), progress=False, offload=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def corpus(tiny_engine):
    return source_corpus(tiny_engine.tokenizer)


# ---- KL divergence -----------------------------------------------------------------------


def test_kl_divergence_is_the_textbook_sum_on_known_distributions():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 nats
    assert float(kl_divergence(p.log(), q.log())) == pytest.approx(expected, rel=1e-6)
    backwards = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.3681 nats: KL is not symmetric
    assert float(kl_divergence(q.log(), p.log())) == pytest.approx(backwards, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(6, 1000, generator=g) * 3, torch.randn(6, 1000, generator=g) * 3
    direct = torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(ref, -1),
                                        log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(ref, other), direct, rtol=1e-5, atol=1e-6)  # one value per row
    assert torch.allclose(kl_divergence(ref + 7.0, other), direct, rtol=1e-5, atol=1e-6)  # logits or log-probs alike


def test_kl_divergence_of_a_distribution_with_itself_is_zero_even_through_float16_storage():
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(1)) * 4
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(4))
    stored = stored_logprobs(logits)  # how the kld task keeps the reference's, and rounds every config's
    assert stored.dtype == torch.float16 and stored.device.type == "cpu"
    assert torch.equal(kl_divergence(stored, stored_logprobs(logits.clone())), torch.zeros(4))
    assert float(kl_divergence(stored, logits).max()) < 1e-6  # the rounding alone moves it next to nothing
    # a token the reference gives no probability adds nothing; one it gives some but the other none: infinite
    p = torch.tensor([0.0, 0.5, 0.5]).log()
    assert float(kl_divergence(p, torch.tensor([0.2, 0.4, 0.4]).log())) == pytest.approx(math.log(0.5 / 0.4), rel=1e-6)
    assert math.isinf(float(kl_divergence(torch.tensor([0.5, 0.5]).log(), torch.tensor([1.0, 0.0]).log())))


def test_kld_figures_summarise_every_position_of_every_document():
    kls = [torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6, 10.0])]
    agree = [torch.tensor([True, True, False, True]), torch.tensor([False, True, True, False])]
    reference = KldReference(margins=[torch.tensor([1.0, 1.0, 0.1, 1.0]), torch.tensor([2.0, 1.0, 1.0, 0.2])],
                             nll=[torch.full((4,), 2.0), torch.full((4,), 2.0)])
    nlls = [torch.full((4,), 2.5), torch.full((4,), 2.5)]
    f = kld_figures(kls, agree, nlls, reference)
    every = torch.cat(kls).double()
    assert f["kld_mean"] == pytest.approx(12.1 / 8) and f["kld_doc_means"] == pytest.approx([0.15, 2.875])
    assert f["kld_median"] == pytest.approx(0.35) and f["kld_max"] == 10.0
    assert f["kld_p99"] == pytest.approx(float(torch.quantile(every, 0.99))) and f["kld_mean"] <= f["kld_p99"] <= 10.0
    assert f["top1"] == 5 / 8 and f["top1_disagreements"] == 3 and f["kld_positions"] == 8
    # disagreements at margins 0.1, 2.0 and 0.2: two of three are near-ties
    assert NEAR_TIE > 0.2 and f["near_tie_share"] == pytest.approx(2 / 3)
    assert f["kld_ppl_ratio"] == pytest.approx(math.exp(0.5))
    assert kld_figures(kls, [torch.ones(4, dtype=torch.bool)] * 2, nlls, reference)["near_tie_share"] is None


def test_kld_of_dense_against_itself_is_zero_and_a_lossy_kv_moves_it(tiny_models, tmp_path, capsys):
    lossy = {"kv_bits": 2, "budget": "25%"}  # 2-bit KV, a quarter of the context attended
    rows = run_quality_bench(str(tiny_models["llama3"]), {"dense again": {"offload": False}, "2-bit, 25%": lossy},
                             tasks=["kld"], kld_docs=2, kld_context=200, kld_tokens=8, plot=tmp_path / "k.png")
    dense, again, two_bit = rows
    for row in (dense, again):  # the reference scored against itself, and a second dense engine
        assert row["kld_mean"] == 0.0 and row["kld_max"] == 0.0 and row["kld_doc_means"] == [0.0, 0.0]
        assert row["top1"] == 1.0 and row["top1_disagreements"] == 0 and row["near_tie_share"] is None
        assert row["kld_ppl_ratio"] == 1.0 and "selected_fraction" not in row  # dense selects nothing
    assert dense["kld_positions"] == 16 and 0 <= dense["near_tie_positions"] <= 16
    assert two_bit["kld_positions"] == 16
    assert two_bit["kld_max"] >= two_bit["kld_p99"] >= two_bit["kld_mean"] > 0
    assert two_bit["kld_p99"] >= two_bit["kld_median"] >= 0
    assert sum(two_bit["kld_doc_means"]) / 2 == pytest.approx(two_bit["kld_mean"])  # equal positions per document
    assert 0 <= two_bit["top1"] <= 1 and two_bit["kld_ppl_ratio"] > 0
    assert 0 < two_bit["selected_fraction"] < 1  # the budget left blocks out
    share = two_bit["near_tie_share"]
    assert (share is None) == (two_bit["top1"] == 1.0) and (share is None or 0 <= share <= 1)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["config", "KLD", "mean"] and "p99" in table[0] and "top-1" in table[0]
    assert [line.split()[0] for line in table[2:4]] == ["dense", "dense"] and table[4].startswith("2-bit, 25%")
    assert (tmp_path / "k.png").stat().st_size > 0


# ---- extraction from real source ---------------------------------------------------------


def _function_text(corpus, q) -> str:
    """The corpus lines from the question's `def` through its last line, made parseable."""
    text = textwrap.dedent("".join(corpus.lines[q.first_line:q.last_line + 1]))
    return text if q.kind == "return" else text + "    pass\n"  # "default" questions keep the signature only


def test_extraction_answers_are_what_ast_says_about_the_source(corpus):
    defined = Counter(re.findall(r"\bdef (\w+)\(", "".join(corpus.lines)))
    assert len(corpus.lines) == len(corpus.tokens) and sum(corpus.tokens) > 100_000
    for kind in EXTRACT_KINDS:
        assert len(corpus.questions[kind]) >= 40, kind
        assert len({q.answer for q in corpus.questions[kind]}) >= 15, kind  # not one guessable answer
    for q in corpus.questions["default"] + corpus.questions["return"]:
        assert defined[q.function] == 1  # the name is unambiguous
        node = ast.parse(_function_text(corpus, q)).body[0]
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == q.function
        if q.kind == "default":
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
            defaults.update((a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)
            assert ast.unparse(defaults[q.parameter]) == q.answer
            assert q.answer not in ("None", "True", "False", "''")
        else:
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            assert len(returns) == 1 and ast.unparse(returns[0].value) == q.answer and q.answer != "self"
        assert answer_matches(q.answer, q.answer)


@pytest.mark.parametrize("answer, expected, right", [
    ("The default is `None`.", "None", True),
    ("None", "None", True),
    ("The default value is none.", "None", False),  # not the literal
    ("0", "0", True),
    ("The default value of `forceload` is 0.", "0", True),
    ("10", "0", False),
    ("0.5", "0", False),
    ("-1", "1", False),
    ("The default is -1", "-1", True),
    ("70 characters", "70", True),
    ("'utf-8'", "'utf-8'", True),
    ('It defaults to "utf-8".', "'utf-8'", True),
    ("utf-8", "'utf-8'", True),
    ("utf-16", "'utf-8'", False),
    ("`r`", "'r'", True),
    ("The mode is r", "'r'", False),  # a one-letter string needs quotes
    ("'rb'", "'r'", False),
    ("It returns `self.welcome`.", "self.welcome", True),
    ("welcome", "self.welcome", False),
    ("self.welcome_text", "self.welcome", False),
    ("result", "result", True),
    ("`result`.", "result", True),
    ("It returns `result`.", "result", True),
    ("self.result", "result", False),
    ("`result_list`", "result", False),
    ("the parsed result.", "result", False),  # a word that describes, not the name
    ("It returns the next header.", "next", False),
    ("return next", "next", True),  # the quoted return statement
    ("    return results_list", "results", False),
    ("The default is None.", "None", True),
    ("errors='strict'", "'strict'", True),
    ("it is strict about errors", "'strict'", False),
])
def test_answer_scoring_accepts_the_stated_value_and_nothing_like_it(answer, expected, right):
    assert answer_matches(answer, expected) is right


def test_extraction_puts_the_asked_function_at_each_depth_within_the_context(tiny_engine, corpus):
    context = 1024
    for trial, depth in enumerate(DEPTHS):
        q = extract_question(corpus, trial, context - 200, EXTRACT_KINDS)
        assert q.kind == EXTRACT_KINDS[trial % len(EXTRACT_KINDS)]
        messages, placed = extract_messages(tiny_engine.encode, corpus, q, context, depth)
        total = len(tiny_engine.encode(messages))
        assert 0.98 * context <= total + EXTRACT_ANSWER_TOKENS <= context
        content = messages[0]["content"]
        assert content.endswith(q.text) and q.function in q.text
        code = content[content.index("```python\n") + 10:content.rindex("```")]
        def_line = corpus.lines[q.first_line]
        assert code.count(def_line) == 1 and "".join(corpus.lines[q.first_line:q.last_line + 1]) in code
        before = len(tiny_engine.tokenizer.encode(code[:code.index(def_line)], add_special_tokens=False))
        measured = before / len(tiny_engine.tokenizer.encode(code, add_special_tokens=False))
        assert measured == pytest.approx(placed, abs=0.03)
        span = corpus.span_tokens(q) / (context - 200)
        assert placed == pytest.approx(depth, abs=0.05) or placed < depth <= placed + span + 0.05  # moved up to fit


def test_bench_quality_extract_reports_accuracy_per_context_and_kind(tiny_models, capsys, monkeypatch):
    monkeypatch.setattr(bench_quality, "EXTRACT_ANSWER_TOKENS", 8)  # a random model's answers end nowhere: cut them short
    rows = run_quality_bench(str(tiny_models["llama3"]), {"4-bit": {"kv_bits": 4}}, tasks=["extract"],
                             extract_contexts=[400, 600], extract_trials=2, extract_kinds=EXTRACT_KINDS, plot=None)
    for row in rows:
        for context in (400, 600):
            assert 0 <= row[f"extract@{context}"] <= 1
            trials = row[f"extract_trials@{context}"]
            assert [t["kind"] for t in trials] == list(EXTRACT_KINDS)
            assert all(t["hit"] == answer_matches(t["answer"], t["expected"]) for t in trials)
            for kind in EXTRACT_KINDS:
                assert row[f"extract_{kind}@{context}"] in (0.0, 1.0)
    # the same questions for every config
    asked = [[t["function"] for t in row["extract_trials@600"]] for row in rows]
    assert asked[0] == asked[1]
    assert "extract@400" in capsys.readouterr().out


# ---- trials sharing a document ------------------------------------------------------------------


def test_a_shared_haystack_holds_each_named_key_once_at_spread_depths(tiny_engine):
    keys = [11111, 22222, 33333, 44444, 55555]
    text, names = shared_passkey_document(tiny_engine.tokenizer, 1500, keys, seed=0)
    assert len(set(names)) == len(keys)
    places = []
    for name, key in zip(names, keys):
        needle = f"The passkey of the {name} vault is {key}."
        assert text.count(needle) == 1 and text.count(str(key)) == 1
        places.append(text.index(needle) / len(text))
    assert places == sorted(places)
    assert places == pytest.approx(spread_depths(len(keys)), abs=0.05)
    prompt = [{"role": "user", "content": f"{text}\n\n{shared_passkey_question(names[-1])}"}]
    assert 1500 * 0.9 <= len(tiny_engine.encode(prompt)) + 24 <= 1500  # the document, a question and its answer


def _prefill_spy(engine, monkeypatch) -> list[tuple[int, int]]:
    """(prompt tokens, tokens reused from the cache) of each of the engine's prefills."""
    seen, real = [], engine.prefill

    def prefill(ids, on_progress=None):
        logits, reused = real(ids, on_progress)
        seen.append((len(ids), reused))
        return logits, reused
    monkeypatch.setattr(engine, "prefill", prefill)
    return seen


def test_passkey_trials_sharing_a_haystack_prefill_it_once(tiny_models, monkeypatch):
    engine = load(str(tiny_models["llama3"]), progress=False, kv_bits=4, budget="25%")
    seen = _prefill_spy(engine, monkeypatch)
    result = run_passkey(engine, 600, trials=6, per_document=3)
    assert len(seen) == 6 and len(result["trials"]) == 6
    assert result["accuracy"] == sum(t["hit"] for t in result["trials"]) / 6
    assert [t["depth"] for t in result["trials"][:3]] == [round(d, 3) for d in spread_depths(3)]
    for first in (0, 3):  # each haystack's first trial prefills it, the next two reuse all but the question
        assert seen[first][1] < 64
        for total, reused in seen[first + 1:first + 3]:
            assert total - reused < 64 + 40  # the question's tokens, and at most a block + window of the tail
    engine.close()


def test_a_shared_source_document_asks_distinct_questions_inside_it_at_spread_depths(tiny_engine, corpus):
    context, count = 2000, 4
    code, picks = shared_extract_document(tiny_engine.encode, corpus, context, count, EXTRACT_KINDS, seed=0)
    assert len({q for q, _ in picks}) == count
    assert [q.kind for q, _ in picks] == [EXTRACT_KINDS[i % 2] for i in range(count)]
    for (q, depth), goal in zip(picks, spread_depths(count)):
        span = "".join(corpus.lines[q.first_line:q.last_line + 1])
        assert code.count(corpus.lines[q.first_line]) >= 1 and span in code
        assert 0 <= depth < 1
        messages = bench_quality._extract_messages(code, q)
        assert len(tiny_engine.encode(messages)) + EXTRACT_ANSWER_TOKENS <= context
    depths = [d for _, d in picks]
    assert depths[0] < 0.5 < depths[-1]  # spread from the start to the end, not bunched


def test_extraction_questions_sharing_a_document_reuse_its_prefill(tiny_models, monkeypatch):
    monkeypatch.setattr(bench_quality, "EXTRACT_ANSWER_TOKENS", 8)
    engine = load(str(tiny_models["llama3"]), progress=False, offload=False)
    seen = _prefill_spy(engine, monkeypatch)
    corpus = source_corpus(engine.tokenizer)
    figures = run_extract(engine, corpus, 1200, trials=3, kinds=EXTRACT_KINDS, per_document=3)
    assert len(figures["trials"]) == 3 and len(seen) == 3
    assert all(total - reused < 80 for total, reused in seen[1:])
    assert len({t["function"] + str(t["parameter"]) for t in figures["trials"]}) == 3
    engine.close()


def test_a_config_differing_only_in_selection_reuses_the_engine_and_scores_as_its_own_would(tiny_models, monkeypatch):
    assert selection_changes({"kv_bits": 4}, {"kv_bits": 4, "budget": "25%"}) == {"budget": "25%"}
    assert selection_changes({"kv_bits": 4, "budget": "25%"}, {"kv_bits": 8, "budget": "25%"}) is None
    assert selection_changes({"kv_bits": 4}, {"kv_bits": 4, "weight_bits": 8}) is None
    import edgekv.engine
    loads, real = [], edgekv.engine.load

    def counting_load(*args, **kwargs):
        loads.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr("edgekv.engine.load", counting_load)
    options = dict(tasks=["kld"], kld_docs=2, kld_context=300, kld_tokens=8, plot=None)
    shared = run_quality_bench(str(tiny_models["llama3"]), {"4-bit": {"kv_bits": 4},
                                                           "4-bit, 25%": {"kv_bits": 4, "budget": "25%"},
                                                           "4-bit, 50%": {"kv_bits": 4, "budget": "50%"}}, **options)
    assert len(loads) == 2  # the reference, and one 4-bit engine for its three budgets
    alone = run_quality_bench(str(tiny_models["llama3"]), {"4-bit, 25%": {"kv_bits": 4, "budget": "25%"}}, **options)
    assert shared[2]["selected_fraction"] == alone[1]["selected_fraction"] < shared[3]["selected_fraction"]
    # the same up to the re-prefilled tail's rounding: the reused cache attended to compressed
    # blocks where a fresh single-chunk prefill attended to exact tokens
    assert shared[2]["kld_doc_means"] == pytest.approx(alone[1]["kld_doc_means"], rel=0.2)
    assert shared[2]["top1"] == alone[1]["top1"]


# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(tasks=["kld", "needle"]), "unknown task(s) needle: choose from kld, ppl, agreement, passkey, extract"),
    (dict(tasks=[]), "no task given"),
    (dict(tasks=["kld"], kld_docs=0), "--kld-docs must be at least 1 (got 0)"),
    (dict(tasks=["kld"], kld_context=300, kld_tokens=300),
     "--kld-tokens must be at least 1 and below --kld-context 300 (got 300)"),
    (dict(tasks=["kld"], kld_tokens=0), "--kld-tokens must be at least 1"),
    (dict(tasks=["agreement"], agreement_docs=0), "--agreement-docs must be at least 1 (got 0)"),
    (dict(tasks=["extract"], extract_trials=0), "--extract-trials must be at least 1 (got 0)"),
    (dict(tasks=["extract"], extract_contexts=[100]), "--extract-contexts needs token counts >= 256"),
    (dict(tasks=["extract"], extract_kinds=("default", "body")), "--extract-kinds must be some of default, return"),
    (dict(tasks=["passkey"], passkey_trials=0), "passkey needs --passkey-trials >= 1"),
])
def test_bad_options_are_one_clear_error_before_any_model_loads(options, message, tmp_path):
    with pytest.raises(EdgekvError) as raised:
        run_quality_bench(str(tmp_path / "no-such-model"), {}, plot=None, **options)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_context_longer_than_the_model_names_its_option(tiny_models):
    with pytest.raises(EdgekvError, match=r"^--kld-context 4096 exceeds the model's context of 2048 tokens$"):
        run_quality_bench(str(tiny_models["llama3"]), {}, tasks=["kld"], kld_context=4096, plot=None)
    with pytest.raises(EdgekvError, match=r"^--extract-contexts 3000 exceeds"):
        run_quality_bench(str(tiny_models["llama3"]), {}, tasks=["extract"], extract_contexts=[512, 3000], plot=None)


# ---- configurations, ppl, agreement and passkey (moved from test_selection.py) ----------------


def test_bench_quality_crosses_bit_widths_budgets_scorers_and_head_budgets():
    configs = parse_configs("4,8", "all,10%", "keys4,minmax", dense_layers=2, speculate=None)
    assert list(configs) == ["4-bit", "4-bit, 10%, keys4", "4-bit, 10%, minmax",
                             "8-bit", "8-bit, 10%, keys4", "8-bit, 10%, minmax"]
    assert configs["8-bit, 10%, minmax"] == {"kv_bits": 8, "budget": "10%", "scorer": "minmax", "head_budget": "auto",
                                             "dense_layers": 2}
    heads = parse_configs("4", "10%", "mass", "adaptive,uniform")
    assert list(heads) == ["4-bit, 10%, adaptive heads", "4-bit, 10%, uniform heads"]
    assert heads["4-bit, 10%, uniform heads"]["head_budget"] == "uniform"
    with pytest.raises(EdgekvError, match="invalid scorer 'best'"):
        parse_configs("4", "10%", "best")
    with pytest.raises(EdgekvError, match="invalid head budget 'some'"):
        parse_configs("4", "10%", "mass", "some")
    with pytest.raises(EdgekvError, match="head_budget 'adaptive' shares blocks"):
        parse_configs("4", "10%", "keys4", "adaptive")
    with pytest.raises(EdgekvError, match="invalid budget"):
        parse_configs("4", "ten percent")


def test_bench_quality_configurations_cross_weight_bits_kv_bits_and_budgets():
    configs = parse_configs("16,4", "all,5%,2048", weight_bits="16,8,4")
    assert len(configs) == 3 * 2 * 3
    assert list(configs)[:3] == ["w16, 16-bit", "w16, 16-bit, 5%", "w16, 16-bit, 2048"]
    assert configs["w4, 4-bit, 2048"] == {"weight_bits": 4, "kv_bits": 4, "budget": 2048, "scorer": "keys4",
                                          "head_budget": "auto"}
    assert configs["w8, 16-bit, 5%"]["budget"] == "5%" and configs["w8, 16-bit, 5%"]["weight_bits"] == 8
    # the model's own weights (auto) are left to the model, unlabelled unless compared with others
    assert "weight_bits" not in parse_configs("4", "10%")["4-bit, 10%"]
    assert list(parse_configs("4", "all", weight_bits="auto,8")) == ["w auto, 4-bit", "w8, 4-bit"]
    with pytest.raises(EdgekvError, match="invalid weight_bits 5"):
        parse_configs("4", "all", weight_bits="5")
    with pytest.raises(EdgekvError, match="invalid --weight-bits 'half'"):
        parse_configs("4", "all", weight_bits="half")
    with pytest.raises(EdgekvError, match="invalid kv_bits 3"):
        parse_configs("3", "all")
    with pytest.raises(EdgekvError, match="--budgets is empty"):
        parse_configs("4", ",")


def test_bench_quality_reports_each_task_against_dense(tiny_models, tmp_path, capsys):
    rows = run_quality_bench(str(tiny_models["llama3"]), {"4-bit, 25%": {"kv_bits": 4, "budget": "25%"}},
                             tasks=["kld", "ppl", "agreement", "passkey"], kld_docs=1, kld_context=300, kld_tokens=8,
                             ppl_context=400, score_tokens=16, agreement_doc=300, agreement_tokens=8,
                             agreement_docs=1, passkey_contexts=[200], passkey_trials=1, plot=tmp_path / "q.png")
    dense, sparse = rows
    assert dense["ppl_ratio"] == 1.0 and dense["agreement"] == dense["forced_agreement"] == 1.0
    assert dense["top1"] == 1.0 and sparse["kld_mean"] >= 0 and 0 <= sparse["top1"] <= 1
    assert sparse["ppl_ratio"] > 0 and 0 <= sparse["forced_agreement"] <= 1 and 0 <= sparse["agreement"] <= 1
    assert 0 < sparse["selected_fraction"] <= 1 and 0 <= sparse["passkey@200"] <= 1
    assert [t["key"] for t in sparse["passkey_trials@200"]] == [t["key"] for t in dense["passkey_trials@200"]]
    assert "4-bit, 25%" in capsys.readouterr().out and (tmp_path / "q.png").stat().st_size > 0


def test_agreement_reports_the_reference_margin_where_the_tokens_first_differ(tiny_engine):
    e = tiny_engine
    doc = agreement_documents(e.tokenizer, 200, 1)
    reference = run_agreements(e, doc, 6, None)["references"][0]
    assert len(reference["tokens"]) == len(reference["margins"]) == 6 and min(reference["margins"]) >= 0
    altered = dict(tokens=list(reference["tokens"]), margins=[0.5, 0.25, 0.125, 1.0, 2.0, 4.0])
    altered["tokens"][2] = (altered["tokens"][2] + 1) % e.shape.vocab_size  # greedy differs at step 2
    row = run_agreements(e, doc, 6, [altered])
    assert row["identical_prefixes"] == [2] and row["first_difference_margins"] == [0.125]
    assert 2 / 6 <= row["forced_agreement"] <= 5 / 6  # steps 0-1 see greedy's own prefix; step 2 is altered
    assert run_agreements(e, doc, 6, [reference])["first_difference_margins"] == [None]  # identical: no margin


def test_bench_quality_agreement_over_several_documents_counts_those_identical(tiny_models, tiny_engine, capsys):
    rows = run_quality_bench(str(tiny_models["llama3"]), {"2-bit": {"kv_bits": 2}}, tasks=["agreement"],
                             agreement_doc=200, agreement_tokens=6, plot=None, agreement_docs=3)
    dense, two_bit = rows
    assert dense["identical_docs"] == 3 and dense["identical_prefixes"] == [6, 6, 6]
    prefixes = two_bit["identical_prefixes"]
    assert len(prefixes) == 3 and two_bit["identical_prefix"] == prefixes[0]
    assert two_bit["identical_docs"] == sum(p == 6 for p in prefixes)
    # each first difference comes with the dense reference's top-two margin at that step
    assert len(dense["near_ties"]) == 3 and all(0 <= n <= 6 for n in dense["near_ties"])
    margins = two_bit["first_difference_margins"]
    assert [m is None for m in margins] == [p == 6 for p in prefixes]
    assert all(m >= 0 for m in margins if m is not None)
    assert "docs same" in capsys.readouterr().out
    docs = agreement_documents(tiny_engine.tokenizer, 200, 3)
    assert len({tuple(d) for d in docs}) == 3 and all(len(d) == 200 for d in docs)  # three different documents


# ---- the command line ---------------------------------------------------------------------------

runner = CliRunner()


def test_the_command_hands_every_option_to_the_bench(monkeypatch, tmp_path):
    seen = {}

    def fake_bench(model, configs, **options):
        seen.update(model=model, configs=configs, **options)
        return [{"config": "dense"}]

    monkeypatch.setattr(bench_quality, "run_quality_bench", fake_bench)
    result = runner.invoke(app, ["bench", "quality", "--model", "m.gguf", "--weight-bits", "8,4", "--kv-bits", "4",
                                 "--budgets", "all,10%", "--tasks", "kld,extract", "--kld-docs", "3",
                                 "--kld-context", "2048", "--kld-tokens", "64", "--extract-contexts", "1024,2048",
                                 "--extract-trials", "5", "--extract-kinds", "default,return", "--dense-layers", "1",
                                 "--plot", str(tmp_path / "q.png"), "--stats-json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    assert seen["model"] == "m.gguf" and seen["tasks"] == ["kld", "extract"]
    assert (seen["kld_docs"], seen["kld_context"], seen["kld_tokens"]) == (3, 2048, 64)
    assert seen["extract_contexts"] == [1024, 2048] and seen["extract_trials"] == 5
    assert seen["extract_kinds"] == ("default", "return") and seen["plot"] == tmp_path / "q.png"
    assert list(seen["configs"]) == ["w8, 4-bit", "w8, 4-bit, 10%", "w4, 4-bit", "w4, 4-bit, 10%"]
    assert seen["configs"]["w4, 4-bit, 10%"] == {"weight_bits": 4, "kv_bits": 4, "budget": "10%", "scorer": "keys4",
                                                 "head_budget": "auto", "dense_layers": 1}
    assert json.loads((tmp_path / "q.json").read_text()) == {"rows": [{"config": "dense"}]}


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "kld,needle"], "unknown task(s) needle"),
    (["--tasks", "kld", "--kld-docs", "0"], "--kld-docs must be at least 1 (got 0)"),
    (["--tasks", "kld", "--kld-context", "512", "--kld-tokens", "512"], "--kld-tokens must be at least 1 and below"),
    (["--tasks", "kld", "--kld-docs", "two"], "Invalid value for '--kld-docs'"),
    (["--tasks", "extract", "--extract-contexts", "100"], "--extract-contexts needs token counts >= 256"),
    (["--tasks", "extract", "--extract-contexts", "4k"], "invalid --extract-contexts '4k'"),
    (["--tasks", "extract", "--extract-trials", "0"], "--extract-trials must be at least 1"),
    (["--tasks", "extract", "--extract-kinds", "body"], "--extract-kinds must be some of default, return"),
    (["--weight-bits", "3"], "invalid weight_bits 3: use 16, 8, 4 or auto"),
    (["--kv-bits", "4,five"], "invalid --kv-bits '4,five'"),
    (["--budgets", "5%,most"], "invalid budget 'most'"),
    (["--kld-tokens", "-1"], "--kld-tokens must be at least 1"),
])
def test_a_bad_option_is_one_error_line_and_exit_code_2(args, needle, tmp_path):
    result = runner.invoke(app, ["bench", "quality", "--model", str(tmp_path / "no-such-model"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_the_command_prints_the_kld_table_and_writes_the_plot(tiny_models, tmp_path):
    result = runner.invoke(app, ["bench", "quality", "--model", str(tiny_models["llama3"]), "--kv-bits", "4",
                                 "--budgets", "all", "--tasks", "kld", "--kld-docs", "1", "--kld-context", "200",
                                 "--kld-tokens", "8", "--plot", str(tmp_path / "k.png"),
                                 "--stats-json", str(tmp_path / "k.json")])
    assert result.exit_code == 0, result.output
    head, _, dense, four_bit = result.stdout.splitlines()[:4]
    assert head.split()[:6] == ["config", "KLD", "mean", "p99", "median", "max"] and "top-1" in head
    assert dense.split()[:6] == ["dense", "0.000000", "0.000000", "0.000000", "0.000000", "100.00%"]
    assert four_bit.startswith("4-bit ")
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["dense", "4-bit"] and rows[1]["kld_positions"] == 8
    assert (tmp_path / "k.png").stat().st_size > 0
