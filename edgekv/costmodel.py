"""What a policy will cost on a machine: predicted prefill and decode speed, and bytes per tier.

A decode step is a sum of terms (`decode_terms`), in seconds per token:

    weights      every projection weight read once        weight bytes / matvec GB/s
    layers       fixed work per layer (norms, RoPE, calls) layers x s/layer
    selection    block scoring + top-k (budget < all)      scored (KV head, block) pairs x s/block
                                                           + sparse layers x s/call
    attention    sparse attention over attended blocks     attended (KV head, block) pairs x s/block
                 (offload off: dense over the exact KV)    (KV head, token) pairs x s/token
    speculation  the next layer's query, made early        its weight bytes / matvec GB/s
    fetch_ram    device-cache misses with a RAM home       bytes / the store's RAM-fetch GB/s
    fetch_disk   misses with a disk home                   bytes / disk GB/s + runs x latency
    recompute    activation rows of recompute blocks fetched,  their bytes / link GB/s + projection
                 their K/V rebuilt (KVPR, `edgekv.recompute`)  flops / GEMM rate
    hidden       minus the fetch hidden behind compute     overlap x min(hideable fetch, compute)

A prefill (`prefill_terms`) is chunked and compute-bound: linear layers (2 x params x
tokens flops), attention (quadratic: each chunk attends everything before it), the stored
rows every chunk decodes again (offloaded KV), their fetch from RAM/disk when the device
cache cannot hold them, compression, disk writes, and a fixed cost per layer and chunk.

Unit costs come from two places. `HardwareFigures` (edgekv.hardware) holds what the
micro-benchmarks measured (GB/s, GFLOP/s, seconds per block); `Calibration` holds a few
constants FITTED to short real engine runs (`fit_calibration`: least squares over (policy,
context) measurements, as FlexGen fits its cost model to real runs): multipliers of
measured terms, and fixed costs only whole runs show. Where the KV lives follows the
store's rules (`placement`): the device cache holds copies of recently used rows up to its
budget; every row has a home in RAM up to the RAM budget, on disk past it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Policy
from .model import ModelShape
from .quant import BlockCodec
from .selection import SCORERS, budget_blocks

GB = 1e9


@dataclass(frozen=True, slots=True)
class Calibration:
    """Constants fitted to real engine runs (`fit_calibration`); the defaults are priors.

    *_scale: dimensionless multipliers of a term computed from the measured hardware
    figures (1.0: the micro-benchmark was right). *_s: seconds that only whole runs show.
    overlap: share of a hideable transfer hidden behind compute (0..1).
    speculation_hit_rate: share of needed blocks the layer-ahead request had asked for.
    selection_churn: share of the blocks a sparse step selects that the previous step did
    not: misses even when the device cache holds every selected row.
    """

    weights_scale: float = 1.0  # 16/32-bit weights (torch's products)
    weights_scale_8: float = 1.0  # 8-bit weights (the quantized kernel)
    weights_scale_4: float = 1.0  # 4-bit weights
    layer_overhead_s: float = 50e-6  # per layer and decode step
    select_scale: float = 1.0
    attend_scale: float = 1.0
    dense_attend_scale: float = 1.0
    fetch_scale: float = 1.0
    prefill_linear_scale: float = 1.0  # 16/32-bit weights
    prefill_linear_scale_q: float = 1.0  # 8/4-bit weights (decoded tile by tile per chunk)
    prefill_attention_scale: float = 1.0
    prefill_kv_scale: float = 1.0
    chunk_overhead_s: float = 200e-6  # per layer and prefill chunk
    overlap: float = 0.8
    speculation_hit_rate: float = 0.9
    selection_churn: float = 0.1  # share of a sparse step's rows not selected the step before
    fit_runs: int = 0  # engine runs these were fitted to (0: priors)
    fit_rms_rel_error: float = 0.0  # RMS of (predicted - measured) / measured over those runs

    def replace(self, **changes: float) -> "Calibration":
        return dataclasses.replace(self, **changes)


# the constants `fit_calibration` fits by default (overlap and hit rate need CUDA runs)
FITTED = ("weights_scale", "weights_scale_8", "weights_scale_4", "layer_overhead_s", "select_scale", "attend_scale",
          "dense_attend_scale", "fetch_scale", "prefill_linear_scale", "prefill_linear_scale_q",
          "prefill_attention_scale", "prefill_kv_scale", "chunk_overhead_s")


def weights_scale(cal: "Calibration", bits: int) -> float:
    """The fitted multiplier of the weight-read term for weights of `bits` bits: each width
    runs a different kernel, whose micro-benchmark is off by its own factor."""
    return {8: cal.weights_scale_8, 4: cal.weights_scale_4}.get(bits, cal.weights_scale)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a policy's bytes go at the end of a request, in bytes.

    Rows are the offloaded KV's (one KV head's block): every row has a RAM or disk home;
    device rows are cached copies. dense_kv: the exact KV of offload off. host_ram /
    device_mem: all that is planned in host RAM / device memory (weights, caches, tails,
    summaries, scratch); on a CPU the device is host RAM and device_mem is 0.
    """

    row_bytes: int
    rows: int
    device_rows: int
    ram_rows: int
    disk_rows: int
    weights_bytes: int
    exact_bytes: int  # exact recent tails and sink blocks
    summaries_bytes: int  # block summaries, allocated for the model's max context
    scratch_bytes: int  # prefill peak: attention scores, one layer's decoded K/V and rows
    dense_kv_bytes: int
    host_ram_bytes: int = 0
    device_mem_bytes: int = 0

    @property
    def kv_bytes(self) -> dict[str, int]:
        """KV bytes per tier, as the engine's `kv_bytes` stat counts them."""
        rb = self.row_bytes
        return {"device": self.device_rows * rb + self.exact_bytes + self.summaries_bytes + self.dense_kv_bytes,
                "ram": self.ram_rows * rb, "disk": self.disk_rows * rb}


