"""The policy search: the fastest policy that fits the machine and keeps the quality floor.

    candidates ──► placement fits? (RAM with headroom, disk, device) ──► quality floor? ──►
    fastest request (prefill + new tokens x decode step; within TIE of the fastest, the
    one closest to dense) ──► chosen, runners-up (best of each other family, with the
    term that lost it), rejected (faster ones that did not fit or failed the floor)

Knobs searched (`candidate_policies`): offload (the dense exact KV, where it fits), KV
bits, budget (all, 5/10/25%, 1K/2K/4K tokens), scorer (keys4, mass: the ones with measured
CPU kernels), speculation (sparse budgets), the device cache (every row, two layers for
background prefetch, one layer: the engine's minimum, and on CUDA all that fits), RAM and
disk budgets (RAM first, disk past it), prefill chunk, weight precision (`weight_bits`
when the policy has it: 16 and 8 bits, 4 only when pinned; else fp16/fp32 weights on a
CPU); threads come from the measurement (the count whose products ran fastest);
dense_layers stays 0 (no measured quality for other values yet). `fixed` pins keys.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from .config import Policy
from .costmodel import (Calibration, recompute_decision, Prediction, attended_blocks, kv_layout, layer_rows_bytes,
                        placement, predict)
from .errors import EdgekvError
from .hardware import Capacity, HardwareFigures
from .model import ModelShape
from .costmodel import weight_bits
from .quality_table import DEFAULT_FLOOR, QualityVerdict, judge, judge_weights, quality_rank, weights_kld
from .sizes import format_size

RAM_HEADROOM = 0.10  # share of available RAM left to everything else
RAM_RESERVE_BYTES = 1 << 30  # plus this: the Python process, torch, the tokenizer
DEVICE_RESERVE_BYTES = 1 << 30  # CUDA context and allocator slack
DISK_SHARE = 0.5  # at most this share of the free disk goes to the disk tier
TIE = 0.03  # candidates within 3% of the fastest count as equally fast: the closest to dense wins
BUDGETS = ("all", "25%", "10%", "5%", 4096, 2048, 1024)
CHUNKS = (256, 512, 1024, 2048)
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Request:
    """What to plan for: a model (its shape and who it is), a context, tokens to generate."""

    shape: ModelShape
    model_name: str
    model_identity: str
    context: int
    new_tokens: int = 256

    def __post_init__(self) -> None:
        if not 16 <= self.context <= self.shape.max_context:
            raise EdgekvError(f"invalid context {self.context}: plan for 16 to {self.shape.max_context} tokens "
                              f"(the model's context)")
        if self.new_tokens < 0 or self.context + self.new_tokens > self.shape.max_context:
            raise EdgekvError(f"context {self.context} + {self.new_tokens} new tokens exceeds the model's "
                              f"{self.shape.max_context}: lower --context or --new-tokens")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bytes a plan may use: host RAM (after headroom), free disk for the disk tier, device memory."""

    ram_bytes: int
    disk_bytes: int
    device_bytes: int
    disk_dir: str | None = None


