"""The `edgekv` command line: generate, chat, info, bench, cache, tune.

Every user-fixable problem becomes one `error: …` line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from typer.core import TyperGroup

from .errors import EdgekvError


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) as one `error: …` line and exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: D102
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
                sys.exit(0)
            message = " ".join(exc.format_message().split()) if hasattr(exc, "format_message") else str(exc)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {message}{hint}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long-context LLM inference with an offloaded, compressed KV cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side benchmarks (ratios measured in one run).")
app.add_typer(bench_app, name="bench")


class Truncate(str, Enum):
    head = "head"
    tail = "tail"
    middle = "middle"


def fail(message: str) -> None:
    """Print one error line and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn EdgekvError into one line + exit 2; Ctrl+C into exit 130 without a traceback."""
    try:
        yield
    except EdgekvError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


ModelOpt = typer.Option(None, "--model", help="Hugging Face folder or .gguf file (default: embedded SmolLM2-135M-Instruct).")


def policy_options(*keys: str, profile: bool = True) -> Callable:
    """Give a command the command-line options of policy keys (default: every key), built
    from `Policy.cli_options` (flag, help, type), and `--profile NAME|PATH` (a hardware
    profile of `edgekv tune`); the command receives ``policy: dict`` (policy key -> value):
    the profile's policy, checked against the command's --model and this machine, with
    the flags the user set on top."""
    from .config import Policy

    options = Policy.cli_options()
    chosen = list(keys or options)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(*args, **kwargs):
            policy = {key: value for key in chosen if (value := kwargs.pop(key, None)) is not None}
            named = kwargs.pop("profile", None)
            if named is not None:
                from .profiles import policy_from_profile

                with user_errors():
                    policy = policy_from_profile(named, kwargs.get("model"), overrides=policy)
            return fn(*args, policy=policy, **kwargs)

        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "policy"]
        added = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[options[key].type],
                                   default=typer.Option(None, options[key].flag, help=options[key].help))
                 for key in chosen]
        if profile:
            added.append(inspect.Parameter(
                "profile", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                default=typer.Option(None, "--profile", help="A hardware profile (a shipped name, one `edgekv tune` "
                                     "saved, or a .toml path): its policy, under the flags given here.")))
        command.__signature__ = inspect.signature(fn).replace(parameters=own + added)
        command.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "policy"},
                                   **{p.name: p.annotation for p in added}}
        return command

    return decorate


@app.command()
@policy_options()
def generate(
    path: str = typer.Argument(..., help="Document to read (UTF-8 text), or - for standard input."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction about the document."),
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    truncate: Optional[Truncate] = typer.Option(None, "--truncate", help="When too long, drop the document's head, tail or middle."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the run's figures as JSON here."),
    doc_cache: bool = typer.Option(True, "--doc-cache/--no-doc-cache", help="Reuse (and keep) the document's processed KV across runs."),
    doc_cache_dir: Optional[Path] = typer.Option(None, "--doc-cache-dir", help="Folder of the document cache (default: the edgekv cache folder)."),
    policy: dict = None,
) -> None:
    """Answer a question about a long document; the answer streams to stdout."""
    from .doccache import DocumentCache, default_cache_dir
    from .documents import document_messages, fit_document, read_document
    from .prefix_cache import ask_about_document
    from .report import ProgressBar, summary_line

    with user_errors():
        if not prompt.strip():
            raise EdgekvError("empty prompt: pass a question with --prompt")
        if max_new_tokens < 1:
            raise EdgekvError(f"invalid --max-new-tokens {max_new_tokens}: must be at least 1")
        document = read_document(path)
        from . import load

        engine = load(model, **policy)
        document = fit_document(engine, document, prompt, max_new_tokens=max_new_tokens,
                                truncate=truncate.value if truncate else None)
        total = engine.count_tokens(document_messages(document, prompt))
        progress = ProgressBar("prefill") if total > engine.policy.prefill_chunk else None

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        cache = DocumentCache(doc_cache_dir or default_cache_dir()) if doc_cache else None
        result = ask_about_document(engine, document, prompt, cache=cache, on_progress=progress,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, on_token=stream)
        sys.stdout.write("\n")
        typer.echo(summary_line(result.stats), err=True)
        if stats_json:
            write_json(stats_json, result.stats)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgekvError(f"cannot write {path}: {exc.strerror or exc}") from None


@app.command()
def info(model: Optional[str] = ModelOpt) -> None:
    """Print the model, device, library versions and memory."""
    import platform

    import psutil
    import torch

    from .loader import load_config, resolve_model
    from .model import ModelShape
    from .sizes import format_size

    from .weights import exact_bits, gguf_source, weights_nbytes

    with user_errors():
        source = resolve_model(model)
        config = load_config(source)
        shape = ModelShape.from_config(config)
        gguf = gguf_source(source.folder)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    mem = psutil.virtual_memory()
    lines = [
        f"model       {source.name}  ({source.folder})",
        f"shape       {shape.num_layers} layers, {shape.num_heads} heads / {shape.num_kv_heads} KV heads, "
        f"head dim {shape.head_dim}, hidden {shape.hidden_size}, vocab {shape.vocab_size}, context {shape.max_context}",
        f"KV per token {format_size(2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2)} at 16 bits",
        "weights     " + " · ".join(f"{bits}-bit {format_size(weights_nbytes(config, bits))}" for bits in (16, 8, 4))
        + "  (--weight-bits; the GGUF's own blocks: " + (f"{exact_bits(gguf)}-bit" if gguf else "none") + ")",
        f"python      {platform.python_version()}",
        f"torch       {torch.__version__}  (CUDA {torch.version.cuda or 'none'}, available: {torch.cuda.is_available()})",
        f"triton      {triton_version}",
        f"cpu         {psutil.cpu_count(logical=True)} threads, torch uses {torch.get_num_threads()}",
        f"memory      {format_size(mem.available)} available of {format_size(mem.total)}",
    ]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"gpu         {torch.cuda.get_device_name()}  {format_size(free)} free of {format_size(total)}")
    typer.echo("\n".join(lines))


@bench_app.command("speed")
@policy_options("threads")
def bench_speed(
    contexts: str = typer.Option("1024,4096", "--contexts", help="Comma-separated context lengths (tokens)."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens decoded at each context."),
    model: Optional[str] = ModelOpt,
    plot: Path = typer.Option(Path("bench-speed.png"), "--plot", help="Where to write the PNG plot."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the figures as JSON here."),
    budgets: str = typer.Option("", "--budgets", help="Sparse budgets to time too (e.g. 10%,2048), vs edgekv dense."),
    weight_bits: str = typer.Option("", "--weight-bits", help="Time every edgekv configuration at each of these "
                                    "weight widths (e.g. 16,8,4; default: the model's own)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="A git ref of this checkout whose edgekv runs each "
                                           "configuration too, in turns (before/after a change)."),
    transformers: bool = typer.Option(True, "--transformers/--no-transformers",
                                      help="Time transformers too (its ratios are left out without it)."),
    policy: dict = None,
) -> None:
    """Prefill and decode tok/s of edgekv vs transformers' generate (and llama.cpp), side by
    side; with --profile, the profile's policy is one more configuration."""
    threads = policy.pop("threads", None)
    from .bench_speed import parse_contexts, run_speed_bench
    from .config import parse_budget

    with user_errors():
        budget_list = [parse_budget(b.strip()) for b in budgets.split(",") if b.strip()]
        try:
            bits_list = [int(b) for b in weight_bits.split(",") if b.strip()]
        except ValueError:
            raise EdgekvError(f"invalid --weight-bits {weight_bits!r}: give a list such as 16,8,4") from None
        rows = run_speed_bench(model, parse_contexts(contexts), decode_tokens=decode_tokens,
                               plot=plot, threads=threads, budgets=budget_list, baseline=baseline,
                               weight_bits=bits_list, profile_policy=policy or None, transformers=transformers)
        if stats_json:
            write_json(stats_json, {"rows": rows})


