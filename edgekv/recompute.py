"""Partial recomputation (KVPR): some blocks' K/V come back from the layer input, not the link.

A decode step of the offloaded cache moves the rows of the blocks it attends from host
memory to the device. For a share of the blocks (the *recompute blocks*) the store holds
the layer's normed attention input h instead of the K/V rows, and the step rebuilds
their K/V on the device with the layer's own projections (KVPR, arXiv 2411.17089):

    stored per recompute block and layer     the normed input h [block_size, hidden]
                                              (one activation row for every KV head)
    rebuilt at decode time                   k_pre = h @ W_kᵀ (+ b_k), times the rope scale
                                              v     = h @ W_vᵀ (+ b_v), then rotated
                                              (`edgekv.rotation`) like every stored value
                                              -> encoded in the cache's `BlockCodec`: the
                                              same row the attention kernels read

Why h after the input RMSNorm and not the residual stream x before it: the norm needs the
whole residual row (its root mean square over `hidden` values), so storing x saves
nothing, and h is exactly what the k/v projections read: no norm weight and no
per-token statistics are needed at recompute time, and RoPE is applied by the attention
kernels to every row anyway (rows hold keys before RoPE).

Per token and layer an activation row is `hidden` values while the K/V it replaces are
`2 * num_kv_heads * head_dim`: for GQA models and for compressed KV it is *more* bytes,
so recomputation only pays for MHA-like shapes with 16- or 8-bit KV. `recompute_split`
is the decision (KVPR's linear program over link bandwidth and GEMM throughput), with a
one-line reason.

Which blocks: block b >= 1 of every layer is a recompute block when
floor(b * share) > floor((b - 1) * share) (`recompute_pattern`): a stride pattern that
spreads the share evenly over the context, the same for every layer and KV head, fixed
for the cache's life. Block 0 (the exact sink) never is.

Activation rows (`ActivationCodec`): 16 bits (the model's dtype when it is 16-bit, else
fp16), or 8 bits with one fp16 scale per channel and block. They live in a second `TierStore` (same
tiers, its own budgets, `split_budgets`); the recompute blocks' K/V rows are not stored
at all. `Recompute` owns that store and turns activation rows back into K/V rows: the
cache and the CPU/reference backends read rows through `Recompute.rows`; the CUDA
backend recomputes into scratch slots of its device cache on a side stream
(`edgekv.backends.cuda`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import EdgekvError
from .kernels import compress_blocks
from .kvstate import KVLayout
from .quant import BlockCodec
from .rotation import rotate
from .tiers import TierStore

ACT_BITS = (16, 8)


def recompute_pattern(share: float, num_blocks: int) -> torch.Tensor:
    """bool [num_blocks] on the host: block b >= 1 is a recompute block when
    floor(b * share) > floor((b - 1) * share) — of blocks 1..n-1, floor((n-1) * share)
    are; block 0 never is. share in [0, 1]."""
    b = torch.arange(num_blocks, dtype=torch.float64)
    marked = torch.floor(b * share) > torch.floor((b - 1) * share)
    marked[:1] = False
    return marked


@dataclass(frozen=True, slots=True)
class ActivationCodec:
    """The normed inputs h of one block's tokens, [block_size, hidden], as one uint8 row.

        bits 16:  [ h [B, hidden] in dtype16 ]                          B * hidden * 2 bytes
        bits 8:   [ codes int8 [B, hidden] | scale fp16 [hidden] ]      (B + 2) * hidden bytes
                  h[t, c] ~= codes[t, c] * scale[c], scale[c] ~= max_t |h[t, c]| / 127

    8-bit scales are per channel over the block's tokens (as KIVI does for keys), not per
    token: the normed inputs' large values sit in a few fixed channels (the norm weights
    and the residual stream's outliers put them there), and a per-token scale would spend
    the whole grid of every token on them. Codes are computed against the stored fp16
    scale. dtype16: float16 or bfloat16 (the model's dtype when it is 16-bit: then
    16-bit rows are exact).
    """

    bits: int
    block_size: int
    hidden: int
    dtype16: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise EdgekvError(f"recompute_bits must be 16 or 8 (got {self.bits})")

    @property
    def row_bytes(self) -> int:
        b, h = self.block_size, self.hidden
        return b * h * 2 if self.bits == 16 else (b + 2) * h

    @property
    def bytes_per_token(self) -> float:
        return self.row_bytes / self.block_size

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """h: [n, block_size, hidden] float -> uint8 [n, row_bytes] on h's device."""
        n = h.shape[0]
        if self.bits == 16:
            return h.to(self.dtype16).contiguous().view(torch.uint8).reshape(n, -1)
        h = h.float()
        scale = (h.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)  # [n, 1, hidden]
        wide = scale.float()
        codes = torch.where(wide > 0, h / wide.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        codes = codes.round_().clamp_(-127, 127).to(torch.int8)
        return torch.cat((codes.view(torch.uint8).reshape(n, -1), scale.view(torch.uint8).reshape(n, -1)), dim=1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [n, row_bytes] -> h [n, block_size, hidden] in dtype."""
        n, b, h = rows.shape[0], self.block_size, self.hidden
        rows = rows.contiguous()
        if self.bits == 16:
            return rows.view(self.dtype16).reshape(n, b, h).to(dtype)
        codes = rows[:, :b * h].view(torch.int8).reshape(n, b, h).float()
        scale = rows[:, b * h:].contiguous().view(torch.float16).reshape(n, 1, h).float()
        return (codes * scale).to(dtype)


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type activation rows use for a model running in `dtype`."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


@dataclass(frozen=True)
class RecomputePlan:
    """What a `TieredKVCache` needs to recompute K/V: `share` of the blocks (after the
    sink), activation `bits` (16 or 8), the model's `hidden` size, and `project(layer, h)`:
    normed inputs h [T, hidden] -> (k_pre, v), each [num_kv_heads, T, head_dim] in the
    model's basis, k_pre before RoPE with the rope scale applied (`Decoder.key_values`)."""

    share: float
    bits: int
    hidden: int
    project: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def split_budgets(kv_layer_bytes: int, act_layer_bytes: int, act_row_bytes: int, *, device: int, ram: int,
                  disk: int) -> tuple[dict[str, int], dict[str, int]]:
    """The tier budgets (bytes) cut between the K/V store and the activation store:
    (kv {device, ram, disk}, activations {device, ram, disk}).

    RAM and disk in proportion to what one layer holds of each at full context (the same
    proportion as the whole cache). The device cache stays the K/V store's but for one
    activation row: activation rows are read where they live (in place in pinned RAM on
    CUDA), and a K/V row cached on the device saves both its transfer and its recompute.
    """
    share = act_layer_bytes / max(kv_layer_bytes + act_layer_bytes, 1)
    act = {"device": act_row_bytes if act_layer_bytes else 0, "ram": int(ram * share), "disk": int(disk * share)}
    return {"device": device - act["device"], "ram": ram - act["ram"], "disk": disk - act["disk"]}, act


class Recompute:
    """The activation rows of one offloaded cache's recompute blocks, and the K/V rows made
    from them (see the module doc).

    layout.recomputed marks the recompute blocks (None or none marked: nothing is
    recomputed, `rows` is the store's get). Row ids are the cache's (`KVLayout.row_ids`);
    activation rows are named layer * max_blocks + block. Counters (since
    `reset_counters`): blocks recomputed ((layer, block) pairs) and activation bytes
    fetched.
    """

    def __init__(self, layout: KVLayout, store: TierStore, plan: RecomputePlan | None, *,
                 budgets: dict[str, int], disk_dir: str | None, kernels: str):
        """budgets: the activation store's {device, ram, disk} bytes (`split_budgets`);
        kernels: the kernel family K/V rows are encoded with (`compress_blocks`)."""
        self.layout, self.store, self.plan, self.kernels = layout, store, plan, kernels
        self.active = plan is not None and layout.num_recomputed > 0
        table = layout.recomputed if layout.recomputed is not None else torch.zeros(layout.max_blocks, dtype=torch.bool)
        self._tables = {"cpu": table.cpu(), layout.device.type: table.to(layout.device)}
        self._blocks = torch.nonzero(table.cpu()).flatten().tolist()  # the recompute blocks, ascending
        self.codec = self.acts = None
        if self.active:
            self.codec = ActivationCodec(plan.bits, layout.block_size, plan.hidden, activation_dtype(layout.dtype))
            cuda = layout.device.type == "cuda"  # the GPU reads activation rows in place in pinned RAM
            self.acts = TierStore(self.codec.row_bytes, device_cache_bytes=budgets["device"], ram_bytes=budgets["ram"],
                                  disk_dir=disk_dir, disk_bytes=budgets["disk"], device=layout.device, pin_ram=cuda,
                                  id_space=layout.num_layers * layout.max_blocks if cuda else None)
        self.blocks = 0
        self.bytes = 0

    @staticmethod
    def act_row_bytes(plan: RecomputePlan, layout: KVLayout) -> int:
        """Bytes of one activation row of `plan` in `layout`."""
        return ActivationCodec(plan.bits, layout.block_size, plan.hidden).row_bytes

    # ---- which blocks ----------------------------------------------------------------
    def recomputed(self, blocks: torch.Tensor) -> torch.Tensor:
        """bool, the shape and device of `blocks` (int64; -1 entries: False): which are
        recompute blocks."""
        table = self._tables[blocks.device.type]
        return table[blocks.clamp(min=0)] & (blocks >= 0)

    def stored(self, blocks: torch.Tensor) -> torch.Tensor:
        """The blocks (int64 [n]) whose K/V rows the store holds."""
        return blocks[~self.recomputed(blocks)]

    def stored_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The row ids (int64 [n]) whose rows the store holds."""
        return ids[~self.recomputed(ids % self.layout.max_blocks)]

    def blocks_below(self, num_blocks: int) -> list[int]:
        """The recompute blocks among 0..num_blocks-1, ascending (host ints)."""
        return self._blocks[:bisect.bisect_left(self._blocks, num_blocks)]

    def act_ids(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Activation row ids (int64, host) of `blocks` of `layer`."""
        return blocks.cpu() + layer * self.layout.max_blocks

    # ---- storage ---------------------------------------------------------------------
    def put(self, layers: range, blocks: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        """Store the activation rows of the recompute blocks among the new `blocks` (int64
        [n], host) of every layer in `layers`; inputs[i]: layer i's normed inputs
        [>= n * block_size, hidden] from the first token of blocks[0] on."""
        again = self.recomputed(blocks)
        if not self.active or not bool(again.any()):
            return
        n, b, hidden = len(blocks), self.layout.block_size, self.codec.hidden
        pick = again.to(inputs[0].device)
        h = torch.stack([x[:n * b].reshape(n, b, hidden)[pick] for x in inputs])  # [layers, m, B, hidden]
        ids = torch.cat([self.act_ids(layer, blocks[again]) for layer in layers])
        self.acts.put(ids, self.codec.encode(h.flatten(0, 1)))

    def free(self, layer: int, blocks: torch.Tensor) -> None:
        """Forget the activation rows of the recompute blocks among `blocks` of `layer`."""
        again = self.recomputed(blocks)
        if self.active and bool(again.any()):
            self.acts.free(self.act_ids(layer, blocks[again]))

    # ---- recomputation ---------------------------------------------------------------
    def activations(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Activation rows uint8 [m, row_bytes] of `blocks` (int64 [m], recompute blocks) of
        `layer`, on the device, on the current stream. On CUDA with every row in RAM they
        are read in place in the pinned RAM home (no host wait); else through the store."""
        ids = self.act_ids(layer, blocks)
        acts, device = self.acts, self.layout.device
        self.bytes += len(ids) * self.codec.row_bytes
        if device.type == "cuda" and not acts.has_disk_rows:
            from .kernels.gather import gather_rows

            acts.touch(ids)
            slots = acts.ram_table[ids.to(device, non_blocking=True)]
            return gather_rows(acts.ram_rows, slots, device=device)
        return acts.get(ids)

    def key_value_rows(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """The K/V rows of recompute `blocks` (int64 [m]) of `layer`, made from their
        activation rows: uint8 [num_kv_heads, m, row_bytes], on the device."""
        lay = self.layout
        h = self.codec.decode(self.activations(layer, blocks), lay.dtype).flatten(0, 1)  # [m*B, hidden]
        k_pre, v = self.plan.project(layer, h)  # [Hkv, m*B, D] each
        self.blocks += len(blocks)
        return compress_blocks(k_pre, rotate(v, lay.value_basis), lay.codec, backend=self.kernels)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows uint8 [n, row_bytes] of row ids (int64 [n], host) on the device, in order:
        the store's (`TierStore.get`), or made from activation rows for recompute blocks
        (each (layer, block) once, whatever the KV heads asking)."""
        lay = self.layout
        again = self.recomputed(ids % lay.max_blocks)
        if not bool(again.any()):
            return self.store.get(ids)
        out = torch.empty((len(ids), lay.codec.row_bytes), dtype=torch.uint8, device=lay.device)
        if not bool(again.all()):
            out[(~again).to(lay.device)] = self.store.get(ids[~again])
        wanted = ids[again]
        layer_head, blocks = wanted // lay.max_blocks, wanted % lay.max_blocks
        layers, heads = layer_head // lay.num_kv_heads, layer_head % lay.num_kv_heads
        where = torch.nonzero(again).flatten()
        for layer in torch.unique(layers).tolist():
            mine = layers == layer
            unique, index = torch.unique(blocks[mine], return_inverse=True)
            made = self.key_value_rows(layer, unique)  # [Hkv, m, row_bytes]
            out[where[mine].to(lay.device)] = made[heads[mine].to(lay.device), index.to(lay.device)]
        return out

    # ---- accounting and persistence --------------------------------------------------
    def stats(self, decode_steps: int) -> dict:
        """recompute_blocks: (layer, block) pairs recomputed per step; recompute_bytes:
        activation bytes fetched per step."""
        if not decode_steps:
            return {}
        return {"recompute_blocks": round(self.blocks / decode_steps, 3),
                "recompute_bytes": round(self.bytes / decode_steps)}

    def reset_counters(self) -> None:
        self.blocks = self.bytes = 0
        if self.acts is not None:
            self.acts.reset_counters()

    def resident_bytes(self) -> dict[str, int]:
        if self.acts is None:
            return {"device": 0, "ram": 0, "disk": 0}
        return self.acts.resident_bytes()

    def _all_act_ids(self, num_blocks: int) -> torch.Tensor:
        blocks = torch.tensor(self.blocks_below(num_blocks), dtype=torch.int64)
        return torch.cat([self.act_ids(layer, blocks) for layer in range(self.layout.num_layers)])

    def export(self, num_blocks: int) -> dict[str, torch.Tensor]:
        """The activation rows of the first num_blocks blocks: {"act_rows": uint8 [rows,
        row_bytes]} (layer-major, blocks ascending), or {} when nothing is recomputed."""
        if not self.active:
            return {}
        ids = self._all_act_ids(num_blocks)
        rows = self.acts.get(ids).cpu() if len(ids) else torch.empty((0, self.codec.row_bytes), dtype=torch.uint8)
        return {"act_rows": rows}

    def load(self, state: dict[str, torch.Tensor], num_blocks: int) -> None:
        """Put back the activation rows of an `export` of the same layout."""
        if not self.active:
            return
        if "act_rows" not in state:
            raise EdgekvError("the stored KV has no activation rows for this cache's recompute blocks")
        ids = self._all_act_ids(num_blocks)
        if len(ids):
            self.acts.put(ids, state["act_rows"])

    def close(self) -> None:
        if self.acts is not None:
            self.acts.close()


# ---- the split ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RecomputeSplit:
    """A recompute decision: `share` of the offloaded blocks (0: off) and why, in one line.

    Per token and layer: kv_bytes (its K/V rows), act_bytes (its activation row);
    step_ratio: modelled fetch time with the split over fetching every K/V row (1: off).
    """

    share: float
    reason: str
    kv_bytes: float
    act_bytes: float
    step_ratio: float = 1.0


def token_bytes(shape, kv_bits: int, recompute_bits: int, block_size: int = 32) -> tuple[float, float]:
    """Bytes per token and layer of (its K/V rows, its activation row), codec scales included."""
    kv = shape.num_kv_heads * BlockCodec(kv_bits, block_size, shape.head_dim).row_bytes / block_size
    return kv, ActivationCodec(recompute_bits, block_size, shape.hidden_size).bytes_per_token


def recompute_split(shape, kv_bits: int, recompute_bits: int, link_gbps: float, gemm_gflops: float, *,
                    block_size: int = 32, min_gain: float = 0.05) -> RecomputeSplit:
    """The share of offloaded blocks to recompute from activations instead of fetching.

    shape: anything with hidden_size, num_kv_heads, head_dim (`ModelShape`); kv_bits: the
    offloaded K/V rows' bits (2, 4, 8, 16); recompute_bits: the activation rows' (16, 8);
    link_gbps: host->device bandwidth in GB/s (1e9 bytes; 0: no link, e.g. a CPU reading
    RAM in place); gemm_gflops: the device's matrix product rate in GFLOP/s; block_size:
    tokens per block (row sizes include the codecs' scales); min_gain: the least modelled
    saving that turns recomputation on.

    The model (KVPR's linear program), per token and layer of the attended context, with
    a the activation row's bytes, k the K/V rows' bytes, L the link, F the GEMM rate:

        t_kv = k / L     t_act = a / L     t_gemm = 2 * hidden * (2 * kv_heads * head_dim) / F
        T(s) = s * t_act + max(s * t_gemm, (1 - s) * t_kv)

    The link is shared: the activations of the share s cross first, then the K/V of the
    rest stream while the device recomputes. For s below s* = t_kv / (t_gemm + t_kv) the
    slope is t_act - t_kv, above it t_act + t_gemm > 0: recomputation pays only when
    a < k, and then s* is optimal, T(s*) = s* * (t_act + t_gemm). It assumes every KV
    head attends each block (budget "all"): an activation row serves all of a layer's
    heads, so under a sparse budget whose heads pick different blocks it covers fewer.
    """
    hidden, hkv, d = shape.hidden_size, shape.num_kv_heads, shape.head_dim
    kv, a = token_bytes(shape, kv_bits, recompute_bits, block_size)
    what_act = f"an activation row (hidden={hidden} x {recompute_bits} bit = {a:g} B/token)"
    what_kv = f"the K/V it replaces (2x{hkv}x{d} at {kv_bits} bits = {kv:g} B/token)"
    if a >= kv:
        return RecomputeSplit(0.0, f"off: {what_act} is not fewer bytes than {what_kv}", kv, a)
    if link_gbps <= 0 or gemm_gflops <= 0:
        return RecomputeSplit(0.0, "off: no host-device link to save (the K/V rows are read in place where "
                                   "they lie)" if link_gbps <= 0 else "off: no device GEMM rate given", kv, a)
    t_kv, t_act = kv / (link_gbps * 1e9), a / (link_gbps * 1e9)
    t_gemm = 2 * hidden * 2 * hkv * d / (gemm_gflops * 1e9)
    s = t_kv / (t_gemm + t_kv)
    share = math.floor(s * 100) / 100  # a hundredth below s*: the link stays the bottleneck
    ratio = (share * t_act + max(share * t_gemm, (1 - share) * t_kv)) / t_kv
    if share <= 0 or 1 / ratio < 1 + min_gain:
        return RecomputeSplit(0.0, f"off: {what_act} is fewer bytes than {what_kv}, but recomputing "
                                   f"({t_gemm * 1e9:.3g} ns/token of GEMM) saves under {min_gain:.0%} of the fetch",
                              kv, a, 1.0)
    return RecomputeSplit(share, f"on, {share:.0%} of blocks: {what_act} is {kv / a:.2g}x fewer bytes than "
                                 f"{what_kv}; at {link_gbps:g} GB/s and {gemm_gflops:g} GFLOP/s a token's K/V takes "
                                 f"{t_kv * 1e9:.3g} ns, its recompute {t_gemm * 1e9:.3g} ns: modelled fetch time "
                                 f"{ratio:.2f}x that of every K/V row", kv, a, ratio)


def measure_link(device: torch.device) -> tuple[float, float]:
    """(pinned host->device GB/s, fp16 GEMM GFLOP/s) on a CUDA `device`, timed briefly
    (a 64 MiB copy and a 4096-square product, best of three)."""
    host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    dest = torch.empty_like(host, device=device)
    a = torch.randn(4096, 4096, dtype=torch.float16, device=device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    link = host.numel() / best(lambda: dest.copy_(host, non_blocking=True)) / 1e9
    gemm = 2 * 4096**3 / best(lambda: a @ a) / 1e9
    return link, gemm


def choose_split(value: float | str, shape, *, kv_bits: int, recompute_bits: int, device: torch.device,
                 block_size: int) -> RecomputeSplit:
    """The `recompute` policy value resolved: a share as given, or "auto": on the CPU off
    (its RAM is read in place: there is no link to save), on CUDA `recompute_split` with
    the link and GEMM rate measured now (`measure_link`)."""
    if value != "auto":
        share = float(value)
        kv, a = token_bytes(shape, kv_bits, recompute_bits, block_size)
        return RecomputeSplit(share, f"{'on' if share else 'off'}: recompute {share:g} (set by the policy)", kv, a)
    if device.type != "cuda":
        return recompute_split(shape, kv_bits, recompute_bits, 0.0, 0.0, block_size=block_size)
    link, gemm = measure_link(device)
    return recompute_split(shape, kv_bits, recompute_bits, link, gemm, block_size=block_size)
