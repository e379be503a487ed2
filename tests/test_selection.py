"""Sparse block selection: budgets, scorers, speculation, and the engine path that uses them."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.config import SCORER_NAMES, Policy
from edgekv.engine import Engine
from edgekv.errors import EdgekvError
from edgekv.kernels import _backend, sparse_decode_attention
from edgekv.kernels.rope import rotate_keys
from edgekv.loader import resolve_model
from edgekv.quant import BlockCodec
from edgekv.rotation import rotate
from edgekv.selection import SCORERS, BlockSummaries, budget_blocks, budget_tokens, select_blocks
from edgekv.tiered_cache import TieredKVCache

runner = CliRunner()
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)


# ---- budgets ---------------------------------------------------------------------------------


def test_a_budget_is_tokens_a_share_of_the_context_or_everything():
    assert budget_tokens("all", 8192) is None
    assert budget_tokens(2048, 8192) == 2048
    assert budget_tokens("10%", 8192) == 820  # rounded up
    assert budget_tokens("100%", 100) == 100


def test_blocks_fill_what_the_exact_tail_leaves_of_the_budget():
    # 8192-token context, 96 exact tail tokens, blocks of 32: 10% = 820 tokens -> (820 - 96) // 32 = 22
    assert budget_blocks("10%", context=8192, tail=96, block_size=32, num_blocks=253, sink_blocks=1) == 22
    assert budget_blocks(512, context=8192, tail=64, block_size=32, num_blocks=254, sink_blocks=1) == 14
    # never fewer than the sinks, never more than exist
    assert budget_blocks(10, context=8192, tail=64, block_size=32, num_blocks=254, sink_blocks=2) == 2
    assert budget_blocks(10**6, context=8192, tail=64, block_size=32, num_blocks=254, sink_blocks=1) == 254
    assert budget_blocks("all", context=8192, tail=64, block_size=32, num_blocks=254, sink_blocks=1) == 254


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_selection_keeps_the_sinks_then_the_best_scores_in_block_order(backend):
    if backend == "numba" and not _backend.numba_available():
        pytest.skip("the numba package is not installed")
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 3.0, 7.0],
                           [9.0, 0.0, 8.0, 1.0, 2.0, 3.0]])
    chosen = select_blocks(scores, 3, sink_blocks=1, backend=backend)
    assert chosen.tolist() == [[0, 3, 5], [0, 2, 5]]
    assert select_blocks(scores, 6, sink_blocks=1, backend=backend).tolist() == [list(range(6))] * 2
    assert select_blocks(scores, 4, sink_blocks=2, backend=backend).tolist() == [[0, 1, 3, 5], [0, 1, 2, 5]]


@pytest.mark.skipif(not _backend.numba_available(), reason="the numba package is not installed")
def test_compiled_selection_picks_what_the_twin_picks():
    g = torch.Generator().manual_seed(7)
    for heads, blocks, k, sinks in ((3, 250, 24, 1), (2, 17, 16, 3), (1, 5, 1, 1), (4, 64, 9, 0)):
        scores = torch.randn(heads, blocks, generator=g)  # distinct scores: no ties
        assert torch.equal(select_blocks(scores, k, sinks, backend="numba"),
                           select_blocks(scores, k, sinks, backend="torch")), (heads, blocks, k, sinks)
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert select_blocks(tied, 3, 1, backend="numba").tolist() == [[0, 1, 2]]  # the first of the tied


# ---- scorers ---------------------------------------------------------------------------------


def test_the_scorer_registry_is_the_policy_s_list():
    assert tuple(SCORERS) == SCORER_NAMES


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_every_scorer_ranks_the_block_holding_the_matching_keys_first(name):
    g = torch.Generator().manual_seed(0)
    codec = BlockCodec(bits=4, block_size=8, head_dim=16)
    hkv, nb = 2, 12
    keys = torch.randn(hkv, nb * 8, 16, generator=g) * 0.3
    q = torch.randn(4, 16, generator=g)  # GQA group 2
    needle = {0: 7, 1: 3}  # KV head -> block whose keys all point along its queries
    for h, b in needle.items():
        keys[h, b * 8:(b + 1) * 8] += 2.0 * q[2 * h] / q[2 * h].norm()
    summaries = BlockSummaries(SCORERS[name], codec, num_layers=1, num_kv_heads=hkv, max_blocks=16,
                               device=torch.device("cpu"), backend="torch")
    summaries.write(0, 0, keys[:, :48])  # blocks 0..5, then 6..11 in a second write
    summaries.write(0, 6, keys[:, 48:])
    scores = summaries.scores(0, q, nb, torch.zeros(hkv, 0, 16))
    assert scores.shape == (hkv, nb)
    assert scores.argmax(dim=1).tolist() == [needle[0], needle[1]]


def test_summaries_cost_what_the_registry_says_per_block():
    codec = BlockCodec(bits=4, block_size=32, head_dim=64)
    per_block = {}
    for name in SCORER_NAMES:
        s = BlockSummaries(SCORERS[name], codec, num_layers=3, num_kv_heads=2, max_blocks=10,
                           device=torch.device("cpu"), backend="torch")
        per_block[name] = s.bytes_used(10) / (3 * 2 * 10)
    # 4-bit key copy: codes 32*64/2 + fp16 scale and zero per channel
    assert per_block == {"mass": 1024 + 4 * 64, "keys4": 1024 + 4 * 64, "minmax": 4 * 64, "mean": 2 * 64}


# ---- the tiered cache with a budget ---------------------------------------------------------------

BACKENDS = ["torch", "numba", "triton"]  # every decode backend; triton runs in its interpreter on a CPU


def tiered(tmp_path, backend: str = "torch", **overrides) -> TieredKVCache:
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, max_context=512, block_size=4, kv_bits=4,
                recent_window=4, device_cache_bytes=1 << 20, ram_bytes=1 << 20, disk_dir=str(tmp_path),
                disk_bytes=1 << 20, dtype=torch.float32, device=torch.device("cpu"), rope_inv_freq=INV_FREQ,
                backend=backend)
    args.update(overrides)
    return TieredKVCache(**args)


def new_tokens(cache: TieredKVCache, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v, k_pre of `tokens` new tokens as the layer loop hands them over."""
    q, k_pre, v = torch.randn(4, tokens, 16, generator=g), torch.randn(2, tokens, 16, generator=g), \
        torch.randn(2, tokens, 16, generator=g)
    k = rotate_keys(k_pre, torch.arange(cache.length, cache.length + tokens), INV_FREQ)
    return q, k, v, k_pre


