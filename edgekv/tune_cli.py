"""`edgekv tune`: measure this machine, plan the policy for a model and a context, write a profile.

    edgekv tune --measure                      measure (a few minutes), plan, save as this-machine
    edgekv tune --context 32768 --explain      plan again from the last measurement, say why
    edgekv tune --hardware rtx4090-24gb --model PATH    plan with a shipped profile's figures
    edgekv tune --ram 4GiB                     plan as if only 4 GiB of RAM were free

`edgekv.cli` mounts `tune_command` on the app; every user-fixable problem is one
`error: …` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from .errors import EdgekvError


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except EdgekvError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


def _size(flag: str, text: Optional[str]) -> Optional[int]:
    from .sizes import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except EdgekvError as exc:
        raise EdgekvError(f"invalid {flag}: {exc}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def tune_command(
    model: Optional[str] = typer.Option(None, "--model", help="Hugging Face folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."),
    context: Optional[int] = typer.Option(None, "--context", help="Prompt tokens to plan for (default: the model's context less --new-tokens)."),
    new_tokens: int = typer.Option(256, "--new-tokens", help="Tokens generated per request (weighs decode against prefill)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the profile here (default: <edgekv cache>/profiles/<name>.toml)."),
    name: Optional[str] = typer.Option(None, "--name", help="The profile's name (default: this-machine, or <hardware>-for-<model>)."),
    measure: bool = typer.Option(False, "--measure", help="Measure this machine now: micro-benchmarks and short engine runs the cost model is fitted to (a few minutes)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Plan with the figures of this profile (a shipped name or a path) instead of this machine's last measurement."),
    explain: bool = typer.Option(False, "--explain", help="Say which resource binds, and why the runners-up lost."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Plan as if only this much RAM were free, e.g. 4GiB (default: available less headroom)."),
    disk: Optional[str] = typer.Option(None, "--disk", help="Most disk the KV tier may use, e.g. 20GiB (default: half the free space)."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="Most GPU memory the plan may use (default: free less 1 GiB)."),
    disk_dir: Optional[str] = typer.Option(None, "--disk-dir", help="Folder of the disk tier (default: the edgekv cache folder)."),
    quality_floor: float = typer.Option(0.88, "--quality-floor", help="Least teacher-forced top-1 agreement with dense a measured configuration must keep."),
    fix: Optional[list[str]] = typer.Option(None, "--fix", help="Pin a policy key, e.g. --fix kv_bits=4 (repeatable)."),
    note: Optional[str] = typer.Option(None, "--note", help="A line added to the profile's description (e.g. the machine's state)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --measure or --check: PNG of predicted vs measured decode tok/s over context."),
    check: bool = typer.Option(False, "--check", help="Check the cost model: run six policies at three contexts in turns (minutes) and print predicted vs measured tok/s, with the median and worst error."),
) -> None:
    """Measure the machine, pick the fastest policy that fits it and keeps the quality floor, write a profile."""
    with _user_errors():
        if check:
            return run_check(model=model, hardware=hardware, plot=plot, disk_dir=disk_dir, progress=True)
        run_tune(model=model, context=context, new_tokens=new_tokens, out=out, name=name, measure=measure,
                 hardware=hardware, explain=explain, ram=_size("--ram", ram), disk=_size("--disk", disk),
                 device_memory=_size("--device-memory", device_memory), disk_dir=disk_dir,
                 quality_floor=quality_floor, plot=plot, fixed=_fixed(fix or []), note=note)


def _fixed(pairs: list[str]) -> dict[str, object]:
    """`--fix key=value` pairs as policy keywords (values read as TOML: 4, true, "10%" or bare text)."""
    from .profiles import tomllib

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise EdgekvError(f"invalid --fix {pair!r}: write KEY=VALUE, e.g. --fix kv_bits=4")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip()] = value
    return out


def run_tune(*, model: Optional[str] = None, context: Optional[int] = None, new_tokens: int = 256,
             out: Optional[Path] = None, name: Optional[str] = None, measure: bool = False,
             hardware: Optional[str] = None, explain: bool = False, ram: Optional[int] = None,
             disk: Optional[int] = None, device_memory: Optional[int] = None, disk_dir: Optional[str] = None,
             quality_floor: float = 0.88, plot: Optional[Path] = None, fixed: Optional[dict] = None,
             note: Optional[str] = None, progress: bool = True) -> Path:
    """`tune_command` without typer: returns the path of the profile written."""
    from . import tune
    from .costmodel import fit_calibration, fit_report, plot_fit
    from .hardware import measure_engine_runs, measure_hardware, probe_capacity
    from .loader import load_config, resolve_model
    from .model import ModelShape
    from .profiles import ProfileModel, load_profile, profile_tables, user_dir, write_profile

    if measure and hardware:
        raise EdgekvError("--measure measures this machine and --hardware plans with another profile's figures: "
                          "give one of them")
    if not 0 < quality_floor <= 1:
        raise EdgekvError(f"invalid --quality-floor {quality_floor}: give a share between 0 and 1, e.g. 0.9")
    source = resolve_model(model, progress=progress)
    shape = ModelShape.from_config(load_config(source))
    context = context if context is not None else shape.max_context - new_tokens
    request = tune.Request(shape, source.name, source.identity, context, new_tokens)
    this_machine = user_dir() / "this-machine.toml"
    if measure:
        hw = measure_hardware(source, disk_dir=disk_dir, progress=progress)
        runs = measure_engine_runs(model, threads=hw.threads if hw.device_type == "cpu" else 0,
                                   disk_dir=disk_dir, progress=progress)
        cal = fit_calibration(runs, shape, hw)
        print(_fit_table(fit_report(runs, shape, hw, cal), cal), file=sys.stderr)
        if plot:
            plot_fit(runs, shape, hw, cal, plot)
            print(f"plot written to {plot}", file=sys.stderr)
        default_name = "this-machine"
    else:
        if plot:
            raise EdgekvError("--plot draws the fit to engine runs: add --measure")
        if hardware is None and not this_machine.is_file():
            raise EdgekvError("this machine has not been measured yet: run `edgekv tune --measure` (a few minutes), "
                              "or plan with a shipped profile's figures: --hardware NAME")
        base = load_profile(hardware or this_machine)
        hw, cal = base.hardware, base.calibration
        if hardware is None:  # this machine: its capacities now
            hw = hw.with_capacity(probe_capacity(disk_dir))
        default_name = "this-machine" if hardware is None else f"{base.name}-for-{_slug(source.name)}"
    limits = tune.limits_for(hw.capacity, ram=ram, disk=disk, device=device_memory, disk_dir=disk_dir)
    plan = tune.search(request, hw, cal, limits, floor=quality_floor, fixed=fixed)
    name = name or (out.stem if out else default_name)
    tables = profile_tables(
        name=name, description=f"{source.name} at {context} tokens + {new_tokens} new on {hw.device_name} "
                               f"({hw.cpu_name}, {hw.cpu_threads} threads)" + (f"; {note}" if note else ""),
        model=ProfileModel(source.name, source.identity, context, new_tokens, shape), hardware=hw,
        calibration=cal, policy=plan.policy_dict(), predictions=tune.prediction_table(plan))
    header = (f"edgekv hardware profile, written by `edgekv tune`.\nHardware figures: {hw.source}.\n"
              f"Use it with `--profile {name}` (or the path of this file); flags given with it override it.")
    path = write_profile(out or user_dir() / f"{name}.toml", tables, header)
    if measure and path != this_machine:
        write_profile(this_machine, {**tables, "name": "this-machine"}, header)  # the last measurement, reused later
    p = plan.prediction
    print(f"{plan.chosen.label()}: prefill {p.prefill_tok_s:,.0f} tok/s, decode {p.decode_tok_s:.1f} tok/s "
          f"(predicted; binds: {tune.binding_text(p, hw)})")
    if explain:
        print(tune.explain(plan))
    print(f"profile written to {path}; use it with --profile {name if out is None else path}", file=sys.stderr)
    return path


def run_check(*, model: Optional[str] = None, hardware: Optional[str] = None, plot: Optional[Path] = None,
              disk_dir: Optional[str] = None, progress: bool = True) -> dict:
    """`edgekv tune --check`: real engine runs (`hardware.check_plan`) against the cost
    model's predictions with the constants of this machine's last measurement (or of
    --hardware's profile). Returns {"rows": [...], "decode": {...}, "prefill": {...}}:
    per run the figures side by side, and the median and worst absolute relative error."""
    import statistics

    from .costmodel import fit_report, plot_fit
    from .hardware import check_plan, measure_engine_runs
    from .loader import load_config, resolve_model
    from .model import ModelShape
    from .profiles import load_profile, user_dir

    this_machine = user_dir() / "this-machine.toml"
    if hardware is None and not this_machine.is_file():
        raise EdgekvError("nothing to check yet: run `edgekv tune --measure` first (it fits the cost model "
                          "to this machine), or give --hardware NAME")
    base = load_profile(hardware or this_machine)
    source = resolve_model(model, progress=progress)
    shape = ModelShape.from_config(load_config(source))
    runs = measure_engine_runs(model, threads=base.hardware.threads if base.hardware.device_type == "cpu" else 0,
                               disk_dir=disk_dir, progress=progress, plan=check_plan(shape.max_context))
    rows = fit_report(runs, shape, base.hardware, base.calibration)
    errors = {kind: [abs(r[f"predicted_{kind}_tok_s"] / r[f"{kind}_tok_s"] - 1) for r in rows if r[f"{kind}_tok_s"]]
              for kind in ("decode", "prefill")}
    summary = {kind: {"median": statistics.median(e), "worst": max(e)} for kind, e in errors.items() if e}
    print(_fit_table(rows, base.calibration).rsplit("\n", 1)[0])
    for kind, s in summary.items():
        print(f"{kind}: median absolute error {s['median']:.1%}, worst {s['worst']:.1%} over {len(errors[kind])} runs "
              f"(constants from {base.path})")
    if plot:
        plot_fit(runs, shape, base.hardware, base.calibration, plot)
        print(f"plot written to {plot}", file=sys.stderr)
    return {"rows": rows, **summary}


def _fit_table(rows: list[dict], cal) -> str:
    """Measured vs predicted per engine run, and the fit's RMS error."""
    lines = [f"{'run':<36} {'context':>7} {'decode tok/s':>13} {'predicted':>10} {'prefill tok/s':>14} "
             f"{'predicted':>10}"]
    for r in rows:
        decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        prefill = f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-"
        lines.append(f"{r['label']:<36} {r['context']:>7} {decode:>13} {r['predicted_decode_tok_s']:>10.1f} "
                     f"{prefill:>14} {r['predicted_prefill_tok_s']:>10.0f}")
    lines.append(f"cost model fitted to {cal.fit_runs} runs: RMS error {cal.fit_rms_rel_error:.1%}")
    return "\n".join(lines)