def limits_for(capacity: Capacity, *, ram: int | None = None, disk: int | None = None,
               device: int | None = None, disk_dir: str | None = None) -> Limits:
    """The limits on a machine: its available RAM less headroom, DISK_SHARE of its free disk,
    its free device memory less a reserve; ram/disk/device replace them (caps given by the user)."""
    ram_free = int(capacity.ram_available_bytes * (1 - RAM_HEADROOM)) - RAM_RESERVE_BYTES
    dev_free = capacity.device_free_bytes - DEVICE_RESERVE_BYTES if capacity.has_cuda else 0
    return Limits(ram_bytes=max(0, ram if ram is not None else ram_free),
                  disk_bytes=max(0, disk if disk is not None else int(capacity.disk_free_bytes * DISK_SHARE)),
                  device_bytes=max(0, device if device is not None else dev_free), disk_dir=disk_dir)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One policy considered: its prediction, quality verdict, the share of the context a
    decode step attends, and why it cannot be planned ("": it can)."""

    prediction: Prediction
    quality: QualityVerdict
    fraction: float
    unfit: str = ""
    weights_kld: float = 0.0  # the weights' measured (or assumed) KL divergence from the model's own

    @property
    def policy(self) -> Policy:
        return self.prediction.policy

    @property
    def ok(self) -> bool:
        return not self.unfit and self.quality.allowed

    @property
    def rank(self) -> tuple:
        """Higher = closer to dense: the KV's closeness first, then the weights'."""
        p = self.policy
        return (*quality_rank(p.offload, p.kv_bits, self.fraction, self.quality.top1_agreement), -self.weights_kld)

    def label(self) -> str:
        """A short name: "dense exact KV" or "4-bit, 10% keys4, speculate, RAM 2 GiB + disk 5 GiB"."""
        p = self.policy
        if not p.offload:
            text = "dense exact KV"
        else:
            text = f"{p.kv_bits}-bit KV, budget {p.budget}" + (f" ({p.scorer})" if p.budget != "all" else "")
            text += ", speculate" if p.speculate is True else ""
            text += f", recompute {p.recompute:.0%}" if p.recompute not in (0, 0.0, "auto") else ""
            pl = self.prediction.placement
            text += f", device cache {format_size(p.device_cache_bytes)}"
            if pl.disk_rows:
                text += f", spills {format_size(pl.disk_rows * pl.row_bytes)} to disk"
        return text + f", weights {p.weight_bits}-bit, chunk {p.prefill_chunk}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A candidate shown beside the chosen one, and why it lost (or could not be planned)."""

    candidate: Candidate
    why: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The search's answer: the chosen candidate, runners-up, faster candidates rejected."""

    request: Request
    hardware: HardwareFigures
    calibration: Calibration
    limits: Limits
    chosen: Candidate
    runners_up: tuple[Outcome, ...]
    rejected: tuple[Outcome, ...]
    considered: int

    @property
    def prediction(self) -> Prediction:
        return self.chosen.prediction

    def policy_dict(self) -> dict[str, object]:
        """The chosen policy as a profile records it: every key the search sets (None left out;
        with offload off, none of the offloaded cache's keys)."""
        p = self.chosen.policy
        keys = ["device", "offload", "prefill_chunk", "threads", "weight_bits"]
        if p.offload:
            keys += ["kv_bits", "block_size", "recent_window", "budget", "scorer", "speculate", "dense_layers",
                     "recompute", "recompute_bits",
                     "device_cache_bytes", "ram_bytes", "disk_bytes", "disk_dir"]
        return {k: getattr(p, k) for k in keys if getattr(p, k) is not None}


# ---- candidates -------------------------------------------------------------------------------

