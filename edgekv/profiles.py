"""Hardware profiles: a machine's figures, the policy tuned for a model on it, and why.

A profile is a TOML file (`FORMAT` below) that `edgekv tune` writes and `--profile NAME|PATH`
reads:

    format = 1                          name, description, created, edgekv_version
    [model]        who it was tuned for (ModelSource name and identity), context, new
                   tokens, and the model's shape (so the plan can be re-made elsewhere)
    [hardware]     `HardwareFigures`: measured (`source = "measured on …"`) or published
                   (`source = "published: …"`) figures, and the capacities
    [calibration]  the cost model's fitted constants (`costmodel.Calibration`)
    [policy]       the chosen policy: Policy keys only
    [predictions]  what the cost model predicted for it (tok/s, bytes per tier, what binds)

`load_profile(name_or_path)` reads and checks one (a bare name is a shipped profile in
`profiles/`, else one `edgekv tune` saved under the user's cache); `profile_policy`
checks it against the model and this machine and returns the policy keywords. Every
problem is one `EdgekvError` line naming the fix.

Writing: a small writer for these flat tables (`dumps`), not a dependency: the tables
hold only strings, numbers and booleans, and `tomllib` reads the result back (tested).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Policy
from .costmodel import Calibration
from .errors import EdgekvError
from .hardware import HARDWARE_FIELDS, Capacity, HardwareFigures
from .model import ModelShape
from .sizes import format_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML through the tomli backport
    import tomli as tomllib

FORMAT = 1
TABLES = ("model", "hardware", "calibration", "policy", "predictions")
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelShape))


@dataclass(frozen=True, slots=True)
class ProfileModel:
    """The model a profile was tuned for, and the request it was tuned for."""

    name: str
    identity: str
    context: int
    new_tokens: int
    shape: ModelShape


@dataclass(frozen=True, slots=True)
class Profile:
    """One loaded and checked profile (see the module doc)."""

    name: str
    path: str
    description: str
    created: str
    edgekv_version: str
    model: ProfileModel
    hardware: HardwareFigures
    calibration: Calibration
    policy: Mapping[str, object]  # Policy keys only, validated
    predictions: Mapping[str, object]


# ---- finding ---------------------------------------------------------------------------------

def shipped_dir() -> Path:
    """The profiles shipped with edgekv: `edgekv/profile_data/` in an installed wheel (the
    package data `edgekv.profile_data`, mapped from `profiles/`), else the checkout's
    `profiles/` beside the package (a source tree or an editable install)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "profile_data", here.parent / "profiles"):
        if folder.is_dir():
            return folder
    return here / "profile_data"


def user_dir() -> Path:
    """Where `edgekv tune` saves profiles by default: <edgekv cache>/profiles."""
    from .loader import cache_root

    return cache_root() / "profiles"


