"""`edgekv bench prefill`: prefill rates over contexts and chunk sizes, side by side."""

from __future__ import annotations

from typer.testing import CliRunner

from edgekv.bench_prefill import best_chunk, run_prefill_bench
from edgekv.cli import app


def test_every_config_and_chunk_is_timed_at_every_context(tiny_models, tmp_path):
    plot = tmp_path / "prefill.png"
    report = run_prefill_bench(str(tiny_models["llama3"]), [96, 192], [32, 64], repeats=1, plot=plot)
    rows = report["rows"]
    assert [r["context"] for r in rows] == [96, 192]
    for r in rows:
        assert set(r) == {"context", "exact KV @32", "exact KV @64", "4-bit tiers @32", "4-bit tiers @64",
                          "transformers"}
        assert all(rate > 0 for key, rate in r.items() if key != "context")
    assert set(report["best_chunk"].values()) <= {32, 64}
    assert report["linearity"]["exact KV"] > 0
    assert plot.stat().st_size > 0


def test_the_best_chunk_has_the_highest_geometric_mean_rate():
    rows = [{"context": 1, "a @1": 100.0, "a @2": 50.0}, {"context": 2, "a @1": 10.0, "a @2": 40.0}]
    assert best_chunk(rows, "a", [1, 2]) == 2  # sqrt(50*40) > sqrt(100*10)


def test_bad_chunks_are_one_error_line(tiny_models):
    result = CliRunner().invoke(app, ["bench", "prefill", "--model", str(tiny_models["llama3"]), "--chunks", "8"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: invalid --chunks '8'")