def _budgets(request: Request) -> list[int | str]:
    """Budgets worth trying at this context: "all", shares, and token counts below half the context."""
    return [b for b in BUDGETS if not isinstance(b, int) or b <= request.context // 2]


def _round_up(n: int, unit: int = MiB) -> int:
    return -(-n // unit) * unit


def tier_sizes(request: Request, policy: Policy, limits: Limits, device_type: str) -> list[dict]:
    """Device cache / RAM / disk budgets to try for an offloaded policy.

    Device cache: every row of the request (no misses), two layers (the store prefetches
    the next layer in the background), one layer (the engine's minimum), and with CUDA all
    the device memory the rest leaves. RAM: what the limit leaves after everything else in
    host RAM (on a CPU the device cache's copies too), at most the KV at the model's max
    context. Disk: what the RAM budget leaves of the KV at max context, within the disk
    limit, so a longer prompt than planned spills instead of failing."""
    s, ctx = request.shape, request.context + request.new_tokens
    big = policy.replace(device_cache_bytes=1 << 60, ram_bytes=1 << 60)
    pl = placement(s, big, ctx, device_type)
    kv = pl.rows * pl.row_bytes
    kv_max = s.num_layers * s.num_kv_heads * kv_layout(s, policy, s.max_context).max_blocks * pl.row_bytes
    layer = layer_rows_bytes(s, policy)
    caches = {max(layer, _round_up(kv)), 2 * layer, layer}
    others = pl.weights_bytes + pl.exact_bytes + pl.summaries_bytes + pl.scratch_bytes  # not KV rows
    if device_type == "cuda":
        room = (limits.device_bytes - others) // MiB * MiB
        caches.add(max(layer, min(room, _round_up(kv_max))))
    out = []
    for cache in sorted(caches, reverse=True):
        if device_type == "cuda":
            ram_left = limits.ram_bytes
        else:
            ram_left = limits.ram_bytes - others - min(cache, kv)
        ram = max(layer, min(ram_left, _round_up(kv_max)) // MiB * MiB)
        spill = max(0, kv - ram)
        room = max(0, min(limits.disk_bytes, kv_max - ram)) // MiB * MiB
        disk = max(room, _round_up(spill)) if spill else (room if room >= pl.row_bytes else 0)
        sizes = dict(device_cache_bytes=cache, ram_bytes=ram, disk_bytes=disk)
        if disk and limits.disk_dir:
            sizes["disk_dir"] = limits.disk_dir
        out.append(sizes)
    return out


def candidate_policies(request: Request, hw: HardwareFigures, limits: Limits) -> Iterator[Policy]:
    """Every policy the search weighs (see the module doc)."""
    device = hw.device_type
    base = dict(device=device, threads=hw.threads if device == "cpu" else 0, dense_layers=0)
    weights = [dict(weight_bits=b) for b in (16, 8, 4)]
    chunks = [c for c in CHUNKS if c <= max(CHUNKS[0], request.context)]
    for w, chunk in itertools.product(weights, chunks):
        yield Policy.from_kwargs(**base, **w, prefill_chunk=chunk, offload=False, speculate=False, disk_bytes=0)
        for bits, budget in itertools.product((16, 8, 4, 2), _budgets(request)):
            sparse = budget != "all"
            for scorer, spec in itertools.product(("keys4", "mass") if sparse else ("keys4",),
                                                  (False, True) if sparse else (False,)):
                policy = Policy.from_kwargs(**base, **w, prefill_chunk=chunk, kv_bits=bits, budget=budget,
                                            scorer=scorer, speculate=spec)
                split = recompute_decision(request.shape, policy, hw, device).share
                for sizes in tier_sizes(request, policy, limits, device):
                    yield policy.replace(**sizes)
                    if split:  # KVPR: part of the blocks rebuilt from layer inputs, where it pays
                        yield policy.replace(**sizes, recompute=split)


def unfit_reason(pred: Prediction, limits: Limits, device_type: str, shape: ModelShape) -> str:
    """Why a prediction's placement cannot run within the limits ("" when it can)."""
    pl, p = pred.placement, pred.policy
    if pl.host_ram_bytes > limits.ram_bytes:
        return f"needs {format_size(pl.host_ram_bytes)} of RAM; the limit is {format_size(limits.ram_bytes)}"
    if device_type == "cuda" and pl.device_mem_bytes > limits.device_bytes:
        return (f"needs {format_size(pl.device_mem_bytes)} of device memory; the limit is "
                f"{format_size(limits.device_bytes)}")
    if not p.offload:
        return ""
    spill = pl.disk_rows * pl.row_bytes
    if spill > p.disk_bytes or p.disk_bytes > limits.disk_bytes:
        return (f"spills {format_size(spill)} of KV to disk; the disk limit is {format_size(limits.disk_bytes)}"
                if spill > limits.disk_bytes else f"its disk budget exceeds the limit {format_size(limits.disk_bytes)}")
    if p.offload and min(p.ram_bytes, p.device_cache_bytes) < layer_rows_bytes(shape, p):
        return f"RAM or device cache below one layer's KV ({format_size(layer_rows_bytes(shape, p))})"
    return ""


def evaluate(request: Request, policy: Policy, hw: HardwareFigures, cal: Calibration, limits: Limits, *,
             floor: float = DEFAULT_FLOOR, pinned: frozenset[str] = frozenset()) -> Candidate:
    """Predict one policy and judge it against the limits and the quality floor (the KV's,
    then the weights': keys in `pinned` were fixed by the user)."""
    s = request.shape
    pred = predict(s, policy, request.context, hw, cal, new_tokens=request.new_tokens)
    k, sparse = attended_blocks(s, policy, request.context)
    tail = kv_layout(s, policy, request.context).tail
    fraction = 1.0 if not sparse else min(1.0, (k * policy.block_size + tail) / request.context)
    quality = judge(request.model_name, request.model_identity, offload=policy.offload, kv_bits=policy.kv_bits,
                    fraction=fraction, scorer=policy.scorer, floor=floor)
    device_type = "cuda" if str(policy.device).startswith("cuda") else "cpu"
    weights = judge_weights(weight_bits(policy, device_type), pinned="weight_bits" in pinned,
                            model=request.model_name, identity=request.model_identity)
    if quality.allowed and not weights.allowed:
        quality = weights
    return Candidate(pred, quality, fraction, unfit_reason(pred, limits, device_type, s),
                     weights_kld(weight_bits(policy, device_type), request.model_name, request.model_identity))


# ---- the search -------------------------------------------------------------------------------

def search(request: Request, hw: HardwareFigures, cal: Calibration, limits: Limits, *,
           floor: float = DEFAULT_FLOOR, fixed: dict[str, object] | None = None) -> Plan:
    """The fastest plannable candidate (within TIE of it: the closest to dense), with runners-up
    and rejects. fixed: policy keys every candidate takes as given (validated like a policy)."""
    pinned = frozenset(fixed or ())
    candidates = [evaluate(request, p, hw, cal, limits, floor=floor, pinned=pinned)
                  for p in _pinned(candidate_policies(request, hw, limits), fixed)]
    good = [c for c in candidates if c.ok]
    if not candidates:
        raise EdgekvError(f"no policy can have all of {fixed}: drop one of them")
    if not good:
        raise EdgekvError(_nothing_fits(candidates, limits))
    fastest = min(c.prediction.request_s for c in good)
    pool = [c for c in good if c.prediction.request_s <= fastest * (1 + TIE)]
    chosen = max(pool, key=lambda c: (c.rank, -c.prediction.request_s))
    return Plan(request, hw, cal, limits, chosen, _runners_up(good, chosen), _rejected(candidates, chosen),
                len(candidates))


def _pinned(policies: Iterator[Policy], fixed: dict[str, object] | None) -> Iterator[Policy]:
    """The policies with the fixed keys set (those the keys make invalid dropped), each once."""
    if not fixed:
        yield from policies
        return
    Policy.from_kwargs(**fixed)  # an unknown key or bad value is the user's error, named
    seen: set[Policy] = set()
    for policy in policies:
        try:
            pinned = policy.replace(**fixed)
        except EdgekvError:
            continue
        if pinned not in seen:
            seen.add(pinned)
            yield pinned


def _family(c: Candidate) -> tuple:
    p = c.policy
    return (p.offload, p.kv_bits if p.offload else 0, p.budget, p.scorer if p.budget != "all" else "",
            p.speculate is True, c.prediction.placement.disk_rows > 0, bool(p.recompute))


def _best_per_family(cands: list[Candidate]) -> list[Candidate]:
    best: dict[tuple, Candidate] = {}
    for c in sorted(cands, key=lambda c: c.prediction.request_s):
        best.setdefault(_family(c), c)
    return list(best.values())


def _runners_up(good: list[Candidate], chosen: Candidate, count: int = 3) -> tuple[Outcome, ...]:
    """The best offloaded candidate attending every block (or the best sparse one, when the
    chosen attends every block), the best dense exact one, then the fastest other families."""
    others = [c for c in _best_per_family(good) if _family(c) != _family(chosen)]
    picks: list[Candidate] = []
    sparse = chosen.policy.budget != "all"
    for wanted in (lambda c: c.policy.offload and (c.policy.budget == "all") == sparse,
                   lambda c: not c.policy.offload):
        picks += [c for c in others if wanted(c)][:1]
    picks += [c for c in others if c not in picks][:max(0, count - len(picks))]
    return tuple(Outcome(c, why_lost(c, chosen)) for c in picks[:count])


def _rejected(candidates: list[Candidate], chosen: Candidate, count: int = 3) -> tuple[Outcome, ...]:
    """Candidates faster than the chosen one that could not be planned: the best of each family."""
    faster = [c for c in candidates if not c.ok and c.prediction.request_s < chosen.prediction.request_s]
    return tuple(Outcome(c, c.unfit or c.quality.reason) for c in _best_per_family(faster)[:count])


def _nothing_fits(candidates: list[Candidate], limits: Limits) -> str:
    fitting = [c for c in candidates if not c.unfit]
    if fitting:
        return ("no plan keeps the quality floor: every configuration that fits is below it "
                f"({fitting[0].quality.reason}); lower --quality-floor or give the plan more memory")
    def overshoot(c: Candidate) -> float:  # how far past its limits a candidate is, the worst memory counted
        pl = c.prediction.placement
        return max(pl.host_ram_bytes / max(limits.ram_bytes, 1), pl.device_mem_bytes / max(limits.device_bytes, 1))

    least = min(candidates, key=overshoot)
    return (f"nothing fits this machine: the smallest plan ({least.label()}) {least.unfit}; free memory, "
            f"point --disk-dir at a disk with room, or plan a shorter --context")


# ---- explaining --------------------------------------------------------------------------------

DECODE_PHRASES = {
    "weights": "reading the weights", "layers": "fixed per-layer work", "selection": "block selection",
    "attention": "attention over the KV", "speculation": "speculation's early query",
    "fetch_ram": "KV fetches from RAM", "fetch_disk": "KV fetches from disk", "recompute": "K/V recomputation",
    "hidden": "less of its transfers hidden behind compute",
}
PREFILL_PHRASES = {
    "linear": "prefill products", "attention": "prefill attention", "chunks": "per-chunk overhead",
    "kv_decode": "prefill decoding the stored KV again per chunk", "compress": "compressing blocks",
    "kv_fetch": "prefill fetching stored rows past the device cache", "disk_write": "writing the disk tier",
}


def why_lost(loser: Candidate, winner: Candidate) -> str:
    """The term that costs the loser most over the whole request, against the winner."""
    a, b = loser.prediction, winner.prediction
    diffs: dict[str, float] = {}
    for terms, weight, phrases in ((a.decode_terms, a.new_tokens, DECODE_PHRASES), (b.decode_terms, -b.new_tokens,
                                   DECODE_PHRASES), (a.prefill_terms, 1, PREFILL_PHRASES),
                                   (b.prefill_terms, -1, PREFILL_PHRASES)):
        for name, seconds in terms:
            diffs[phrases[name]] = diffs.get(phrases[name], 0.0) + weight * seconds
    slower = a.request_s - b.request_s
    if slower <= 0:
        return (f"as fast within {TIE:.0%} ({a.request_s:.1f} vs {b.request_s:.1f} s); the chosen one is "
                f"closer to dense")
    worst = max(diffs, key=diffs.get)
    return (f"{slower:.1f} s slower over the request ({a.decode_tok_s:.1f} vs {b.decode_tok_s:.1f} tok/s decode, "
            f"{a.prefill_tok_s:.0f} vs {b.prefill_tok_s:.0f} tok/s prefill): {worst} costs it "
            f"{diffs[worst]:+.1f} s")


def binding_text(pred: Prediction, hw: HardwareFigures) -> str:
    """Which resource binds a decode step, and its share of the step."""
    name = pred.binding
    share = pred.term(name) / pred.decode_step_s
    return f"{DECODE_PHRASES[name]} ({share:.0%} of a decode step)"


def explain(plan: Plan) -> str:
    """A short account: the chosen policy and its figures, what binds, runners-up and why they lost."""
    r, c = plan.request, plan.chosen
    p = c.prediction
    kv = p.placement.kv_bytes
    lines = [
        f"plan for {r.model_name} at {r.context} tokens + {r.new_tokens} new, on {plan.hardware.device_name} "
        f"({plan.hardware.source}); {plan.considered} candidates",
        f"chosen: {c.label()}",
        f"  predicted: prefill {p.prefill_tok_s:,.0f} tok/s, decode {p.decode_tok_s:.1f} tok/s, request "
        f"{p.request_s:.1f} s; KV device {format_size(kv['device'])}, RAM {format_size(kv['ram'])}, "
        f"disk {format_size(kv['disk'])}",
        f"  binds: {binding_text(p, plan.hardware)}; step "
        + ", ".join(f"{n} {1e3 * s:.2f} ms" for n, s in p.decode_terms if abs(s) >= 5e-6),
        f"  quality: {c.quality.source}",
    ]
    if c.policy.offload:
        decision = recompute_decision(r.shape, c.policy, plan.hardware, plan.hardware.device_type)
        used = c.policy.recompute
        lines.append(f"  recompute: {f'{used:.0%} of blocks, ' if used else ''}{decision.reason}")
    lines += [f"  note: {n}" for n in p.notes]
    if plan.runners_up:
        lines.append("runners-up:")
        lines += [f"  {o.candidate.label()}: {o.why}" for o in plan.runners_up]
    if plan.rejected:
        lines.append("faster but not plannable:")
        lines += [f"  {o.candidate.label()} ({o.candidate.prediction.decode_tok_s:.1f} tok/s decode): {o.why}"
                  for o in plan.rejected]
    cal = plan.calibration
    fit = (f"fitted to {cal.fit_runs} engine runs (RMS error {cal.fit_rms_rel_error:.0%})" if cal.fit_runs
           else "not fitted to engine runs on this machine (priors)")
    lines.append(f"cost model constants: {fit}")
    return "\n".join(lines)


def prediction_table(plan: Plan) -> dict[str, object]:
    """The chosen policy's predictions as a profile's [predictions] table (seconds, tok/s, bytes)."""
    p = plan.prediction
    pl = p.placement
    table: dict[str, object] = {
        "prefill_tok_s": round(p.prefill_tok_s, 3), "decode_tok_s": round(p.decode_tok_s, 3),
        "request_s": round(p.request_s, 3), "prefill_s": round(p.prefill_s, 3),
        "decode_step_s": round(p.decode_step_s, 6),
        **{f"kv_{tier}_bytes": b for tier, b in pl.kv_bytes.items()},
        "weights_bytes": pl.weights_bytes, "host_ram_bytes": pl.host_ram_bytes, "device_mem_bytes": pl.device_mem_bytes,
        "binding": plan.prediction.binding, "quality": plan.chosen.quality.source,
    }
    table.update({f"decode_{name}_s": round(s, 6) for name, s in p.decode_terms})
    table.update({f"prefill_{name}_s": round(s, 4) for name, s in p.prefill_terms})
    return table