def profile_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def resolve_profile(name_or_path: str | os.PathLike) -> Path:
    """A path as given (when it names a file or ends in .toml), else shipped/<name>.toml, else
    the user's <name>.toml; an unknown name is an error listing the known ones."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".toml") or os.sep in text:
        if not path.is_file():
            raise EdgekvError(f"profile file not found: {path} (give a profile name or the path of a .toml file)")
        return path
    for folder in (shipped_dir(), user_dir()):
        if (folder / f"{text}.toml").is_file():
            return folder / f"{text}.toml"
    shipped, saved = profile_names(shipped_dir()), profile_names(user_dir())
    close = difflib.get_close_matches(text, shipped + saved, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    mine = f"; saved by edgekv tune: {', '.join(saved)}" if saved else ""
    raise EdgekvError(f"unknown profile {text!r}{hint}: shipped profiles are {', '.join(shipped) or 'none'}{mine}; "
                      f"or give the path of a .toml file")


# ---- reading ---------------------------------------------------------------------------------

def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Read and check a profile: a shipped name, a saved name, or a path."""
    path = resolve_profile(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise EdgekvError(f"profile {path} is not valid TOML ({exc}): fix the file or write it again with "
                          f"`edgekv tune --out {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekvError(f"cannot read profile {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_profile(data, path)


def parse_profile(data: Mapping, path: str | os.PathLike = "<profile>") -> Profile:
    """Check the parsed TOML of a profile and build it."""
    where = f"profile {path}"
    redo = f"write it again with `edgekv tune --out {path}`"
    version = data.get("format")
    if version is None:
        raise EdgekvError(f"{where} has no `format` key: it is not an edgekv profile, or {redo}")
    if version != FORMAT:
        raise EdgekvError(f"{where} has format {version!r}, and this edgekv reads format {FORMAT}: "
                          f"the profile is out of date; {redo}")
    for table in TABLES:
        if not isinstance(data.get(table), dict):
            raise EdgekvError(f"{where} lacks its [{table}] table: {redo}")
    model, hw, cal, policy, predictions = (data[t] for t in TABLES)
    _require(model, ("name", "identity", "context", "new_tokens", *SHAPE_FIELDS), f"{where} [model]", redo)
    _require(hw, HARDWARE_FIELDS, f"{where} [hardware]", redo)
    _known(hw, HARDWARE_FIELDS, f"{where} [hardware]")
    _known(cal, tuple(f.name for f in dataclasses.fields(Calibration)), f"{where} [calibration]")
    try:
        Policy.from_kwargs(**policy)
        shape = ModelShape(**{k: model[k] for k in SHAPE_FIELDS})
        figures = HardwareFigures(**{k: _typed(HardwareFigures, k, v) for k, v in hw.items()})
        calibration = Calibration(**{k: _typed(Calibration, k, v) for k, v in cal.items()})
    except EdgekvError as exc:
        raise EdgekvError(f"{where} [policy]: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise EdgekvError(f"{where} has a value of the wrong type ({exc}): {redo}") from None
    source = str(figures.source)
    if not (source.startswith("measured on ") or source.startswith("published: ")):
        raise EdgekvError(f"{where} [hardware] source must say where its figures come from "
                          f"(\"measured on …\" or \"published: …\"), not {source!r}")
    return Profile(name=str(data.get("name", Path(path).stem)), path=str(path),
                   description=str(data.get("description", "")), created=str(data.get("created", "")),
                   edgekv_version=str(data.get("edgekv_version", "")),
                   model=ProfileModel(str(model["name"]), str(model["identity"]), int(model["context"]),
                                      int(model["new_tokens"]), shape),
                   hardware=figures, calibration=calibration, policy=dict(policy), predictions=dict(predictions))


def _require(table: Mapping, keys, where: str, redo: str) -> None:
    missing = [k for k in keys if k not in table]
    if missing:
        raise EdgekvError(f"{where} lacks {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}: {redo}")


def _known(table: Mapping, keys, where: str) -> None:
    for key in table:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgekvError(f"{where} has an unknown key {key!r}{hint}")


def _typed(cls, name: str, value):
    """A TOML value as the dataclass field's type (ints read where floats are declared)."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if kind in ("float", float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in ("int", int) and not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if kind in ("str", str) and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


# ---- checking against a model and a machine ------------------------------------------------

def profile_policy(profile: Profile, model_source, machine_capacity: Capacity,
                   overrides: Mapping[str, object] | None = None) -> dict[str, object]:
    """The policy keywords of `profile` for `model_source` (an `edgekv.loader.ModelSource`) on a
    machine of `machine_capacity`, explicit `overrides` (flags the user set) taking precedence.

    Checks: the profile was tuned for this model; its sizes fit this machine (RAM, device
    memory, free disk); it does not ask for CUDA where there is none. Each failure is an
    EdgekvError naming the fix."""
    name = profile.name
    if model_source.identity != profile.model.identity:
        raise EdgekvError(
            f"profile {name!r} was tuned for {profile.model.name} (identity {profile.model.identity}), not for "
            f"{model_source.name} (identity {model_source.identity}): plan for this model with "
            f"`edgekv tune --model PATH --hardware {name}`, or use a profile made for it")
    merged = {**profile.policy, **(overrides or {})}
    policy = Policy.from_kwargs(**merged)
    cap = machine_capacity
    redo = f"run `edgekv tune` on this machine, or override the size with its flag"
    if str(policy.device).startswith("cuda") and not cap.has_cuda:
        raise EdgekvError(f"profile {name!r} runs on CUDA, and this machine has no CUDA GPU: use a CPU profile "
                          f"or run `edgekv tune` here (or pass --device cpu)")
    on_cpu = not str(policy.device).startswith("cuda") and not (policy.device == "auto" and cap.has_cuda)
    ram = policy.ram_bytes + (policy.device_cache_bytes if on_cpu else 0) if policy.offload else 0
    if ram > cap.ram_total_bytes:
        raise EdgekvError(f"profile {name!r} plans {format_size(ram)} of RAM for the KV cache, more than this "
                          f"machine's {format_size(cap.ram_total_bytes)}: {redo} (--ram, --device-cache)")
    if policy.offload and not on_cpu and policy.device_cache_bytes > cap.device_total_bytes:
        raise EdgekvError(f"profile {name!r} plans a device cache of {format_size(policy.device_cache_bytes)}, more "
                          f"than this GPU's {format_size(cap.device_total_bytes)}: {redo} (--device-cache)")
    planned_ram, planned_device = (int(profile.predictions.get(k, 0)) for k in ("host_ram_bytes", "device_mem_bytes"))
    if planned_ram > cap.ram_total_bytes:
        raise EdgekvError(f"profile {name!r} plans {format_size(planned_ram)} of RAM in all (weights, KV, scratch), "
                          f"more than this machine's {format_size(cap.ram_total_bytes)}: {redo}")
    if not on_cpu and planned_device > cap.device_total_bytes:
        raise EdgekvError(f"profile {name!r} plans {format_size(planned_device)} of GPU memory, more than this GPU's "
                          f"{format_size(cap.device_total_bytes)}: {redo}")
    if policy.offload and policy.disk_bytes > cap.disk_free_bytes:
        raise EdgekvError(f"profile {name!r} plans a disk tier of {format_size(policy.disk_bytes)}, more than the "
                          f"{format_size(cap.disk_free_bytes)} free where it goes: {redo} (--disk-bytes, --disk-dir)")
    return merged


def policy_from_profile(name_or_path: str | os.PathLike, model: str | os.PathLike | None = None,
                        overrides: Mapping[str, object] | None = None) -> dict[str, object]:
    """What `--profile NAME|PATH` hands to `edgekv.load(model, **policy)`: the profile read,
    checked against the model (None: the embedded one) and this machine's capacity now,
    the flags the user gave (`overrides`) taking precedence."""
    from .hardware import probe_capacity
    from .loader import resolve_model

    profile = load_profile(name_or_path)
    where = (overrides or {}).get("disk_dir") or profile.policy.get("disk_dir")
    return profile_policy(profile, resolve_model(model), probe_capacity(where), overrides)


# ---- writing ---------------------------------------------------------------------------------

def profile_tables(*, name: str, description: str, model: ProfileModel, hardware: HardwareFigures,
                   calibration: Calibration, policy: Mapping[str, object],
                   predictions: Mapping[str, object]) -> dict:
    """A profile as the nested dict `dumps` writes (and `parse_profile` reads back)."""
    model_table = {"name": model.name, "identity": model.identity, "context": model.context,
                   "new_tokens": model.new_tokens, **dataclasses.asdict(model.shape)}
    return {"format": FORMAT, "name": name, "description": description, "created": time.strftime("%Y-%m-%d"),
            "edgekv_version": edgekv_version(), "model": model_table, "hardware": dataclasses.asdict(hardware),
            "calibration": dataclasses.asdict(calibration), "policy": dict(policy), "predictions": dict(predictions)}


def edgekv_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgekv")
    except PackageNotFoundError:
        return "unknown"


def write_profile(path: str | os.PathLike, tables: Mapping, header: str = "") -> Path:
    """Write a profile atomically (a temporary file renamed into place); returns the path."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(dumps(tables, header), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise EdgekvError(f"cannot write the profile to {path}: {exc.strerror or exc}") from None
    return path


def dumps(tables: Mapping, header: str = "") -> str:
    """TOML for a dict of top-level scalars and tables of scalars (None values left out)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{key} = {_value(v)}" for key, v in tables.items() if not isinstance(v, Mapping) and v is not None]
    for key, table in tables.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_key(key)}]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also wants DEL escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to a profile")