def fill(cache: TieredKVCache, tokens: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(cache.layout.num_layers):
        cache.attend(layer, *new_tokens(cache, tokens, g))
    cache.commit(tokens)


def decode_step(cache: TieredKVCache, layer: int, seed: int = 1) -> torch.Tensor:
    return cache.attend(layer, *new_tokens(cache, 1, torch.Generator().manual_seed(seed)))


def test_a_budget_covering_every_block_attends_exactly_like_budget_all(tmp_path):
    a, b = tiered(tmp_path / "a"), tiered(tmp_path / "b")
    for c in (a, b):
        fill(c, 100)
    b.configure_selection(budget=10**6, sink_blocks=1, dense_layers=0, speculate=False)
    assert torch.equal(decode_step(a, 0), decode_step(b, 0))


def test_a_small_budget_attends_the_exact_sink_the_top_blocks_and_the_tail_only(tmp_path):
    cache = tiered(tmp_path)
    fill(cache, 100)  # 24 compressed blocks of 4, tail of 4
    cache.configure_selection(budget=20, sink_blocks=1, dense_layers=0, speculate=False)
    g = torch.Generator().manual_seed(1)
    q, k, v, k_pre = new_tokens(cache, 1, g)
    chosen = cache.selection(0, q[:, 0])  # before the step: the tail then has 4 tokens, the step adds 1
    out = cache.attend(0, q, k, v, k_pre)
    blocks = cache.selection(0, q[:, 0])
    assert blocks.shape == (2, (20 - 5) // 4) and (blocks[:, 0] == 0).all()
    assert chosen.shape[1] == (20 - 4) // 4
    rows = cache.store.get(cache.layout.row_ids(0, blocks[:, 1:])).view(2, blocks.shape[1] - 1, -1)
    exact_k, exact_v = cache.exact.exact(0)  # block 0 is read from its exact copy, beside the tail
    assert exact_k.shape[1] == 4 + 5
    expected = sparse_decode_attention(q[:, 0], rows, cache.codec, exact_k, exact_v,
                                       block_ids=blocks[:, 1:], rope_inv_freq=INV_FREQ, backend="torch")
    assert torch.allclose(out[:, 0], rotate(expected, cache.layout.value_basis, inverse=True), atol=1e-6)  # values are held rotated
    stats = cache.decode_stats(1)
    assert stats["selected_fraction"] == pytest.approx(blocks.numel() / (2 * cache.num_blocks), abs=1e-4)


def test_an_adaptive_budget_attends_each_head_s_own_blocks_and_counts_only_those(tmp_path):
    cache = tiered(tmp_path, scorer="mass")
    fill(cache, 100)  # 24 compressed blocks of 4, tail of 4
    cache.configure_selection(budget=20, sink_blocks=1, dense_layers=0, speculate=False, head_budget="adaptive")
    g = torch.Generator().manual_seed(1)  # a query whose heads get 3 and 1 blocks besides the sink
    q, k, v, k_pre = new_tokens(cache, 1, g)
    q = q * 3
    out = cache.attend(0, q, k, v, k_pre)
    blocks = cache.selection(0, q[:, 0])  # what the step chose: the same query and tail
    real = blocks >= 0
    assert real.sum().item() == 2 * ((20 - 5) // 4) and (blocks[:, 0] == 0).all()
    assert not real.all()  # the heads got different numbers of blocks
    expected = []
    for h in range(2):  # each KV head over its own blocks only
        ids = blocks[h, 1:][real[h, 1:]]
        rows = cache.store.get(cache.layout.row_ids(0, ids[None].expand(2, -1))).view(2, len(ids), -1)
        exact_k, exact_v = cache.exact.exact(0)
        expected.append(sparse_decode_attention(q[:, 0], rows, cache.codec, exact_k, exact_v, backend="torch",
                                                block_ids=ids[None].expand(2, -1), rope_inv_freq=INV_FREQ)[2 * h:2 * h + 2])
    want = rotate(torch.cat(expected), cache.layout.value_basis, inverse=True)
    assert torch.allclose(out[:, 0], want, atol=1e-6)
    assert cache.decode_stats(1)["selected_fraction"] == pytest.approx(real.sum().item() / (2 * cache.num_blocks),
                                                                        abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_speculation_with_the_true_query_hits_every_needed_block(tmp_path, backend):
    cache = tiered(tmp_path, backend, scorer="mass")
    fill(cache, 100)
    cache.configure_selection(budget=24, sink_blocks=1, dense_layers=0, speculate=True, head_budget="adaptive")
    g = torch.Generator().manual_seed(3)
    q, k, v, k_pre = new_tokens(cache, 1, g)
    q = q * 3
    cache.speculate(1, q[:, 0])
    cache.attend(1, q, k, v, k_pre)
    stats = cache.decode_stats(1)
    assert stats["prefetch_hit_rate"] == 1.0 and stats["prefetch_miss_bytes"] == 0
    # the real entries are counted, not the -1 padding
    assert stats["selected_fraction"] == pytest.approx(2 * ((24 - 5) // 4) / (2 * cache.num_blocks), abs=1e-4)


def test_the_head_budget_is_adaptive_with_the_mass_scorer_and_refused_without_it(tmp_path):
    assert Policy(scorer="mass").adaptive_heads
    assert Policy().scorer == "keys4" and not Policy().adaptive_heads  # auto: uniform for block maxima
    assert not Policy(head_budget="uniform").adaptive_heads
    with pytest.raises(EdgekvError, match="use scorer 'mass', or head_budget 'uniform'"):
        Policy(scorer="minmax", head_budget="adaptive")
    with pytest.raises(EdgekvError, match="invalid head_budget 'even'"):
        Policy(head_budget="even")
    with pytest.raises(ValueError, match="needs a scorer of attention mass"):
        tiered(tmp_path, scorer="keys4").configure_selection(budget=20, sink_blocks=1, dense_layers=0, speculate=False,
                                                             head_budget="adaptive")


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("budget,device_layers,scorer,head_budget", [
    (20, 8, "keys4", "uniform"), ("all", 8, "keys4", "uniform"), (20, 1, "keys4", "uniform"),
    (20, 8, "mass", "uniform"), (20, 8, "mass", "adaptive"), (20, 1, "mass", "adaptive")])
def test_every_backend_attends_what_the_reference_attends(tmp_path, backend, budget, device_layers, scorer,
                                                          head_budget):
    # device_layers 1: the device cache holds one layer's rows, so each layer's read finds
    # the other's rows evicted (read with get, or from RAM in place) where 8 finds them cached
    device = device_layers * 2 * (512 // 4) * BlockCodec(4, 4, 16).row_bytes
    reference = tiered(tmp_path / "a", scorer=scorer)
    other = tiered(tmp_path / "b", backend, device_cache_bytes=device, scorer=scorer)
    assert (reference.backend.name, other.backend.name) == ("torch", backend)
    for c in (reference, other):
        fill(c, 100)
        c.configure_selection(budget=budget, sink_blocks=1, dense_layers=0, speculate=False, head_budget=head_budget)
    g = torch.Generator().manual_seed(6)
    for step in range(6):  # across a block boundary: the tail fills and a block is compressed
        for layer in range(2):
            q, k, v, k_pre = new_tokens(reference, 1, g)
            if budget != "all":
                want_ids, got_ids = reference.selection(layer, q[:, 0]), other.selection(layer, q[:, 0])
                assert torch.equal(want_ids[:, :got_ids.shape[1]], got_ids[:, :want_ids.shape[1]])
                assert (got_ids[:, want_ids.shape[1]:] == -1).all()  # a wider selection is -1 padding
            want, got = reference.attend(layer, q, k, v, k_pre), other.attend(layer, q, k, v, k_pre)
            assert (got - want).abs().max().item() < 2e-4, (step, layer)
        for c in (reference, other):
            c.commit(1)
    if budget != "all":
        assert other.decode_stats(6)["selected_fraction"] == reference.decode_stats(6)["selected_fraction"]


def test_dense_layers_attend_every_block_whatever_the_budget(tmp_path):
    a, b = tiered(tmp_path / "a"), tiered(tmp_path / "b")
    for c in (a, b):
        fill(c, 100)
    b.configure_selection(budget=8, sink_blocks=1, dense_layers=1, speculate=False)
    assert torch.equal(decode_step(a, 0), decode_step(b, 0))  # layer 0 is dense
    assert not torch.equal(decode_step(a, 1), decode_step(b, 1))  # layer 1 is sparse


@pytest.mark.parametrize("backend", BACKENDS)
def test_speculation_with_the_true_query_hits_every_needed_block(tmp_path, backend):
    cache = tiered(tmp_path, backend)
    fill(cache, 100)
    cache.configure_selection(budget=24, sink_blocks=1, dense_layers=0, speculate=True)
    assert cache.speculating
    g = torch.Generator().manual_seed(3)
    q, k, v, k_pre = new_tokens(cache, 1, g)
    cache.speculate(1, q[:, 0])
    cache.attend(1, q, k, v, k_pre)
    stats = cache.decode_stats(1)
    assert stats["selected_fraction"] > 0 and stats["prefetch_hit_rate"] == 1.0
    assert stats["prefetch_miss_bytes"] == 0
    cache.reset_counters()
    cache.speculate(0, -q[:, 0])  # a wrong guess misses some blocks and counts their bytes
    cache.attend(0, q, k, v, k_pre)
    stats = cache.decode_stats(1)
    assert stats["prefetch_hit_rate"] < 1.0
    needed = round(stats["selected_fraction"] * 2 * cache.num_blocks)
    missed = round(needed * (1 - stats["prefetch_hit_rate"]))
    assert stats["prefetch_miss_bytes"] == missed * cache.codec.row_bytes > 0


def test_imported_state_selects_the_same_blocks(tmp_path):
    a = tiered(tmp_path / "a")
    fill(a, 100)
    b = tiered(tmp_path / "b")
    b.import_state(a.export_state())
    for c in (a, b):
        c.configure_selection(budget=16, sink_blocks=1, dense_layers=0, speculate=False)
    q = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.selection(1, q), b.selection(1, q))


# ---- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tiny_models):
    return resolve_model(tiny_models["llama3"])


def test_budget_all_and_a_budget_above_the_context_give_the_same_tokens(tiny_source, long_text):
    prompt = long_text[:2500] + "\n\nSummarise."
    runs = {}
    for budget in ("all", "100%", 100_000):
        e = Engine(tiny_source, Policy(block_size=16, budget=budget, kernels="torch"))
        runs[budget] = e.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
        e.close()
    assert runs["all"] == runs["100%"] == runs[100_000]


def test_a_sparse_budget_reports_its_selection_and_prefetch_figures(tiny_source, long_text):
    e = Engine(tiny_source, Policy(block_size=16, budget="10%", speculate=True, kernels="torch"))
    result = e.generate(long_text[:2500] + "\n\nSummarise.", max_new_tokens=12, ignore_eos=True)
    s = result.stats
    assert 0 < s["selected_fraction"] < 0.2
    assert 0.5 < s["prefetch_hit_rate"] <= 1.0  # the guessed query asks for most of what the true one needs
    assert s["prefetch_miss_bytes"] % e.kv.codec.row_bytes == 0  # whole rows not asked for
    assert s["kv_bytes"]["device"] > 0
    e.update_policy(budget="all")  # no reset: the same KV, now every block
    assert e.generate(long_text[:2500] + "\n\nSummarise.", max_new_tokens=2).stats["reused_tokens"] > 0
    e.close()


def test_a_budget_without_offload_is_refused_with_the_fix(tiny_source):
    with pytest.raises(EdgekvError, match="offload is off"):
        Engine(tiny_source, Policy(offload=False, budget="10%"))
    e = Engine(tiny_source, Policy(offload=False))
    with pytest.raises(EdgekvError, match="offload is off"):
        e.update_policy(budget=512)
    assert e.policy.budget == "all"


def test_the_cli_takes_budget_and_scorer_options(tiny_models, tmp_path, long_text):
    doc = tmp_path / "doc.txt"
    doc.write_text(long_text[:2000])
    result = runner.invoke(app, ["generate", str(doc), "-p", "Summarise.", "--model", str(tiny_models["llama3"]),
                                 "-n", "4", "--budget", "10%", "--scorer", "minmax", "--dense-layers", "1",
                                 "--no-doc-cache"])
    assert result.exit_code == 0, result.output
    uniform = runner.invoke(app, ["generate", str(doc), "-p", "Summarise.", "--model", str(tiny_models["llama3"]),
                                  "-n", "4", "--budget", "10%", "--head-budget", "uniform", "--no-doc-cache"])
    assert uniform.exit_code == 0, uniform.output
    bad = runner.invoke(app, ["generate", str(doc), "-p", "x", "--model", str(tiny_models["llama3"]),
                              "--scorer", "oracle"])
    assert bad.exit_code == 2 and "invalid scorer 'oracle'" in bad.output
    mixed = runner.invoke(app, ["generate", str(doc), "-p", "x", "--model", str(tiny_models["llama3"]),
                                "--scorer", "keys4", "--head-budget", "adaptive"])
    assert mixed.exit_code == 2 and "head_budget 'adaptive'" in mixed.output and "Traceback" not in mixed.output


def test_bench_speed_times_budgets_against_dense_and_reports_the_ceiling(tiny_models, tmp_path, capsys):
    from edgekv.bench_speed import run_speed_bench

    rows = run_speed_bench(str(tiny_models["llama3"]), [200], decode_tokens=4, plot=tmp_path / "s.png",
                           threads=None, budgets=["50%"])
    row = rows[0]
    assert set(row) >= {"transformers", "edgekv dense", "edgekv 4-bit tiers", "edgekv 4-bit 50%"}
    sparse = row["edgekv 4-bit 50%"]
    assert sparse["decode_vs_dense"] == pytest.approx(sparse["decode_tok_s"] / row["edgekv dense"]["decode_tok_s"])
    assert set(sparse["decode_ms_per_token"]) == {"speculate", "select", "fetch", "attend"}
    assert sparse["decode_ms_per_token"]["select"] > 0
    assert row["ceiling_vs_dense"] == pytest.approx(row["short_context_decode_tok_s"] / row["edgekv dense"]["decode_tok_s"])
    out = capsys.readouterr().out
    assert "edgekv 4-bit 50%" in out and "ceiling" in out
    assert (tmp_path / "s.png").stat().st_size > 0


def test_bench_speed_without_transformers_leaves_out_its_ratios_only(tiny_models, tmp_path, capsys):
    from edgekv.bench_speed import run_speed_bench

    rows = run_speed_bench(str(tiny_models["llama3"]), [200], decode_tokens=4, plot=tmp_path / "s.png",
                           threads=None, budgets=["50%"], transformers=False)
    row = rows[0]
    assert "transformers" not in row and row["edgekv dense"]["prefill_ratio"] is None
    assert row["edgekv 4-bit 50%"]["decode_vs_dense"] > 0 and row["edgekv dense"]["decode_tok_s"] > 0
    assert "transformers left out" in capsys.readouterr().out
    assert (tmp_path / "s.png").stat().st_size > 0


def test_teacher_forced_scoring_gives_the_nll_and_greedy_choice_of_each_position(tiny_source, long_text):
    e = Engine(tiny_source, Policy(block_size=16, offload=False))  # dense: rerunning a token changes nothing
    prompt = e.encode(long_text[:1500])
    greedy = e.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    e.reset()
    first_logits, _ = e.prefill(prompt)
    nll, best = e.score(prompt + greedy, prefill=len(prompt), argmax=True)
    assert best.tolist() == greedy  # feeding greedy tokens back, each is again the greedy choice
    assert nll.shape == (12,) and (nll >= 0).all()
    assert nll[0] == pytest.approx(float(-torch.log_softmax(first_logits.float(), -1)[greedy[0]]), abs=1e-4)
    assert torch.equal(e.score(prompt + greedy, prefill=len(prompt)), nll)  # the prompt's KV is reused
    nll2, best2, margin = e.score(prompt + greedy, prefill=len(prompt), argmax=True, margin=True)
    assert torch.equal(nll2, nll) and torch.equal(best2, best)
    top2 = first_logits.float().topk(2).values
    assert margin.shape == (12,) and (margin >= 0).all()
    assert margin[0] == pytest.approx(float(top2[0] - top2[1]), abs=1e-4)  # the gap greedy's first choice won by
    nll3, margin_only = e.score(prompt + greedy, prefill=len(prompt), margin=True)
    assert torch.equal(nll3, nll) and torch.equal(margin_only, margin)
    e.close()
