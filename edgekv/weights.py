"""A model's weights as the decoder keeps them: float, or 4/8-bit (`weight_bits`).

    weight_bits 16   every tensor as stored in the model folder (then `weight_dtype`)
    weight_bits 4/8  projection weights (q/k/v/o, gate/up/down) as `QuantizedWeight`s of
                     that many bits; the output head at 8 bits (the logits are the
                     most sensitive product); the token embedding looked up in the
                     output head's table when the two are tied (only the rows a prompt
                     uses are decoded), else its own 8-bit table; norms and biases float

Where the model came from a GGUF file, its blocks are taken over exactly when their
type maps onto the format at those bits (`kernels.qlinear.from_gguf`: Q4_0/Q4_1/Q4_K at
4 bits, Q8_0/Q5_x/Q6_K at 8): the weights are then the very values of the file, with
no second rounding. Other tensors are quantized from the float weights
(`quantize_weight`). The result is cached under the edgekv cache folder
(``quantized/<model>-<identity>/4bit.safetensors``) so a second load reads it directly.

`LazyState` reads a safetensors folder one tensor at a time, so quantizing a large model
never holds all of its float weights at once.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import EdgekvError

WEIGHT_BITS = (4, 8, 16)
HEAD_BITS = 8  # the output head's bits when weight_bits < 16
CACHE_FORMAT = 1
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def is_projection(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)


def quantized_bits(name: str, weight_bits: int) -> int | None:
    """The bits tensor `name` is kept at, or None: kept float."""
    if weight_bits == 16:
        return None
    if is_projection(name):
        return weight_bits
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return HEAD_BITS
    return None


class LazyState(Mapping):
    """The tensors of a model folder's safetensors files, read on access (not kept)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            if file.name.startswith("quantized-"):
                continue
            try:
                with safe_open(str(file), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on a damaged file
                raise EdgekvError(f"corrupt or truncated weights file {file}: {exc}. "
                                  f"Re-download or re-convert the model") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


# ---- GGUF: blocks taken over as they are ------------------------------------------------------

_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF tensor that may be quantized (projections, head, embedding)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
    return None


def gguf_quantized(path: Path, config, weight_bits: int) -> dict:
    """The tensors of GGUF file `path` whose blocks map exactly onto the format at the
    bits they are kept at (`quantized_bits`): {transformers name: QuantizedWeight}."""
    from gguf import GGUFReader

    from .kernels.qlinear import from_gguf, transformers_row_order

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field else ""
    out = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        bits = None if name is None else quantized_bits(name, weight_bits)
        if bits is None:
            continue
        shape = tuple(int(s) for s in reversed(tensor.shape))
        qw = from_gguf(tensor.tensor_type, tensor.data, shape)
        if qw is None or qw.bits != bits:
            continue  # quantized from the floats instead
        order = transformers_row_order(architecture, tensor.name, config.num_attention_heads,
                                       config.num_key_value_heads or config.num_attention_heads, shape[0])
        out[name] = qw if order is None else qw.take_rows(order)
    return out


# ---- the cache beside the converted model --------------------------------------------------------

def _cache_file(source, weight_bits: int) -> Path:
    """<edgekv cache>/quantized/<model>-<identity>/<bits>bit.safetensors: never inside the
    model's folder (it may be read-only, and its files are what identifies the model)."""
    from .loader import cache_root

    return cache_root() / "quantized" / f"{source.name}-{source.identity}" / f"{weight_bits}bit.safetensors"


def _save(file: Path, weights: dict) -> None:
    """Write {name: QuantizedWeight} atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors, forms = {}, {}
    for name, qw in weights.items():
        for part, t in qw.rows().items():
            if t is not None:
                tensors[f"{name}::{part}"] = t.contiguous()
        forms[name] = [qw.bits, qw.in_features, qw.group_size, qw.super_groups]
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
        os.close(fd)
    except OSError:
        return  # a cache that cannot be written is rebuilt next time
    try:
        save_file(tensors, tmp, metadata={"edgekv": json.dumps({"format": CACHE_FORMAT, "forms": forms})})
        os.replace(tmp, file)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a cache that cannot be written is rebuilt next time


def _load(file: Path) -> dict | None:
    """{name: QuantizedWeight} from a cache file, or None when absent, damaged or of another format."""
    from safetensors import safe_open

    from .kernels.qlinear import QuantizedWeight

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["edgekv"])
            if meta.get("format") != CACHE_FORMAT:
                return None
            out = {}
            for name, (bits, in_features, group_size, super_groups) in meta["forms"].items():
                parts = {part: f.get_tensor(f"{name}::{part}") if f"{name}::{part}" in f.keys() else None
                         for part in ("codes", "scale", "zero", "super_scale", "super_zero")}
                out[name] = QuantizedWeight.from_rows(bits, in_features, group_size, **parts,
                                                      super_groups=super_groups)
            return out
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None


class QuantizedState(Mapping):
    """A state dict whose quantized tensors (`quantized_bits`) are `QuantizedWeight`s: from
    `exact` (GGUF blocks) where present, else quantized from `floats` on access."""

    def __init__(self, floats: Mapping, exact: dict, weight_bits: int):
        self.floats, self.exact, self.weight_bits = floats, exact, weight_bits

    def __getitem__(self, name: str):
        from .kernels.qlinear import quantize_weight

        if name in self.exact:
            return self.exact[name]
        bits = quantized_bits(name, self.weight_bits)
        tensor = self.floats[name]
        return tensor if bits is None else quantize_weight(tensor.float(), bits)

    def __contains__(self, name: object) -> bool:
        return name in self.exact or name in self.floats

    def __iter__(self) -> Iterator[str]:
        return iter(self.floats)

    def __len__(self) -> int:
        return len(self.floats)


def load_weights(source, config, weight_bits: int) -> Mapping:
    """The state dict of `source` for a decoder with `weight_bits` (see the module doc)."""
    if weight_bits not in WEIGHT_BITS:
        raise EdgekvError(f"invalid weight_bits {weight_bits!r}: use 16, 8 or 4")
    floats = LazyState(source.folder)
    if weight_bits == 16:
        return floats
    cache = _cache_file(source, weight_bits)
    cached = _load(cache)
    if cached is not None:
        return QuantizedState(floats, cached, weight_bits)
    gguf = gguf_source(source.folder)
    exact = gguf_quantized(gguf, config, weight_bits) if gguf is not None else {}
    state = QuantizedState(floats, exact, weight_bits)
    everything = {name: state[name] for name in floats if quantized_bits(name, weight_bits) is not None}
    _save(cache, everything)
    return QuantizedState(floats, everything, weight_bits)


def exact_bits(path: Path) -> int:
    """The bits at which every projection block of GGUF file `path` maps exactly: 4 when
    all are Q4_0/Q4_1/Q4_K, else 8 (5- to 8-bit blocks; anything else is re-quantized)."""
    from gguf import GGUFReader

    four = {"Q4_0", "Q4_1", "Q4_K"}
    types = {t.tensor_type.name for t in GGUFReader(str(path)).tensors
             if (name := _hf_name(t.name)) is not None and is_projection(name)}
    return 4 if types and types <= four else 8


def gguf_source(folder: Path) -> Path | None:
    """The GGUF file a converted folder came from, when it is still there."""
    marker = folder / "edgekv-converted.json"
    try:
        path = Path(json.loads(marker.read_text())["source"])
    except (OSError, ValueError, KeyError):
        return None
    return path if path.is_file() else None


def weight_bytes(model) -> dict[str, int]:
    """Bytes of a decoder's weights per device ({"cuda": n} or {"cpu": n}), quantized
    tensors at their packed size."""
    from .kernels.qlinear import QuantizedWeight

    out: dict[str, int] = {}
    for t in model.weights():
        if isinstance(t, QuantizedWeight):
            n, device = t.nbytes, t.device
        else:
            n, device = t.numel() * t.element_size(), t.device
        out[device.type] = out.get(device.type, 0) + n
    return out


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int = 64) -> int:
    """Bytes of a [rows, cols] weight quantized from floats (`quantize_weight`'s flat form):
    codes plus an fp16 scale per group (and an fp16 zero at 4 bits), rows padded to tiles
    of 32."""
    padded = -(-rows // 32) * 32
    groups = -(-cols // group_size)
    per_group = group_size // 2 + 4 if bits == 4 else group_size + 2
    return padded * groups * per_group


def weights_nbytes(config, weight_bits: int, *, weight_dtype_bytes: int = 2, dtype_bytes: int = 4) -> int:
    """Bytes a decoder holds for `config`'s weights at `weight_bits`, every tensor quantized
    from floats: the accounting `edgekv info` prints and the tuner plans with (a GGUF
    file's own blocks differ by their group sizes). 16 bits: projections and the output
    head in `weight_dtype_bytes`, the embedding (and norms, biases) in the activations'
    `dtype_bytes`; 4/8 bits: the output head at 8 bits, a tied embedding read from it."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    inter, vocab = config.intermediate_size, config.vocab_size
    tied = getattr(config, "tie_word_embeddings", False)
    shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)]  # qkv, o, gate_up, down (stacked)
    if weight_bits == 16:
        per_layer = sum(r * c for r, c in shapes) * weight_dtype_bytes
        tables = vocab * h * (dtype_bytes + weight_dtype_bytes)  # embedding, head (a copy when tied)
    else:
        per_layer = sum(quantized_nbytes(r, c, weight_bits) for r, c in shapes)
        tables = quantized_nbytes(vocab, h, HEAD_BITS) * (1 if tied else 2)
    norms = (2 * n_layers + 1) * h * dtype_bytes
    return n_layers * per_layer + tables + norms
