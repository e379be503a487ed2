"""Measured quality of KV configurations per model: the floor `edgekv tune` plans above.

An entry says how close one configuration (KV bits x budget x scorer) came to the dense,
exact KV cache on one model, measured by `edgekv bench quality` on the same engine path:

    top1_agreement  teacher-forced: the dense run's tokens fed back, the share of positions
                    where this configuration's greedy choice is dense's token (1.0 = dense)
    kld             mean KL divergence of the next-token distribution from dense's, nats
                    (None: not measured; `bench quality --tasks kld` measures it)
    ppl_ratio       perplexity over dense's on a long document (None: not measured)

`judge` turns the table into a yes/no for a candidate: measured entries are held to the
floor (`DEFAULT_FLOOR` top-1 agreement, and `max_kld` when one is given); configurations
nobody measured fall back to conservative defaults: 4-, 8- and 16-bit KV attending
every block, or a budget of at least `DEFAULT_MIN_BUDGET` of the context with the keys4
or mass scorer; never 2-bit. A budget between measured ones is judged by the
nearest measured budget below it (quality grows with the budget). The exact KV (offload
off) is the reference itself.

To refresh: run the command of an entry's `source` on the model and replace the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FLOOR = 0.88  # teacher-forced top-1 agreement with dense
DEFAULT_MIN_BUDGET = 0.10  # share of the context an unmeasured sparse budget must attend
DEFAULT_SCORERS = ("keys4", "mass")  # scorers allowed without a measurement (minmax lost passkeys)

EMBEDDED = ("SmolLM2-135M-Instruct.Q4_1", "174b85b4086a63f9bd409688")  # name, ModelSource.identity

_README = ("figures quoted in README.md at commit 19547d7: edgekv bench quality, 4 documents of 7.4K "
           "tokens at even offsets through the pydoc text, 64 tokens each (2026-12)")


@dataclass(frozen=True, slots=True)
class QualityEntry:
    """One measured configuration on one model (see the module doc for the figures)."""

    model: str  # ModelSource.name
    identity: str  # ModelSource.identity ("" matches by name)
    kv_bits: int
    budget: str  # "all" or "N%"
    scorer: str  # the block scorer; "-" for budget "all"
    top1_agreement: float
    kld: float | None
    ppl_ratio: float | None
    context: int  # tokens of the documents
    documents: int
    source: str  # the command and date that measured it

    @property
    def fraction(self) -> float:
        return 1.0 if self.budget == "all" else float(self.budget[:-1]) / 100


_KLD = ("edgekv bench quality --tasks kld --kld-docs 2 --kld-context 8000 --kld-tokens 128 --kv-bits 4 "
        "--budgets all,5%,10%,2048 --scorers keys4, and --kv-bits 16,8 --budgets all (2026-12-03); "
        "budget 2048 of 8000 tokens filed as 25%")

ENTRIES: tuple[QualityEntry, ...] = (
    QualityEntry(*EMBEDDED, 16, "all", "-", 1.00, 1e-6, 0.9999, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 8, "all", "-", 1.00, 2.9e-5, 0.9986, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 4, "all", "-", 0.965, 0.0119, 1.026, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 4, "5%", "keys4", 0.902, 0.0743, 1.094, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 4, "10%", "keys4", 0.930, 0.0379, 1.070, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 4, "25%", "keys4", 0.957, 0.0163, 1.035, 8000, 2, _KLD),
    QualityEntry(*EMBEDDED, 4, "10%", "mass", 0.92, None, 0.99, 7400, 4, _README),
)


@dataclass(frozen=True, slots=True)
class QualityVerdict:
    """Whether a configuration may be planned, the figure it rests on, and where that came from."""

    allowed: bool
    top1_agreement: float | None  # None: not measured (a default rule decided)
    source: str  # "exact", "measured: …" or "default: …"
    reason: str = ""  # why not allowed


def _matches(entry: QualityEntry, model: str, identity: str) -> bool:
    return entry.identity == identity if entry.identity and identity else entry.model == model


def judge(model: str, identity: str, *, offload: bool, kv_bits: int, fraction: float, scorer: str,
          floor: float = DEFAULT_FLOOR, max_kld: float | None = None,
          entries: tuple[QualityEntry, ...] = ENTRIES) -> QualityVerdict:
    """May a configuration be planned for this model? fraction: the share of the context a
    decode step attends (1.0: every block)."""
    if not offload:
        return QualityVerdict(True, 1.0, "exact: the dense KV is the reference")
    dense = fraction >= 1.0
    same = [e for e in entries if _matches(e, model, identity) and e.kv_bits == kv_bits
            and (e.budget == "all" if dense else e.budget != "all" and e.scorer == scorer)]
    below = [e for e in same if e.fraction <= fraction + 1e-9]
    if below:
        e = max(below, key=lambda x: x.fraction)
        what = f"{kv_bits}-bit KV, budget {e.budget}" + ("" if dense else f", {scorer}")
        source = (f"measured: {what}: teacher-forced top-1 agreement {e.top1_agreement:.2f}"
                  + (f", KLD {e.kld:.3f}" if e.kld is not None else "") + f" ({e.documents} documents of "
                  f"{e.context} tokens; {e.source})")
        if e.top1_agreement < floor:
            return QualityVerdict(False, e.top1_agreement, source,
                                  f"below the quality floor: agreement {e.top1_agreement:.2f} < {floor:.2f}")
        if max_kld is not None and e.kld is not None and e.kld > max_kld:
            return QualityVerdict(False, e.top1_agreement, source, f"KLD {e.kld:.3f} above the limit {max_kld:.3f}")
        return QualityVerdict(True, e.top1_agreement, source)
    return _default(kv_bits, fraction, scorer)


def _default(kv_bits: int, fraction: float, scorer: str) -> QualityVerdict:
    """The rule for configurations nobody measured on this model."""
    if kv_bits <= 2:
        return QualityVerdict(False, None, "default: 2-bit KV only where measured",
                              "2-bit KV is not planned unless `edgekv bench quality` measured it on this model")
    if fraction >= 1.0:
        return QualityVerdict(True, None, f"default: {kv_bits}-bit KV attending every block")
    if fraction + 1e-9 < DEFAULT_MIN_BUDGET:
        return QualityVerdict(False, None, "default: budgets below 10% only where measured",
                              f"a budget of {fraction:.1%} of the context is not planned unless measured on this model")
    if scorer not in DEFAULT_SCORERS:
        return QualityVerdict(False, None, f"default: scorer {scorer} only where measured",
                              f"scorer {scorer} is not planned unless measured on this model")
    return QualityVerdict(True, None, f"default: {kv_bits}-bit KV at a budget of at least 10% ({scorer})")


_WEIGHTS = ("edgekv bench quality --tasks kld --kld-docs 2 --kld-context 4096 --kld-tokens 128 --weight-bits 16,8,4 "
            "--kv-bits 16 --budgets all (2026-12-03)")
WEIGHT_ENTRIES = {  # (model, identity) -> {bits: (top-1 agreement, KLD)} vs the model's own weights
    EMBEDDED: {16: (1.00, 1.2e-5), 8: (0.973, 1.3e-3), 4: (1.00, 0.0)},  # 4: the GGUF's Q4_1 blocks, exact
}


ASSUMED_WEIGHTS_KLD = {32: 0.0, 16: 0.0, 8: 1e-4, 4: 1e-2}  # where nothing was measured: more bits, closer


def _measured_weights(model: str, identity: str) -> dict:
    return next((v for (name, ident), v in WEIGHT_ENTRIES.items()
                 if (ident == identity if ident and identity else name == model)), {})


def weights_kld(bits: int, model: str = "", identity: str = "") -> float:
    """How far weights of `bits` bits move this model's next-token distribution (KLD, nats):
    measured where `WEIGHT_ENTRIES` has it, else `ASSUMED_WEIGHTS_KLD` (an order, not a figure)."""
    measured = _measured_weights(model, identity)
    return measured[bits][1] if bits in measured else ASSUMED_WEIGHTS_KLD.get(bits, 1e-2)


def judge_weights(bits: int, *, pinned: bool = False, model: str = "", identity: str = "") -> QualityVerdict:
    """May weights of `bits` bits be planned? Where `edgekv bench quality` measured them on
    this model (`WEIGHT_ENTRIES`), when they keep the floor's agreement; elsewhere 16 and 8
    bits (per-group scales: within noise of 16-bit in published studies) always, 4 bits
    only when the user pins it (`--fix weight_bits=4`)."""
    measured = _measured_weights(model, identity)
    if bits in measured:
        top1, kld = measured[bits]
        source = f"measured: {bits}-bit weights: top-1 {top1:.3f}, KLD {kld:.1e} ({_WEIGHTS})"
        if top1 >= DEFAULT_FLOOR or pinned:
            return QualityVerdict(True, top1, source)
        return QualityVerdict(False, top1, source, f"{bits}-bit weights measured below the floor")
    if bits >= 8 or pinned:
        return QualityVerdict(True, None, f"default: {bits}-bit weights")
    return QualityVerdict(False, None, "default: 4-bit weights only when pinned",
                          "4-bit weights are not planned unless pinned (--fix weight_bits=4) or measured on this model")


def quality_rank(offload: bool, kv_bits: int, fraction: float, agreement: float | None) -> tuple:
    """Sort key, higher = closer to dense: the exact KV; then attending every block (selection
    costs more agreement than 4-bit storage: 0.90 vs 0.96 measured on the embedded model);
    then more bits; then a larger budget."""
    return (0 if offload else 1, fraction >= 1.0, kv_bits, min(fraction, 1.0), agreement or 0.0)
