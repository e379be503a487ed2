"""The policy: every knob of a run, as one frozen, validated dataclass passed down.

`Policy.from_kwargs(**kw)` is the only way user input becomes a policy: an unknown key or
a bad value is an `EdgekvError` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from .errors import EdgekvError

KV_BITS = (2, 4, 8, 16)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KERNELS = ("auto", "triton", "torch", "numba")
SCORER_NAMES = ("mass", "keys4", "minmax", "mean")  # the registry of edgekv.selection
MASS_SCORERS = ("mass",)  # scores comparable across KV heads: what an adaptive head budget needs
HEAD_BUDGETS = ("auto", "adaptive", "uniform")


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


@dataclass(frozen=True, slots=True)
class Policy:
    """How one engine runs. Sizes are bytes, counts are tokens.

    device / dtype: where and in what precision weights and activations live
        ("auto": CUDA with bfloat16/float16 when present, else CPU with float32).
    weight_dtype: precision the projection weights are stored in ("auto": float16 on a
        CPU with float32 activations, where a decode step is bound by reading the weights;
        else the activation dtype). Decode steps multiply the stored weights, prefill
        chunks widen them to the activation dtype (`model.linear`).
    prefill_chunk: tokens per prefill forward pass (bounds activation memory).
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
    kernels: attention/compression kernels of the offloaded cache: "triton", "numba"
        (compiled CPU kernels for block scoring and sparse attention), "torch" (the
        reference twins) or "auto" (Triton on CUDA, numba on the CPU).
    threads: CPU threads for torch (0 = torch's default).
    """

    device: str = "auto"
    dtype: str = "auto"
    weight_dtype: str = "auto"
    prefill_chunk: int = 512
    block_size: int = 32
    offload: bool = True
    kv_bits: int = 4
    recent_window: int = 64
    device_cache_bytes: int | str = "512MiB"
    ram_bytes: int | str = "4GiB"
    disk_dir: str | None = None
    disk_bytes: int | str = "64GiB"
    budget: int | str = "all"
    scorer: str = "keys4"
    head_budget: str = "auto"
    sink_blocks: int = 1
    dense_layers: int = 0
    speculate: bool | str = "auto"
    kernels: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise EdgekvError(f"invalid device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise EdgekvError(f"invalid dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.weight_dtype not in DTYPES:
            raise EdgekvError(f"invalid weight_dtype {self.weight_dtype!r}: use one of {', '.join(DTYPES)}")
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
