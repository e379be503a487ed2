"""The policy: every knob of a run, as one frozen, validated dataclass passed down.

`Policy.from_kwargs(**kw)` is the only way user input becomes a policy: an unknown key or
a bad value is an `EdgekvError` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from .backends import BACKENDS
from .errors import EdgekvError

KV_BITS = (2, 4, 8, 16)
RECOMPUTE_BITS = (16, 8)
WEIGHT_BITS = (4, 8, 16)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KERNELS = ("auto", *BACKENDS)  # the decode backends (edgekv.backends) by name


@dataclass(frozen=True, slots=True)
class ScorerTraits:
    """What the policy needs to know of a block scorer (its code: `edgekv.selection`).

    mass: its scores are estimated attention mass, comparable across KV heads (what an
    adaptive head budget shares blocks by); key_copies: it keeps 4-bit copies of the keys.
    """

    mass: bool = False
    key_copies: bool = False


# The block scorers, by name: `edgekv.selection.SCORERS` implements exactly these.
SCORERS = {
    "keys4": ScorerTraits(key_copies=True),
    "mass": ScorerTraits(mass=True, key_copies=True),
    "minmax": ScorerTraits(),
    "mean": ScorerTraits(),
}
SCORER_NAMES = tuple(SCORERS)
MASS_SCORERS = tuple(name for name, traits in SCORERS.items() if traits.mass)
HEAD_BUDGETS = ("auto", "adaptive", "uniform")


def parse_recompute(value: float | str) -> float | str:
    """A recompute share: a number in [0, 1] (or a percentage, "50%"), or "auto".

    Returns a float, or "auto"."""
    problem = f"invalid recompute {value!r}: use a share of the offloaded blocks in [0, 1] (0.5 or 50%) or 'auto'"
    if isinstance(value, bool):
        raise EdgekvError(problem)
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise EdgekvError(problem) from None
    if not 0 <= share <= 1:
        raise EdgekvError(problem)
    return share


def parse_budget(value: int | str) -> int | str:
    """A sparse-attention budget: a token count (int >= 1), a fraction ("10%"), or "all".

    Returns the canonical form: an int, a string "N%" with 0 < N <= 100, or "all".
    """
    if isinstance(value, bool):
        raise EdgekvError(f"invalid budget {value!r}: use a token count (2048), a percentage ('10%') or 'all'")
    if isinstance(value, int):
        if value < 1:
            raise EdgekvError(f"invalid budget {value}: a token budget must be at least 1")
        return value
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return f"{pct:g}%"
        return parse_budget(int(text))
    except ValueError:
        raise EdgekvError(
            f"invalid budget {value!r}: use a token count (2048), a percentage ('10%') or 'all'"
        ) from None


@dataclass(frozen=True)
class CliOption:
    """How a policy key is set on the command line: its flag ("--x", or "--x/--no-x" for
    a switch), help text and the type typer parses (sizes and budgets stay strings:
    the policy parses them)."""

    flag: str
    help: str
    type: type


def _option(default: object, flag: str, help: str, cli_type: type = str):
    return field(default=default, metadata={"cli": CliOption(flag, help, cli_type)})


@dataclass(frozen=True, slots=True)
class Policy:
    """How one engine runs. Sizes are bytes, counts are tokens.

    device / dtype: where and in what precision weights and activations live
        ("auto": CUDA with bfloat16/float16 when present, else CPU with float32).
    weight_dtype: precision the projection weights are stored in ("auto": float16 on a
        CPU with float32 activations, where a decode step is bound by reading the weights;
        else the activation dtype). Decode steps multiply the stored weights, prefill
        chunks widen them to the activation dtype (`model.linear`).
    weight_bits: 16 (floats in weight_dtype), 8 or 4: projection weights as 8- or 4-bit
        codes with a scale and zero per group, decoded in registers (`edgekv.weights`:
        the output head at 8 bits, a GGUF file's blocks taken over exactly). "auto": for a
        model from a GGUF file, the bits its projection blocks fit exactly (4 for Q4_*,
        8 for 5-8-bit types: the file's own values, the fastest at its quality); 16 for
        a folder of float weights.
    prefill_chunk: tokens per prefill forward pass (bounds activation memory; the default is the
        fastest of 256, 512 and 1024 measured by `edgekv bench prefill` on a 2-core CPU).
    block_size: tokens per KV block (the paging, compression and selection unit).
    offload: True = the KV cache lives compressed in the tiers (device cache, RAM, disk);
        False = dense and exact in device memory, in the model's dtype (the reference path).
    kv_bits: precision of the offloaded KV blocks: 2, 4, 8 (quantized) or 16 (fp16).
    recent_window: newest tokens kept exact (uncompressed, on the device).
    device_cache_bytes / ram_bytes / disk_bytes: byte budgets of the tiers (ints, or
        strings such as "512MiB"); disk_dir: where the disk tier's file goes (None = the
        edgekv cache directory); disk_bytes 0 = no disk tier.
    budget: sparse-attention budget per decode step: tokens attended (sink blocks +
        top-k blocks + the exact recent tail) as a count (2048), a share of the context
        ("10%"), or "all" (every block: dense attention over the compressed KV).
    scorer: how blocks are ranked for selection ("mass", "keys4", "minmax", "mean"; see
        `edgekv.selection`).
    head_budget: "adaptive" (the KV heads of a layer share one budget by estimated
        attention mass, Ada-KV; needs scorer "mass"), "uniform" (the same blocks per
        head), or "auto": adaptive with a scorer that estimates mass, else uniform.
    sink_blocks: first blocks every step keeps (attention sinks; at least 1: block 0
        is always attended, from an exact copy).
    dense_layers: first layers that always attend every block.
    speculate: request layer l+1's blocks from an approximate query made at layer l
        (True, False, or "auto": on with CUDA, where the prefetch overlaps PCIe
        transfers; off on the CPU, where it would only add a second scoring pass).
    recompute: share of the offloaded blocks (0..1, or "50%") whose layer inputs are
        stored instead of their K/V, which decode steps recompute on the device with the
        layer's projections (`edgekv.recompute`, KVPR); "auto": the share
        `recompute.recompute_split` finds for this model, bit widths and device (off on
        the CPU, for GQA models and for compressed KV). 0: off.
    recompute_bits: bits of those stored inputs, 16 or 8 (8: a scale per channel and block).
    kernels: attention/compression kernels of the offloaded cache: "triton", "numba"
        (compiled CPU kernels for block scoring and sparse attention), "torch" (the
        reference twins) or "auto" (Triton on CUDA, numba on the CPU).
    threads: CPU threads for torch (0 = torch's default).
    """

    device: str = _option("auto", "--device", "auto, cpu or cuda.")
    dtype: str = _option("auto", "--dtype", "auto, float32, float16 or bfloat16.")
    weight_dtype: str = _option("auto", "--weight-dtype",
                                "Stored weight precision: auto (float16 on CPU), float32, float16 or bfloat16.")
    weight_bits: int | str = _option("auto", "--weight-bits", "Projection weights at 16, 8 or 4 bits; auto: the "
                                     "GGUF file's own blocks where it has them (4 or 8), else 16.")
    prefill_chunk: int = _option(1024, "--prefill-chunk", "Tokens per prefill pass (bounds memory).", int)
    block_size: int = _option(32, "--block-size", "Tokens per KV block.", int)
    offload: bool = _option(True, "--offload/--no-offload",
                            "Keep the KV cache compressed in the tiers (default) or dense and exact in device memory.",
                            bool)
    kv_bits: int = _option(4, "--kv-bits", "Bits per offloaded KV value: 2, 4 (default), 8 or 16.", int)
    recent_window: int = _option(64, "--recent-window", "Newest tokens kept exact (uncompressed).", int)
    device_cache_bytes: int | str = _option("512MiB", "--device-cache",
                                            "Device (GPU, or RAM on CPU) cache budget, e.g. 512MiB.")
    ram_bytes: int | str = _option("4GiB", "--ram", "Host RAM budget for KV blocks, e.g. 4GiB; colder blocks spill to disk.")
    disk_dir: str | None = _option(None, "--disk-dir", "Folder for the disk tier (default: the edgekv cache folder).")
    disk_bytes: int | str = _option("64GiB", "--disk-bytes", "Disk tier budget, e.g. 64GiB; 0 = no disk tier.")
    budget: int | str = _option("all", "--budget", "Tokens each decode step attends: 2048, 10% or all (default).")
    scorer: str = _option("keys4", "--scorer", f"Block scorer for --budget: {', '.join(SCORERS)} (default keys4).")
    head_budget: str = _option("auto", "--head-budget", "adaptive: KV heads share the budget by attention mass; "
                               "uniform: the same blocks per head; auto (default): adaptive with the mass scorer.")
    sink_blocks: int = _option(1, "--sink-blocks", "First blocks every step attends (default 1).", int)
    dense_layers: int = _option(0, "--dense-layers", "First layers that attend every block (default 0).", int)
    speculate: bool | str = _option("auto", "--speculate/--no-speculate",
                                    "Prefetch a layer's blocks one layer early (default: on with CUDA).", bool)
    recompute: float | str = _option(0.0, "--recompute", "Share of offloaded blocks whose K/V are recomputed from "
                                     "stored layer inputs instead of fetched: 0 (default), 0..1, 50% or auto.")
    recompute_bits: int = _option(16, "--recompute-bits", "Bits of the stored layer inputs: 16 (default) or 8.", int)
    kernels: str = _option("auto", "--kernels", f"Decode backend: auto (triton on CUDA, numba on CPU), "
                           f"{', '.join(BACKENDS)}.")
    threads: int = _option(0, "--threads", "CPU threads for torch (default: torch's choice).", int)

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise EdgekvError(f"invalid device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise EdgekvError(f"invalid dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.weight_dtype not in DTYPES:
            raise EdgekvError(f"invalid weight_dtype {self.weight_dtype!r}: use one of {', '.join(DTYPES)}")
        if isinstance(self.weight_bits, str) and self.weight_bits.strip().isdigit():  # from the command line
            object.__setattr__(self, "weight_bits", int(self.weight_bits))
        if self.weight_bits != "auto" and (isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS):
            raise EdgekvError(f"invalid weight_bits {self.weight_bits!r}: use 16, 8, 4 or auto")
        _require_int("prefill_chunk", self.prefill_chunk, minimum=1)
        _require_int("block_size", self.block_size, minimum=1)
        _require_int("recent_window", self.recent_window, minimum=0)
        _require_int("threads", self.threads, minimum=0)
        if self.kernels not in KERNELS:
            raise EdgekvError(f"invalid kernels {self.kernels!r}: use one of {', '.join(KERNELS)}")
        if self.kv_bits not in KV_BITS:
            raise EdgekvError(f"invalid kv_bits {self.kv_bits!r}: use one of {', '.join(map(str, KV_BITS))}")
        if not isinstance(self.offload, bool):
            raise EdgekvError(f"invalid offload {self.offload!r}: must be true or false")
        for name in ("device_cache_bytes", "ram_bytes", "disk_bytes"):
            object.__setattr__(self, name, _size(name, getattr(self, name)))
        if self.disk_dir is not None:
            object.__setattr__(self, "disk_dir", str(self.disk_dir))
        object.__setattr__(self, "budget", parse_budget(self.budget))
        if self.scorer not in SCORER_NAMES:
            raise EdgekvError(f"invalid scorer {self.scorer!r}: use one of {', '.join(SCORER_NAMES)}")
        if self.head_budget not in HEAD_BUDGETS:
            raise EdgekvError(f"invalid head_budget {self.head_budget!r}: use one of {', '.join(HEAD_BUDGETS)}")
        if self.head_budget == "adaptive" and self.scorer not in MASS_SCORERS:
            raise EdgekvError(f"head_budget 'adaptive' shares blocks between heads by attention mass, which scorer "
                              f"{self.scorer!r} does not estimate: use scorer 'mass', or head_budget 'uniform'")
        if not self.offload and self.budget != "all":
            raise EdgekvError(f"budget {self.budget!r} selects blocks of the offloaded KV cache, and offload is "
                              f"off: drop --no-offload, or use budget 'all'")
        _require_int("sink_blocks", self.sink_blocks, minimum=1)
        _require_int("dense_layers", self.dense_layers, minimum=0)
        if not isinstance(self.speculate, bool) and self.speculate != "auto":
            raise EdgekvError(f"invalid speculate {self.speculate!r}: must be true, false or 'auto'")
        object.__setattr__(self, "recompute", parse_recompute(self.recompute))
        if isinstance(self.recompute_bits, bool) or self.recompute_bits not in RECOMPUTE_BITS:
            raise EdgekvError(f"invalid recompute_bits {self.recompute_bits!r}: use 16 or 8")
        if not self.offload and self.recompute not in (0, "auto"):
            raise EdgekvError(f"recompute {self.recompute!r} recomputes blocks of the offloaded KV cache, and offload "
                              f"is off: drop --no-offload, or use recompute 0")

    @property
    def adaptive_heads(self) -> bool:
        """Whether the KV heads of a layer share one selection budget (head_budget resolved)."""
        return self.head_budget == "adaptive" or (self.head_budget == "auto" and self.scorer in MASS_SCORERS)

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "Policy":
        """Build a policy from user keywords; unknown keys are an error (with a suggestion)."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise EdgekvError(
                    f"unknown policy key {key!r}{hint}; known keys: {', '.join(sorted(known))}"
                )
        return cls(**kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> "Policy":
        """A copy with some keys changed, validated like `from_kwargs`."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        Policy.from_kwargs(**changes)  # reject unknown keys before merging
        merged.update(changes)
        return Policy(**merged)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def cli_options(cls) -> dict[str, CliOption]:
        """Policy key -> its command-line option: every knob of a run, in field order."""
        return {f.name: f.metadata["cli"] for f in dataclasses.fields(cls)}


def _size(name: str, value: object) -> int:
    """A byte count from an int or a size string ("512MiB", "2GiB")."""
    from .sizes import parse_size

    if isinstance(value, bool):
        raise EdgekvError(f"invalid {name} {value!r}: use a size such as 512MiB or 2GiB")
    if isinstance(value, int):
        if value < 0:
            raise EdgekvError(f"invalid {name} {value}: must be >= 0")
        return value
    try:
        return parse_size(str(value))
    except EdgekvError as exc:
        raise EdgekvError(f"invalid {name}: {exc}") from None


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EdgekvError(f"invalid {name} {value!r}: must be an integer >= {minimum}")