@bench_app.command("prefill")
@policy_options("threads", profile=False)
def bench_prefill(
    contexts: str = typer.Option("1024,2048,4096,8000", "--contexts", help="Comma-separated context lengths (tokens)."),
    chunks: str = typer.Option("256,512,1024,2048", "--chunks", help="Comma-separated prefill chunk sizes to compare."),
    repeats: int = typer.Option(2, "--repeats", help="Rounds per figure (the fastest is kept)."),
    transformers: bool = typer.Option(True, "--transformers/--no-transformers", help="Time transformers' forward too."),
    model: Optional[str] = ModelOpt,
    plot: Path = typer.Option(Path("bench-prefill.png"), "--plot", help="Where to write the PNG plot."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the figures as JSON here."),
    policy: dict = None,
) -> None:
    """Prefill tok/s over context and chunk size: exact KV, 4-bit tiers and transformers."""
    from .bench_prefill import run_prefill_bench
    from .bench_speed import parse_contexts

    with user_errors():
        report = run_prefill_bench(model, parse_contexts(contexts), parse_contexts(chunks, "--chunks"),
                                   repeats=repeats, transformers=transformers, plot=plot,
                                   threads=policy.get("threads"))
        if stats_json:
            write_json(stats_json, report)


@bench_app.command("quality")
@policy_options("dense_layers", "sink_blocks", "speculate", profile=False)
def bench_quality(
    kv_bits: str = typer.Option("16,8,4,2", "--kv-bits", help="Comma-separated KV bit widths to compare (16, 8, 4, 2)."),
    budgets: str = typer.Option("all", "--budgets", help="Comma-separated attention budgets (all, 2048, 10%)."),
    weight_bits: str = typer.Option("auto", "--weight-bits", help="Comma-separated weight bit widths to compare "
                                    "(16, 8, 4; auto: the model's own). The dense reference keeps the model's own."),
    tasks: str = typer.Option("kld,ppl,agreement", "--tasks",
                              help="Any of kld, ppl, agreement, passkey, extract (comma-separated)."),
    kld_docs: int = typer.Option(4, "--kld-docs", help="kld: documents (even offsets through the text)."),
    kld_context: int = typer.Option(8192, "--kld-context", help="kld: tokens of each document."),
    kld_tokens: int = typer.Option(256, "--kld-tokens", help="kld: last tokens of each document scored as decode steps."),
    ppl_context: int = typer.Option(8192, "--ppl-context", help="Tokens of the perplexity document."),
    score_tokens: int = typer.Option(512, "--score-tokens", help="Last tokens scored as decode steps."),
    agreement_doc: int = typer.Option(1024, "--agreement-doc", help="Tokens of the document summarised."),
    agreement_tokens: int = typer.Option(64, "--agreement-tokens", help="Greedy tokens compared."),
    agreement_docs: int = typer.Option(4, "--agreement-docs", help="Documents summarised (even offsets through the text)."),
    passkey_context: str = typer.Option("4096", "--passkey-context", help="Tokens of each passkey haystack (comma-separated for several)."),
    passkey_trials: int = typer.Option(25, "--passkey-trials", help="Passkey trials per context (depths cycle 5%..95%)."),
    extract_contexts: str = typer.Option("4096", "--extract-contexts", help="extract: tokens of each source document "
                                         "(comma-separated for several)."),
    extract_trials: int = typer.Option(25, "--extract-trials", help="extract: questions per context (depths cycle 5%..95%)."),
    extract_kinds: str = typer.Option("default", "--extract-kinds", help="extract: question kinds, default (a "
                                      "parameter's default value) and/or return (what a function returns)."),
    trials_per_document: int = typer.Option(1, "--trials-per-document", help="passkey/extract: trials that share one "
                                            "document (one needle or question each, depths spread 5%..95%), its KV "
                                            "prefilled once per configuration; 1: a document per trial."),
    scorers: str = typer.Option("keys4", "--scorers", help="Comma-separated block scorers to compare at sparse budgets."),
    head_budgets: str = typer.Option("auto", "--head-budgets", help="Comma-separated head budgets (auto, adaptive, uniform) to compare at sparse budgets."),
    model: Optional[str] = ModelOpt,
    plot: Path = typer.Option(Path("bench-quality.png"), "--plot", help="Where to write the PNG plot."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the figures as JSON here."),
    policy: dict = None,
) -> None:
    """KL divergence from dense, perplexity, agreement, passkey and extraction of each configuration."""
    from .bench_quality import parse_configs, run_quality_bench
    from .bench_speed import parse_contexts

    with user_errors():
        configs = parse_configs(kv_bits, budgets, scorers, head_budgets, weight_bits, **policy)
        rows = run_quality_bench(model, configs, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                                 kld_docs=kld_docs, kld_context=kld_context, kld_tokens=kld_tokens,
                                 ppl_context=ppl_context, score_tokens=score_tokens, agreement_doc=agreement_doc,
                                 agreement_tokens=agreement_tokens, agreement_docs=agreement_docs,
                                 passkey_contexts=parse_contexts(passkey_context, "--passkey-context"),
                                 passkey_trials=passkey_trials,
                                 extract_contexts=parse_contexts(extract_contexts, "--extract-contexts"),
                                 extract_trials=extract_trials,
                                 extract_kinds=tuple(k.strip() for k in extract_kinds.split(",") if k.strip()),
                                 trials_per_document=trials_per_document, plot=plot)
        if stats_json:
            write_json(stats_json, {"rows": rows})


@bench_app.command("kernels")
def bench_kernels(
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    shapes: str = typer.Option("small", "--shapes", help="small, or llama8b (32/8 heads, head dim 128, 128K context); "
                               "with --aot a comma-separated list (small,llama8b)."),
    context: Optional[int] = typer.Option(None, "--context", help="Context tokens (default: the shape's; reduced on CPU)."),
    repeats: int = typer.Option(20, "--repeats", help="Timed repeats per kernel."),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the figures as JSON here."),
    aot: bool = typer.Option(False, "--aot", help="Compile every Triton kernel for sm_80, sm_89 and sm_90 (no GPU "
                             "needed) and print registers, spills, shared memory and occupancy instead."),
    targets: str = typer.Option("80,89,90", "--targets", help="With --aot: compute capabilities to compile for."),
) -> None:
    """Each kernel vs its torch twin, attention vs dense SDPA over 16-bit KV; achieved GB/s."""
    import torch

    from .bench_kernels import run_kernel_bench

    with user_errors():
        if aot:
            from .kernels.aot import aot_table, run_aot_report

            try:
                arches = [int(t) for t in targets.split(",") if t.strip()]
            except ValueError:
                raise EdgekvError(f"invalid --targets {targets!r}: give compute capabilities such as 80,89,90") from None
            rows = run_aot_report(tuple(x.strip() for x in shapes.split(",") if x.strip()), arches)
            typer.echo(aot_table(rows))
            if stats_json:
                write_json(stats_json, {"rows": rows})
            return
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = run_kernel_bench(device=device, shapes=shapes, context=context, repeats=repeats)
        if stats_json:
            write_json(stats_json, {"rows": rows})


@bench_app.command("gpu")
def bench_gpu(
    report: Path = typer.Option(Path("gpu-report.md"), "--report", help="Where to write the Markdown report."),
    dry_run: bool = typer.Option(False, "--dry-run", help="No GPU: run the end-to-end part on the CPU at a tiny shape."),
    tests: bool = typer.Option(True, "--tests/--no-tests", help="Run the GPU-relevant tests first."),
) -> None:
    """The prepared GPU check: CUDA tests, kernels at Llama-8B shape, 8B decode at 32K/128K."""
    from .bench_gpu import run_gpu_check

    with user_errors():
        run_gpu_check(report, dry_run=dry_run, tests=tests)


@bench_app.command("tiers")
def bench_tiers(
    doc_tokens: int = typer.Option(7800, "--doc-tokens", help="Tokens of the real document."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Greedy tokens generated per question."),
    bits: str = typer.Option("16,8,4,2", "--bits", help="KV bit widths whose host bytes are compared."),
    model: Optional[str] = ModelOpt,
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Write the figures as JSON here."),
) -> None:
    """Host bytes per bit width, disk spill vs all-in-RAM tokens, document-cache TTFT."""
    from .bench_tiers import run_tiers_bench

    with user_errors():
        try:
            bit_list = [int(b) for b in bits.split(",") if b.strip()]
        except ValueError:
            raise EdgekvError(f"invalid --bits {bits!r}: give a list such as 16,8,4,2") from None
        report = run_tiers_bench(model, doc_tokens=doc_tokens, new_tokens=new_tokens, bits=bit_list, plot=None)
        if stats_json:
            write_json(stats_json, report)


@app.command()
@policy_options()
def chat(
    model: Optional[str] = ModelOpt,
    doc: Optional[str] = typer.Option(None, "--doc", help="A document to attach at start."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    policy: dict = None,
) -> None:
    """A terminal chat with the model, showing where the KV cache lives."""
    with user_errors():
        from .config import Policy
        from .tui.app import run_chat

        Policy.from_kwargs(**policy)  # bad values fail here, before the app opens
        code = run_chat(model=model, doc=doc, policy=policy, max_new_tokens=max_new_tokens, temperature=temperature)
    raise typer.Exit(code)


def _mount_cache_app() -> None:
    from .cache_cli import cache_app

    app.add_typer(cache_app, name="cache", help="List, clear or prune the persistent document cache.")


_mount_cache_app()


def _mount_tune() -> None:
    from .tune_cli import tune_command

    app.command("tune")(tune_command)


_mount_tune()


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()
