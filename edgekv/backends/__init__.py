"""Decode backends: the device-specific half of a decode step of the offloaded cache.

`TieredKVCache` owns the data (the exact tail and sink, the block summaries, the store of
compressed rows) and decides how many blocks a step attends; a backend runs the step's
KV work on one device, reading that data where it lies:

    select(layer, q, num_blocks, k, ...)       -> block ids [Hkv, k']   which blocks to attend
    speculate(layer, q, num_blocks, k, ...)                             the same for a guessed
                                                                        query, one layer early:
                                                                        start moving its rows
    attend(layer, q, block_ids, num_blocks)    -> out [Hq, D]           over those rows + the
                                                                        exact sink and tail, in
                                                                        the model's basis

One backend per device, chosen once when the engine is built (the `kernels` policy key
names it; "auto" picks by device):

    name      class                                   device    kernels
    numba     `cpu.CpuBackend`         backends/cpu.py        CPU       compiled selection and attention
                                                                        (numba), rows read in place
    triton    `cuda.CudaBackend`       backends/cuda.py       CUDA      Triton; placement read on the
                                                                        device (no host round trip),
                                                                        misses read from pinned RAM,
                                                                        copies on a side stream
    torch     `reference.ReferenceBackend`  backends/reference.py  any  the torch twins, one call each

The reference backend is the specification: every other backend's tokens equal its
tokens (tested). Backends are imported lazily: a CPU run never imports Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from ..errors import EdgekvError

if TYPE_CHECKING:  # importing this registry must stay cheap: the CLI builds its options from it
    import torch

# name -> (module, class); the `kernels` policy key takes these names and "auto"
BACKENDS: dict[str, tuple[str, str]] = {
    "numba": ("cpu", "CpuBackend"),
    "triton": ("cuda", "CudaBackend"),
    "torch": ("reference", "ReferenceBackend"),
}


class DecodeBackend(Protocol):
    """What `TieredKVCache` asks of a backend (see the module doc). Shapes: q [Hq, D] in the
    model's dtype; block ids int64 [Hkv, k'] on the backend's device, ascending per head,
    block 0 (the exact sink) first, -1 after a head's blocks when heads share a budget."""

    name: str
    kernels: str  # the kernel family of `edgekv.kernels` for per-call kernels (compression)

    def pick(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
             adaptive: bool) -> torch.Tensor:
        """The blocks q selects among the first num_blocks: sink_blocks sinks, then the best,
        k per KV head (adaptive: k on average, heads sharing the budget by attention mass)."""

    def select(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
               adaptive: bool) -> torch.Tensor:
        """`pick` for a decode step's true query: counted (blocks attended, speculation hits)."""

    def speculate(self, layer: int, q: torch.Tensor, num_blocks: int, k: int, sink_blocks: int,
                  adaptive: bool) -> None:
        """`pick` for a guessed query: start moving the rows; `select` counts the hits."""

    def attend(self, layer: int, q: torch.Tensor, block_ids: torch.Tensor | None, num_blocks: int) -> torch.Tensor:
        """block_ids: the compressed blocks to attend besides block 0, or None: every one."""

    def blocks_added(self, row_ids: torch.Tensor) -> None:
        """Rows (int64 [n]) just put in the store by a commit."""

    def end_step(self) -> None:
        """A decode step's last layer is done."""

    def warm_up(self) -> None: ...

    def stats(self, decode_steps: int) -> dict: ...

    def reset_counters(self) -> None: ...

    def close(self) -> None: ...


def backend_name(kernels: str, device: torch.device) -> str:
    """The backend a `kernels` policy value means on `device` ("auto": by device)."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "numba"
    if kernels not in BACKENDS:
        raise EdgekvError(f"unknown kernels {kernels!r}: use auto or one of {', '.join(BACKENDS)}")
    if kernels == "numba" and device.type != "cpu":
        raise EdgekvError("the numba kernels run on the CPU: on CUDA use --kernels auto or triton")
    return kernels


def backend_class(name: str) -> type:
    """The class of backend `name` (its module imported now)."""
    module, cls = BACKENDS[name]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    except ImportError as exc:
        package = {"numba": "numba", "triton": "triton"}.get(name, "torch")
        raise EdgekvError(f"the {name} kernels need the `{package}` package: pip install {package} "
                          f"(or use --kernels torch)") from exc