@dataclass(frozen=True, slots=True)
class Prediction:
    """A policy's predicted cost. Terms are (name, seconds): decode per token, prefill per prompt."""

    policy: Policy
    context: int
    new_tokens: int
    decode_terms: tuple[tuple[str, float], ...]
    prefill_terms: tuple[tuple[str, float], ...]
    placement: Placement
    notes: tuple[str, ...] = ()

    @property
    def decode_step_s(self) -> float:
        return max(sum(s for _, s in self.decode_terms), 1e-9)

    @property
    def prefill_s(self) -> float:
        return max(sum(s for _, s in self.prefill_terms), 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.decode_step_s

    @property
    def prefill_tok_s(self) -> float:
        return self.context / self.prefill_s

    @property
    def request_s(self) -> float:
        """Seconds to prefill the context and generate new_tokens."""
        return self.prefill_s + self.new_tokens * self.decode_step_s

    @property
    def binding(self) -> str:
        """The decode term that takes the most time: the resource that binds a step."""
        return max(self.decode_terms, key=lambda t: t[1])[0]

    def term(self, name: str) -> float:
        return dict(self.decode_terms).get(name, 0.0)


# ---- model arithmetic ---------------------------------------------------------------------

def layer_params(shape: ModelShape) -> int:
    """Weights of one layer's projections: q/k/v, o, gate/up, down."""
    s = shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return s.hidden_size * (q + 2 * kv) + q * s.hidden_size + 3 * s.hidden_size * s.intermediate_size


def decode_params(shape: ModelShape) -> int:
    """Weights a decode token reads: every layer's projections and the lm_head."""
    return shape.num_layers * layer_params(shape) + shape.vocab_size * shape.hidden_size


def activation_bytes(policy: Policy, device_type: str) -> int:
    """Bytes per activation (the engine's choice: fp32 on a CPU, 16-bit on CUDA, unless set)."""
    if policy.dtype == "float32" or (policy.dtype == "auto" and device_type == "cpu"):
        return 4
    return 2


def weight_bits(policy: Policy, device_type: str) -> int:
    """Bits per stored projection weight: `weight_bits` 4 or 8; at 16 (and "auto", which a
    plan never leaves: the engine resolves it to the model file's own bits, and
    `Measurement`s record the resolved value) 16, or 32 for fp32 weights
    (weight_dtype "float32", or "auto" beside fp32 activations on CUDA)."""
    if policy.weight_bits in (4, 8):
        return int(policy.weight_bits)
    if policy.weight_dtype == "float32" or (policy.weight_dtype == "auto" and device_type == "cuda"
                                            and policy.dtype == "float32"):
        return 32
    return 16


def decode_weight_bytes(shape: ModelShape, bits: int) -> int:
    """Weight bytes one decode token reads: every layer's projections and the output head.
    4/8 bits: the layout of `edgekv.weights.quantized_nbytes` (codes, an fp16 scale per 64
    weights, an fp16 zero at 4 bits), the head at `HEAD_BITS`; 16/32: floats."""
    from .weights import HEAD_BITS, quantized_nbytes

    s = shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    mats = ((q + 2 * kv, s.hidden_size), (s.hidden_size, q), (2 * s.intermediate_size, s.hidden_size),
            (s.hidden_size, s.intermediate_size))
    if bits >= 16:
        return decode_params(s) * bits // 8
    return (s.num_layers * sum(quantized_nbytes(r, c, bits) for r, c in mats)
            + quantized_nbytes(s.vocab_size, s.hidden_size, HEAD_BITS))


def resident_weight_bytes(shape: ModelShape, bits: int, act_bytes: int) -> int:
    """Bytes the decoder holds for the weights (`edgekv.weights.weights_nbytes`, the
    accounting `edgekv info` prints), for an untied embedding."""
    from types import SimpleNamespace

    from .weights import weights_nbytes

    s = shape
    config = SimpleNamespace(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, head_dim=s.head_dim,
                             num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                             intermediate_size=s.intermediate_size, vocab_size=s.vocab_size, tie_word_embeddings=False)
    return weights_nbytes(config, min(bits, 16), weight_dtype_bytes=bits // 8 if bits >= 16 else 2,
                          dtype_bytes=act_bytes)


def resolve_device(policy: Policy, hw) -> str:
    """"cpu" or "cuda": where the model runs under this policy on a machine with figures hw."""
    if policy.device == "auto":
        return hw.device_type
    return "cuda" if str(policy.device).startswith("cuda") else "cpu"


def speculating(policy: Policy, device_type: str) -> bool:
    """Whether layer-ahead speculation runs (it needs a sparse budget; "auto": on with CUDA)."""
    on = policy.speculate if isinstance(policy.speculate, bool) else device_type == "cuda"
    return bool(on) and policy.offload and policy.budget != "all"


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The offloaded KV of one sequence: its codec and block counts."""

    codec: BlockCodec
    num_blocks: int  # compressed blocks per layer and KV head
    tail: int  # exact recent tokens
    max_blocks: int  # blocks per layer and KV head at the model's max context

    @property
    def row_bytes(self) -> int:
        return self.codec.row_bytes


def kv_layout(shape: ModelShape, policy: Policy, context: int) -> KVLayout:
    """Tokens older than the recent window, in whole blocks, are compressed; the rest are exact."""
    return _kv_layout(shape, policy.kv_bits, policy.block_size, policy.recent_window, context)


@functools.lru_cache(maxsize=4096)  # pure; the search asks for the same few layouts thousands of times
def _kv_layout(shape: ModelShape, kv_bits: int, block_size: int, recent_window: int, context: int) -> KVLayout:
    b = block_size
    codec = BlockCodec(bits=kv_bits, block_size=b, head_dim=shape.head_dim)
    num_blocks = max(0, context - recent_window) // b
    return KVLayout(codec, num_blocks, context - num_blocks * b, -(-shape.max_context // b))


def layer_rows_bytes(shape: ModelShape, policy: Policy) -> int:
    """Bytes of one layer's rows at the model's max context: what the engine requires the
    device cache and the RAM budget to hold at least (two layers: background prefetch)."""
    lay = kv_layout(shape, policy, shape.max_context)
    return shape.num_kv_heads * lay.max_blocks * lay.row_bytes


def attended_blocks(shape: ModelShape, policy: Policy, context: int) -> tuple[int, int]:
    """(k, sparse_layers): blocks per KV head a sparse layer attends (sinks included), and
    how many layers select (0: every layer attends every block)."""
    lay = kv_layout(shape, policy, context)
    nb = lay.num_blocks
    if policy.budget == "all" or not policy.offload or nb == 0:
        return nb, 0
    k = budget_blocks(policy.budget, context=context, tail=lay.tail, block_size=policy.block_size,
                      num_blocks=nb, sink_blocks=policy.sink_blocks)
    if k >= nb:
        return nb, 0
    return k, max(0, shape.num_layers - policy.dense_layers)


# ---- placement ------------------------------------------------------------------------------

def placement(shape: ModelShape, policy: Policy, context: int, device_type: str) -> Placement:
    """Bytes per tier and per memory with `context` tokens stored, by the store's rules."""
    s, p = shape, policy
    act = activation_bytes(p, device_type)
    weights = resident_weight_bytes(s, weight_bits(p, device_type), act)
    chunk = min(p.prefill_chunk, context)
    scores = 2 * 4 * s.num_heads * chunk * chunk  # flash-style chunk attention: a tile of fp32 scores, not chunk x past
    if not p.offload:
        dense = 2 * s.num_layers * s.num_kv_heads * s.head_dim * context * act
        return _memories(Placement(0, 0, 0, 0, 0, weights, 0, 0, scores, dense), p, device_type)
    lay = kv_layout(s, p, context)
    rb = lay.row_bytes
    rows = s.num_layers * s.num_kv_heads * lay.num_blocks
    ram_rows = min(rows, p.ram_bytes // rb)
    exact = 2 * s.num_layers * s.num_kv_heads * (lay.tail + p.block_size) * s.head_dim * act
    summaries = s.num_layers * s.num_kv_heads * lay.max_blocks * summary_bytes_per_block(p.scorer, lay.codec)
    scratch = scores + 2 * s.num_kv_heads * context * s.head_dim * act + s.num_kv_heads * lay.num_blocks * rb
    pl = Placement(rb, rows, min(rows, p.device_cache_bytes // rb), ram_rows, rows - ram_rows, weights, exact,
                   summaries, scratch, 0)
    return _memories(pl, p, device_type)


@functools.lru_cache(maxsize=256)  # a pure function of two small frozen values: memoized
def summary_bytes_per_block(scorer: str, codec: BlockCodec) -> int:
    """Bytes of one (KV head, block) summary of `scorer` (`edgekv.selection.SCORERS`)."""
    width, dtype = SCORERS[scorer].width(codec)
    return width * dtype.itemsize


def _memories(pl: Placement, policy: Policy, device_type: str) -> Placement:
    """On a CPU everything is host RAM (the device cache too: copies beside their RAM homes);
    with CUDA the RAM tier is (pinned) host memory and the rest device memory, the device
    cache preallocated at its whole budget."""
    rb = pl.row_bytes
    device_side = pl.weights_bytes + pl.exact_bytes + pl.summaries_bytes + pl.scratch_bytes + pl.dense_kv_bytes
    if device_type == "cuda":
        cache = policy.device_cache_bytes if policy.offload else 0
        return dataclasses.replace(pl, host_ram_bytes=pl.ram_rows * rb, device_mem_bytes=device_side + cache)
    return dataclasses.replace(pl, host_ram_bytes=device_side + (pl.device_rows + pl.ram_rows) * rb)


# ---- the terms ------------------------------------------------------------------------------

def matvec_gbps(hw, bits: int) -> float:
    """Weight bytes/s of a one-token product at this precision (8/4-bit: packed bytes
    through the quantized kernel; a profile without that figure: the fp16 product's,
    an assumption the notes say)."""
    measured = {32: hw.matvec_fp32_gbps, 16: hw.matvec_fp16_gbps, 8: hw.matvec_int8_gbps, 4: hw.matvec_int4_gbps}
    return measured.get(bits) or hw.matvec_fp16_gbps


def block_scale(shape: ModelShape, policy: Policy, hw) -> float:
    """Per-block figures were measured at hw's block size x head dim: scale them to this
    model's (a block's work grows with its tokens x channels)."""
    return policy.block_size * shape.head_dim / (hw.kernel_block_size * hw.kernel_head_dim)


def attend_s_per_block(hw, bits: int) -> float:
    """Sparse attention per attended (KV head, block) at this KV precision."""
    by_bits = {2: hw.attend_2bit_s_per_block, 4: hw.attend_4bit_s_per_block, 8: hw.attend_8bit_s_per_block,
               16: hw.attend_16bit_s_per_block}
    return by_bits[bits] or hw.attend_4bit_s_per_block


def select_s_per_block(hw, scorer: str) -> float:
    """Scoring + top-k per (KV head, block); scorers without their own figure cost like keys4."""
    return (hw.select_mass_s_per_block if scorer == "mass" else 0.0) or hw.select_keys4_s_per_block


def recompute_share(shape: ModelShape, policy: Policy, hw, device_type: str) -> float:
    """The share of offloaded blocks whose K/V is rebuilt from activation rows: the policy's
    `recompute`, or for "auto" `edgekv.recompute.recompute_split` with this machine's link
    (pinned host->device GB/s; 0 on a CPU, where rows are read in place) and GEMM rate."""
    if policy.recompute != "auto":
        return float(policy.recompute)
    return recompute_decision(shape, policy, hw, device_type).share


def recompute_decision(shape: ModelShape, policy: Policy, hw, device_type: str):
    """`edgekv.recompute.recompute_split` for this policy's bit widths on this machine."""
    from .recompute import recompute_split

    link = hw.h2d_gbps if device_type == "cuda" else 0.0
    gemm = hw.device_gemm_gflops if device_type == "cuda" else hw.matmul_gflops
    return recompute_split(shape, policy.kv_bits, policy.recompute_bits, link, gemm, block_size=policy.block_size)


def recompute_term(shape: ModelShape, policy: Policy, share: float, fetched_blocks: float, hw, device_type: str,
                   cal: Calibration) -> tuple[float, float]:
    """(link seconds, GEMM seconds) per decode step for the recompute blocks among
    `fetched_blocks` (KV head, block) reads: a share `share` of them come as activation
    rows (one per block and layer, serving every KV head) over the link (the RAM fetch
    rate on a CPU), then their k/v projections run at the GEMM rate — while the other
    blocks' K/V rows stream (`decode_terms` overlaps the two, as `recompute_split` does)."""
    if not share or not fetched_blocks:
        return 0.0, 0.0
    from .recompute import token_bytes

    s = shape
    tokens = share * fetched_blocks / s.num_kv_heads * policy.block_size  # activation rows: one per (layer, block)
    _, act_per_token = token_bytes(s, policy.kv_bits, policy.recompute_bits, policy.block_size)
    link = (hw.h2d_gbps if device_type == "cuda" else 0.0) or hw.tier_ram_fetch_gbps
    gemm = (hw.device_gemm_gflops if device_type == "cuda" else 0.0) or hw.matmul_gflops
    flops = tokens * 2 * s.hidden_size * 2 * s.num_kv_heads * s.head_dim
    return tokens * act_per_token / (link * GB) * cal.fetch_scale, flops / (gemm * GB)


def decode_terms(shape: ModelShape, policy: Policy, context: int, hw, cal: Calibration,
                 device_type: str, pl: Placement | None = None) -> tuple[dict[str, float], list[str]]:
    """Seconds per decode token over `context` stored tokens, term by term; and notes."""
    s, p, notes = shape, policy, []
    bits = weight_bits(p, device_type)
    if bits < 16 and not (hw.matvec_int8_gbps if bits == 8 else hw.matvec_int4_gbps):
        notes.append(f"{bits}-bit weight speed not measured: assumed the fp16 product's bytes/s")
    rate = matvec_gbps(hw, bits) * GB
    L, hkv = s.num_layers, s.num_kv_heads
    t: dict[str, float] = {}
    t["weights"] = decode_weight_bytes(s, bits) / rate * weights_scale(cal, bits)  # s: every weight once per token
    t["layers"] = L * cal.layer_overhead_s  # s: fixed work per layer
    per_block = block_scale(s, p, hw)
    if not p.offload:
        per_token = hw.dense_attend_s_per_token * s.head_dim / hw.kernel_head_dim
        t["attention"] = L * hkv * context * per_token * cal.dense_attend_scale  # s
        return t, notes
    lay = kv_layout(s, p, context)
    nb, rb = lay.num_blocks, lay.row_bytes
    k, sparse = attended_blocks(s, p, context)
    spec = speculating(p, device_type)
    t["layers"] += L * hw.kv_step_overhead_s  # s: the KV path's fixed cost per layer
    passes = (2 if spec else 1) * sparse  # speculation scores a layer twice
    t["selection"] = (passes * hkv * nb * select_s_per_block(hw, p.scorer) * per_block
                      + passes * hw.select_call_s) * cal.select_scale  # s: per scored block + per call
    attended = sparse * hkv * k + (L - sparse) * hkv * nb  # (KV head, block) pairs
    t["attention"] = attended * attend_s_per_block(hw, p.kv_bits) * per_block * cal.attend_scale  # s
    q_bytes = s.num_heads * s.head_dim * s.hidden_size * decode_weight_bytes(s, bits) / decode_params(s)  # next query
    t["speculation"] = sparse * q_bytes / rate * weights_scale(cal, bits) if spec else 0.0  # s
    # the rows a step reads (not block 0: the sink is exact) against the device cache. An LRU
    # cache scanned in a cycle by more rows than it holds hits nothing: all hit or none do;
    # when they fit, a sparse step still misses the blocks its selection newly picked
    pl = pl or placement(s, p, context, device_type)
    reads = max(0, attended - L * hkv) if nb else 0
    fresh = cal.selection_churn * sparse * hkv * k
    share = recompute_share(s, p, hw, device_type)
    missed = fresh if reads <= pl.device_rows else reads
    misses = missed * (1 - share)  # the rest come back as activation rows
    disk_share = pl.disk_rows / pl.rows if pl.rows else 0.0
    ram_bytes, disk_bytes = misses * (1 - disk_share) * rb, misses * disk_share * rb
    runs = misses * disk_share if sparse else math.ceil(misses * disk_share / 1024)  # one preadv per run of slots
    t["fetch_ram"] = ram_bytes / (hw.tier_ram_fetch_gbps * GB) * cal.fetch_scale  # s
    t["fetch_disk"] = (disk_bytes / (hw.disk_read_gbps * GB) + runs * hw.disk_read_latency_s) * cal.fetch_scale  # s
    link_s, gemm_s = recompute_term(s, p, share, missed, hw, device_type, cal)
    # the activations cross first; the projections then run while the other rows stream
    t["recompute"] = link_s + max(0.0, gemm_s - t["fetch_ram"] - t["fetch_disk"])  # s
    t["hidden"] = -_hidden(t, shape, p, device_type, spec, sparse, cal)  # s
    return t, notes


def _hidden(t: dict[str, float], shape: ModelShape, policy: Policy, device_type: str, spec: bool,
            sparse_layers: int, cal: Calibration) -> float:
    """Fetch time hidden behind compute: layer l+1's rows load while layer l computes.

    Who asks early: with a sparse budget, speculation (right for a share
    `speculation_hit_rate` of the blocks); with every block, the store itself when the
    device cache holds two layers. What can hide: on CUDA any fetch (a side stream); on a
    CPU only disk reads (RAM rows are copied in the calling thread)."""
    if sparse_layers:
        share = cal.speculation_hit_rate if spec else 0.0
    else:
        share = 1.0 if policy.device_cache_bytes >= 2 * layer_rows_bytes(shape, policy) else 0.0
    hideable = t["fetch_disk"] + (t["fetch_ram"] if device_type == "cuda" else 0.0)
    compute = t["weights"] + t["layers"] + t["attention"]
    return cal.overlap * min(share * hideable, compute)


def chunk_spans(context: int, chunk: int) -> list[tuple[int, int]]:
    """(begin, end) token ranges of the prefill chunks of a `context`-token prompt."""
    return [(b, min(b + chunk, context)) for b in range(0, context, chunk)]


def prefill_terms(shape: ModelShape, policy: Policy, context: int, hw, cal: Calibration,
                  device_type: str, pl: Placement | None = None) -> dict[str, float]:
    """Seconds to prefill `context` tokens, term by term."""
    s, p = shape, policy
    L, hkv = s.num_layers, s.num_kv_heads
    spans = chunk_spans(context, p.prefill_chunk)
    narrow = weight_bits(p, device_type) < 8 * activation_bytes(p, device_type)
    gflops = (hw.matmul_widen_gflops if narrow else 0.0) or hw.matmul_gflops
    t: dict[str, float] = {}
    flops = 2 * layer_params(s) * L * context + 2 * s.vocab_size * s.hidden_size  # lm_head on the last token
    quantized = weight_bits(p, device_type) < 16
    t["linear"] = flops / (gflops * GB) * (cal.prefill_linear_scale_q if quantized else cal.prefill_linear_scale)  # s
    pairs = sum((end - begin) * end for begin, end in spans)  # (query, key) pairs, causal masking computed
    t["attention"] = L * 4 * s.num_heads * s.head_dim * pairs / (hw.attention_gflops * GB) * cal.prefill_attention_scale
    t["chunks"] = L * len(spans) * cal.chunk_overhead_s  # s
    if not p.offload:
        return t
    lay = kv_layout(s, p, context)
    rb, b = lay.row_bytes, p.block_size
    pl = pl or placement(s, p, context, device_type)
    stored = [L * hkv * (max(0, begin - p.recent_window) // b) for begin, _ in spans]  # rows before each chunk
    per_row = block_scale(s, p, hw)
    t["kv_decode"] = sum(stored) * hw.kv_decode_s_per_row * per_row * cal.prefill_kv_scale  # s: per chunk, again
    t["compress"] = pl.rows * hw.compress_s_per_row * per_row * cal.prefill_kv_scale  # s
    ram_fetch = disk_fetch = 0.0  # bytes read past the device cache (a cyclic scan over layers)
    for rows in stored:
        if rows > pl.device_rows:
            on_disk = max(0, rows - pl.ram_rows)
            ram_fetch, disk_fetch = ram_fetch + (rows - on_disk) * rb, disk_fetch + on_disk * rb
    t["kv_fetch"] = (ram_fetch / (hw.tier_ram_fetch_gbps * GB)
                     + disk_fetch / (hw.disk_read_gbps * GB)) * cal.fetch_scale  # s
    t["disk_write"] = pl.disk_rows * rb / (hw.disk_write_gbps * GB)  # s
    return t


def predict(shape: ModelShape, policy: Policy, context: int, hw, cal: Calibration, *,
            new_tokens: int = 256) -> Prediction:
    """The predicted cost of prefilling `context` tokens and decoding `new_tokens` more."""
    device_type = resolve_device(policy, hw)
    at_prompt = placement(shape, policy, context, device_type)
    decode, notes = decode_terms(shape, policy, context, hw, cal, device_type, at_prompt)
    prefill = prefill_terms(shape, policy, context, hw, cal, device_type, at_prompt)
    pl = placement(shape, policy, context + new_tokens, device_type) if new_tokens else at_prompt
    return Prediction(policy, context, new_tokens, tuple(decode.items()), tuple(prefill.items()), pl, tuple(notes))


# ---- the fit --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Measurement:
    """One real engine run: a policy, a context, and what it took.

    decode_step_s: seconds per decode token (0: not measured); prefill_s: seconds to
    prefill `context` tokens from scratch (0: not measured)."""

    policy: Policy
    context: int
    decode_step_s: float
    prefill_s: float = 0.0
    label: str = ""


def fit_calibration(measurements: Sequence[Measurement], shape: ModelShape, hw, prior: Calibration | None = None,
                    names: Sequence[str] = FITTED, *, ridge: float = 1e-4, iterations: int = 12) -> Calibration:
    """Constants that make the predictions match the measurements, by least squares.

    Minimises sum over measured figures of ((predicted - measured) / measured)^2 plus
    `ridge` x sum over constants of ((c - prior) / prior)^2: with few runs the constants a
    run set does not exercise (no disk, no selection) stay at their priors. The terms are
    linear in every constant except through `hidden` (a min), so Gauss-Newton steps with
    finite-difference derivatives converge; a step is taken only when it lowers the sum
    (halved until it does), and each constant stays within 1/20..20x its prior.
    """
    import numpy as np

    prior = prior or Calibration()
    if not measurements:
        return prior
    theta0 = np.array([getattr(prior, n) for n in names], dtype=float)
    scale = np.where(theta0 > 0, theta0, 1e-6)
    lo, hi = theta0 / 20, np.where(theta0 > 0, theta0 * 20, 1.0)
    targets = [(m, kind, y) for m in measurements
               for kind, y in (("decode", m.decode_step_s), ("prefill", m.prefill_s)) if y > 0]

    def residuals(theta) -> np.ndarray:
        cal = prior.replace(**dict(zip(names, theta.tolist())))
        out = []
        for m, kind, y in targets:
            p = predict(shape, m.policy, m.context, hw, cal, new_tokens=0)
            out.append(((p.decode_step_s if kind == "decode" else p.prefill_s) - y) / y)
        return np.array(out)

    def cost(theta, r) -> float:
        return float(r @ r + ridge * np.sum(((theta - theta0) / scale) ** 2))

    theta = theta0.copy()
    r = residuals(theta)
    for _ in range(iterations):
        jac = np.empty((len(r), len(names)))
        for i in range(len(names)):
            bumped = theta.copy()
            bumped[i] += scale[i] * 1e-3
            jac[:, i] = (residuals(bumped) - r) / (scale[i] * 1e-3)
        # rows: the data, then the ridge's pull toward the prior (in units of the prior)
        a = np.vstack([jac, math.sqrt(ridge) * np.diag(1 / scale)])
        b = np.concatenate([-r, -math.sqrt(ridge) * (theta - theta0) / scale])
        delta = np.linalg.lstsq(a, b, rcond=None)[0]
        step, current = 1.0, cost(theta, r)
        while step >= 1 / 64:
            trial = np.clip(theta + step * delta, lo, hi)
            r_trial = residuals(trial)
            if cost(trial, r_trial) < current:
                theta, r = trial, r_trial
                break
            step /= 2
        else:
            break  # no step lowers the sum: converged
        if current - cost(theta, r) < 1e-10:
            break
    return prior.replace(**dict(zip(names, theta.tolist())), fit_runs=len(measurements),
                         fit_rms_rel_error=float(np.sqrt(np.mean(r ** 2))))


def fit_report(measurements: Sequence[Measurement], shape: ModelShape, hw, cal: Calibration) -> list[dict]:
    """Predicted next to measured, per run: label, context, decode and prefill tok/s."""
    rows = []
    for m in measurements:
        p = predict(shape, m.policy, m.context, hw, cal, new_tokens=0)
        rows.append({"label": m.label, "context": m.context,
                     "decode_tok_s": 1 / m.decode_step_s if m.decode_step_s else None,
                     "predicted_decode_tok_s": p.decode_tok_s,
                     "prefill_tok_s": m.context / m.prefill_s if m.prefill_s else None,
                     "predicted_prefill_tok_s": p.prefill_tok_s})
    return rows


def plot_fit(measurements: Sequence[Measurement], shape: ModelShape, hw, cal: Calibration, path) -> None:
    """PNG: decode tok/s over context, measured (points) and predicted (lines, out to the
    model's max context), per policy label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(m.label for m in measurements if m.decode_step_s > 0))
    top = max(shape.max_context, *(m.context for m in measurements))  # predictions beyond the runs too
    grid = sorted({int(top * f) for f in (0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.97)} - {0})
    for n, label in enumerate(labels):
        runs = [m for m in measurements if m.label == label and m.decode_step_s > 0]
        color = f"C{n % 10}"
        ax.plot([m.context for m in runs], [1 / m.decode_step_s for m in runs], "o", color=color,
                label=f"{label} measured")
        curve = [predict(shape, runs[0].policy, c, hw, cal, new_tokens=0).decode_tok_s for c in grid]
        ax.plot(grid, curve, "-", color=color, alpha=0.7, label=f"{label} predicted")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"cost model vs engine runs (fit RMS error {cal.fit_rms_rel_error:.0%})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
