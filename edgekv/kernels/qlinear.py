"""Quantized projection weights (4 or 8 bits per weight) and their matrix product.

A decode step reads every projection weight once; at fp16 that is 2 bytes per
parameter. A `QuantizedWeight` holds the same matrix in 4-bit codes with one fp16 scale
and zero point per group of ``group_size`` weights along a row (0.5625 bytes/parameter
at the default group of 64; 0.625 for GGUF's Q4_0/Q4_1 at group 32, 0.578 for Q4_K), or
in 8-bit codes (1.03-1.07). `qlinear` multiplies activations by it in fp32: on the CPU a
compiled kernel that unpacks the codes in registers (`edgekv.kernels.qlinear_numba`: at
4 bits 2.25-3x the speed of torch's fp16 matrix-vector product on large matrices,
1.4-2.2x on the embedded model's small ones; measured there); elsewhere the reference
twin `qlinear_torch` (dequantize, then ``F.linear``).

Where a GGUF file's blocks fit the format exactly, `from_gguf` takes them over without
re-quantizing: Q4_0, Q4_1 and Q4_K become 4-bit weights; Q8_0, Q5_0, Q5_1, Q5_K and Q6_K
8-bit weights (their 5- and 6-bit codes fit in 8 bits: the same values, at 8 bits'
bytes). Every other type gives None: the caller quantizes the float matrix with
`quantize_weight`. `transformers_row_order` undoes llama.cpp's permutation of a llama
model's q/k rows, so that the weights are transformers' matrices bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgekv.quant import round_down_f16, round_up_f16

from ._backend import resolve_backend

__all__ = ["QuantizedWeight", "from_gguf", "qlinear", "qlinear_torch", "quantize_weight", "stack_rows",
           "time_qlinear", "transformers_row_order"]

BITS = (4, 8)
DEFAULT_GROUP = {4: 64, 8: 64}
FP16_MAX = 65504.0


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedWeight:
    """A weight matrix ``W [out_features, in_features]`` in ``bits``-bit codes.

    Rows are cut into ``G = ceil(in_features / group_size)`` groups of ``group_size``
    consecutive weights (the last one zero-padded). Weight ``(r, c)`` with ``g = c //
    group_size`` decodes as::

        W[r, c] = scale[r, g] * code[r, c] + zero[r, g]        (zero None: + 0)

    in fp32, where ``scale`` and ``zero`` are fp16 ("flat"), or, with ``super_groups =
    S > 0`` (GGUF's K-quants), small integers times an fp16 factor per super-block of
    ``S`` groups: ``scale[r, g] = super_scale[r, g // S] * scale_int[r, g]`` (exact in
    fp32), and likewise ``zero`` with ``super_zero``.

    Rows are stored in tiles of ``TILE = 32`` (``out_features`` rounded up with rows of
    zeros): the 32 rows of a tile lie side by side, so a kernel multiplies 32 rows at
    once by one element of x, without a horizontal sum. ``codes`` at 4 bits (unsigned
    codes 0..15, ``h = group_size / 2``)::

        codes[t, g, j, i]  (uint8 [tiles, G, h, 32]; tile t = rows 32t .. 32t+31)

                      row 32t+0   row 32t+1        row 32t+31
        t, g, j=0:   [ hi | lo ] [ hi | lo ] ... [ hi | lo ]     32 bytes
        t, g, j=1:   [ hi | lo ] ...                            32 bytes
        ...
        lo nibble of codes[t, g, j, i]: code of (row 32t+i, column g*group_size + j)
        hi nibble of codes[t, g, j, i]: code of (row 32t+i, column g*group_size + h + j)

    (per row and group, the nibble order of GGUF's Q4_0/Q4_1 blocks at group 32). At 8
    bits ``codes[t, g, j, i]`` is the signed code of (row 32t+i, column g*group_size + j),
    ``int8 [tiles, G, group_size, 32]``.

    Tensors (all on one device, contiguous; ``[tiles, X, 32]`` = ``X`` values per row)::

        codes        uint8 [tiles, G, group_size/2, 32] (4 bits) | int8 [tiles, G, group_size, 32] (8 bits)
        scale        fp16 [tiles, G, 32]  (flat) | uint8 or int8 [tiles, G, 32] (super_groups > 0)
        zero         like scale, or None (8 bits only: symmetric codes)
        super_scale  fp16 [tiles, ceil(G / super_groups), 32]   (super_groups > 0, else None)
        super_zero   fp16 [tiles, ceil(G / super_groups), 32]   (with a zero and super_groups > 0)

    Units: ``nbytes`` is the bytes of those tensors (what a matrix-vector product reads),
    padding rows included. Build one with `quantize_weight`, `from_gguf` or `from_rows`.
    """

    bits: int
    out_features: int
    in_features: int
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    super_scale: torch.Tensor | None = None
    super_zero: torch.Tensor | None = None
    super_groups: int = 0
    kernel_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    """What a compiled backend prepared for this weight (its arrays as the kernel reads
    them), made on first use; a new weight (`dataclasses.replace`, `to`) starts empty."""

    def __post_init__(self):
        _check_format(self)

    def __repr__(self) -> str:
        form = f"super_groups={self.super_groups}, " if self.super_groups else ""
        zero = "" if self.zero is not None else "symmetric, "
        return (f"QuantizedWeight({self.bits} bits, {self.out_features} x {self.in_features}, group {self.group_size}, "
                f"{form}{zero}{self.bytes_per_parameter:.4g} bytes/parameter, {self.device})")

    @classmethod
    def from_rows(cls, bits: int, in_features: int, group_size: int, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, super_scale: torch.Tensor | None = None,
                  super_zero: torch.Tensor | None = None, super_groups: int = 0) -> QuantizedWeight:
        """A weight from row-major parts: ``codes [out, G, group_size/2]`` packed bytes
        (4 bits, `pack_nibbles` order) or ``[out, G, group_size]`` int8 (8 bits),
        ``scale``/``zero`` ``[out, G]``, ``super_scale``/``super_zero`` ``[out, S]``."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            raise ValueError(f"row-major codes must be a 3-d tensor [out, G, bytes per group] "
                             f"(got {tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__})")
        return cls(bits, codes.shape[0], in_features, group_size, *(_tile(t) for t in (
            codes, scale, zero, super_scale, super_zero)), super_groups)

    def rows(self) -> dict[str, torch.Tensor | None]:
        """The parts in row order (the arguments of `from_rows`), padding rows dropped."""
        names = ("codes", "scale", "zero", "super_scale", "super_zero")
        return {name: _untile(getattr(self, name), self.out_features) for name in names}

    @property
    def tiles(self) -> int:
        return -(-self.out_features // TILE)

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes resident: codes, scales, zeros and super-block factors."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def bytes_per_parameter(self) -> float:
        return self.nbytes / (self.out_features * self.in_features)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.super_scale, self.super_zero) if t is not None]

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 ``scale [out, G]`` and ``zero [out, G]`` (None when symmetric), as decoded."""
        parts = self.rows()
        scale, zero = parts["scale"].float(), None if parts["zero"] is None else parts["zero"].float()
        if self.super_groups:
            widen = (lambda t: t.float().repeat_interleave(self.super_groups, dim=1)[:, :self.num_groups])
            scale = widen(parts["super_scale"]) * scale
            zero = None if zero is None else widen(parts["super_zero"]) * zero
        return scale, zero

    def unpacked_codes(self) -> torch.Tensor:
        """The codes as ``int16 [out, G, group_size]`` (padding columns included)."""
        codes = self.rows()["codes"]
        return (codes if self.bits == 8 else unpack_nibbles(codes)).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W [out_features, in_features]`` in ``dtype`` (computed in fp32: ``scale * code
        + zero``, one rounding each, the order of GGUF's own dequantization)."""
        scale, zero = self.group_params()
        w = scale[:, :, None] * self.unpacked_codes().float()
        if zero is not None:
            w = w + zero[:, :, None]
        return w.reshape(self.out_features, -1)[:, :self.in_features].to(dtype)

    def head_rows(self, rows: int) -> QuantizedWeight:
        """The weight of its first ``rows`` rows, sharing this one's memory (``rows`` a
        multiple of the tile: whole tiles are a view), e.g. the query rows of a stacked
        q/k/v projection."""
        if rows % TILE or not 0 < rows <= self.out_features:
            raise ValueError(f"head_rows needs a multiple of {TILE} rows up to {self.out_features} (got {rows})")
        t = rows // TILE
        cut = (lambda x: None if x is None else x[:t])
        return dataclasses.replace(self, out_features=rows, codes=cut(self.codes), scale=cut(self.scale),
                                   zero=cut(self.zero), super_scale=cut(self.super_scale),
                                   super_zero=cut(self.super_zero))

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` (int64 [k]) of ``W``, decoded: ``[k, in_features]`` in ``dtype`` (an
        embedding lookup in a quantized table; reads only those rows' bytes)."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        tile, lane = index // TILE, index % TILE

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:  # [tiles, ..., TILE] -> [k, ...]
            return None if t is None else t[tile, ..., lane]

        picked = QuantizedWeight.from_rows(self.bits, self.in_features, self.group_size, pick(self.codes),
                                           pick(self.scale), pick(self.zero), pick(self.super_scale),
                                           pick(self.super_zero), self.super_groups)
        return picked.dequantize(dtype)

    def take_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows ``index`` (int64 [k]: a subset or a permutation of the rows)."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        parts = {name: None if t is None else t.index_select(0, index) for name, t in self.rows().items()}
        return QuantizedWeight.from_rows(self.bits, self.in_features, self.group_size, **parts,
                                         super_groups=self.super_groups)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(self, codes=move(self.codes), scale=move(self.scale), zero=move(self.zero),
                                   super_scale=move(self.super_scale), super_zero=move(self.super_zero))


TILE = 32  # rows stored side by side (QuantizedWeight)


def _tile(t: torch.Tensor | None) -> torch.Tensor | None:
    """Row-major ``[out, ...]`` -> ``[tiles, ..., TILE]``, rows padded with zeros."""
    if t is None:
        return None
    n = t.shape[0]
    pad = -n % TILE
    if pad:
        t = torch.cat((t, t.new_zeros(pad, *t.shape[1:])))
    t = t.reshape(-1, TILE, *t.shape[1:])
    return t.permute(0, *range(2, t.dim()), 1).contiguous()


def _untile(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The inverse of `_tile`: ``[tiles, ..., TILE]`` -> ``[rows, ...]``."""
    if t is None:
        return None
    t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return t.reshape(-1, *t.shape[2:])[:rows]


def _check_format(q: QuantizedWeight) -> None:
    """ValueError naming what is wrong with a QuantizedWeight's fields."""
    if q.bits not in BITS:
        raise ValueError(f"weight bits must be 4 or 8 (got {q.bits})")
    if q.out_features < 1 or q.in_features < 1:
        raise ValueError(f"a quantized weight needs at least one row and column "
                         f"(got {q.out_features} x {q.in_features})")
    if q.group_size < 2 or q.group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2 (got {q.group_size})")
    t, g = q.tiles, q.num_groups
    code_dtype, per_group = (torch.uint8, q.group_size // 2) if q.bits == 4 else (torch.int8, q.group_size)
    _check_tensor("codes", q.codes, (code_dtype,), (t, g, per_group, TILE))
    if q.super_groups < 0:
        raise ValueError(f"super_groups must be >= 0 (got {q.super_groups})")
    if q.zero is None and q.bits == 4:
        raise ValueError("4-bit weights need a zero point per group (unsigned codes)")
    if q.super_groups == 0:
        for name in ("scale", "zero"):
            if getattr(q, name) is not None:
                _check_tensor(name, getattr(q, name), (torch.float16,), (t, g, TILE))
        if q.super_scale is not None or q.super_zero is not None:
            raise ValueError("super_scale/super_zero are only used with super_groups > 0")
    else:
        supers = -(-g // q.super_groups)
        for name, super_name in (("scale", "super_scale"), ("zero", "super_zero")):
            if getattr(q, name) is None:
                if getattr(q, super_name) is not None:
                    raise ValueError(f"{super_name} given without {name}")
                continue
            _check_tensor(name, getattr(q, name), (torch.uint8, torch.int8), (t, g, TILE))
            if getattr(q, super_name) is None:
                raise ValueError(f"{name} of integers (super_groups > 0) needs {super_name}")
            _check_tensor(super_name, getattr(q, super_name), (torch.float16,), (t, supers, TILE))
    devices = {x.device for x in q._tensors()}
    if len(devices) > 1:
        raise ValueError(f"a quantized weight's tensors must share one device (got {sorted(map(str, devices))})")


def _check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != shape:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be a {want} tensor of shape {shape} (got {got})")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[..., 2h]`` -> bytes ``[..., h]``: code j in the low nibble of
    byte j, code h + j in its high nibble."""
    h = codes.shape[-1] // 2
    return (codes[..., :h] | (codes[..., h:] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: bytes ``[..., h]`` -> uint8 codes ``[..., 2h]``."""
    return torch.cat((packed & 15, packed >> 4), dim=-1)


# ----------------------------------------------------------------------------- quantize

def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int | None = None, *,
                    clip_search: bool = False) -> QuantizedWeight:
    """``w [out, in]`` (float, finite, within the fp16 range) as a `QuantizedWeight`.

    4 bits (default group 64, 0.5625 bytes/parameter): asymmetric per group; the zero
    point is the group minimum rounded down to fp16 and the scale ``(max - zero) / 15``
    rounded up to fp16, so the grid covers the group; codes are ``round((w - zero) /
    scale)`` (round half to even) against those stored fp16 values, so every weight
    decodes within ``scale / 2`` of its input (plus fp32 rounding).
    ``clip_search`` (4 bits): per group, the range ends are also tried shrunk toward 0 by
    5-25% (the minimum first, then the maximum), keeping the grid with the least squared
    error; a clipped outlier decodes farther than ``scale / 2``, but a group's total error
    never exceeds the min/max grid's. On real weights (8192 rows of Qwen2.5-Coder's Q8_0
    output head and of the embedded model's Q8_0 embedding) it lowered the RMS error by
    6% (0.090 -> 0.085 of the weights' RMS at group 64; group 32 without it: 0.079) and
    took 7-10x as long, hence off by default.
    8 bits (default group 64, 1.03 bytes/parameter): symmetric, ``scale = max|w| / 127``
    rounded up to fp16, codes ``round(w / scale)`` in -127..127, within ``scale / 2``.
    A group of zeros (at 4 bits: any constant group of an fp16 value) decodes exactly.
    """
    if bits not in BITS:
        raise ValueError(f"weight bits must be 4 or 8 (got {bits})")
    group_size = DEFAULT_GROUP[bits] if group_size is None else int(group_size)
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2 (got {group_size})")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or 0 in w.shape:
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"the weight must be a non-empty 2-d float tensor [out, in] (got {got})")
    w = w.float()
    if not torch.isfinite(w).all() or w.abs().max() > FP16_MAX:
        raise ValueError("the weight must be finite and within the fp16 range (|w| <= 65504)")
    n, k = w.shape
    g = -(-k // group_size)
    pad = g * group_size - k
    if pad:  # repeat the last column: the padded group's range is its real columns'
        w = torch.cat((w, w[:, -1:].expand(n, pad)), dim=1)
    wg = w.view(n, g, group_size)
    if bits == 4:
        low, high = wg.amin(-1), wg.amax(-1)
        codes, scale, zero, err = _grid_4bit(wg, low, high)
        for end in ("min", "max") if clip_search else ():
            for shrink in CLIP_SHRINKS:
                trial = _grid_4bit(wg, low * shrink if end == "min" else low, high * shrink if end == "max" else high)
                better = trial[3] < err
                codes = torch.where(better[..., None], trial[0], codes)
                scale, zero, err = (torch.where(better, a, b) for a, b in zip(trial[1:], (scale, zero, err)))
                low, high = torch.where(better, low * shrink, low) if end == "min" else low, \
                    torch.where(better, high * shrink, high) if end == "max" else high
        codes.view(n, -1)[:, k:] = 0
        return QuantizedWeight.from_rows(4, k, group_size, pack_nibbles(codes), scale, zero)
    scale = _fp16_toward(wg.abs().amax(-1) / 127, down=False)
    codes = torch.round(_divide(wg, scale)).clamp_(-127, 127).to(torch.int8)
    codes.view(n, -1)[:, k:] = 0
    return QuantizedWeight.from_rows(8, k, group_size, codes, scale, None)


CLIP_SHRINKS = (0.95, 0.9, 0.85, 0.8, 0.75)


def _grid_4bit(wg: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
    """The 4-bit grid from ``low`` to ``high`` [n, G] for groups ``wg [n, G, gs]``: codes
    (uint8), fp16 scale and zero, and each group's squared error."""
    zero = _fp16_toward(low, down=True)
    scale = _fp16_toward((high - zero.float()).clamp(min=0) / 15, down=False)
    codes = torch.round(_divide(wg - zero.float()[..., None], scale)).clamp_(0, 15)
    err = (codes * scale.float()[..., None] + zero.float()[..., None] - wg).pow(2).sum(-1)
    return codes.to(torch.uint8), scale, zero, err


def _divide(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w [n, G, gs] / scale [n, G]`` (fp16), 0 where the scale is 0."""
    s = scale.float()[..., None]
    return torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0)


def _fp16_toward(x: torch.Tensor, *, down: bool) -> torch.Tensor:
    """fp32 ``x`` as fp16, rounded toward -inf (``down``) or +inf, clamped to the fp16 range."""
    x = x.clamp(-FP16_MAX, FP16_MAX)
    return round_down_f16(x) if down else round_up_f16(x)


def stack_rows(*weights: QuantizedWeight) -> QuantizedWeight:
    """Weights of the same input stacked along the output rows (q, k, v -> qkv): one
    matrix product instead of several. They must share bits, in_features, group_size and
    form (flat or super-block, with or without zero); else ValueError (quantize them
    alike first)."""
    if not weights:
        raise ValueError("stack_rows needs at least one weight")
    first = weights[0]
    key = (lambda q: (q.bits, q.in_features, q.group_size, q.super_groups, q.scale.dtype,
                      None if q.zero is None else q.zero.dtype, q.device))
    for q in weights[1:]:
        if key(q) != key(first):
            raise ValueError(f"cannot stack quantized weights of different forms: {key(first)} vs {key(q)} "
                             "(bits, in_features, group_size, super_groups, scale dtype, zero dtype, device)")
    parts = [q.rows() for q in weights]
    cat = (lambda name: None if parts[0][name] is None else torch.cat([p[name] for p in parts]))
    return QuantizedWeight.from_rows(first.bits, first.in_features, first.group_size,
                                     **{name: cat(name) for name in parts[0]}, super_groups=first.super_groups)


# ----------------------------------------------------------------------------- GGUF

def from_gguf(tensor_type, raw, shape: tuple[int, int]) -> QuantizedWeight | None:
    """A GGUF tensor's blocks as a `QuantizedWeight` with the same values, or None when
    its type does not map exactly (F32, F16, BF16, Q2_K, Q3_K, IQ*, ...: quantize the
    dequantized floats instead).

    tensor_type: a ``gguf.GGMLQuantizationType`` (or its name, e.g. ``"Q4_K"``).
    raw: the tensor's bytes as stored (``GGUFReader(...).tensors[i].data``: a uint8 array,
    any shape), ``bytes`` or a uint8 tensor. shape: ``(out_features, in_features)`` in
    torch order (the reader's ``tensor.shape`` reversed). Rows come out in the file's
    order; a llama file's q/k rows are permuted (see `transformers_row_order`).

    Mapping (``d``, ``m``, ``dmin`` fp16; ``sc``, ``mn`` small integers):
    Q4_0 ``d * (q - 8)`` -> 4 bits, group 32, scale d, zero -8d (exact in fp16);
    Q4_1 ``d * q + m`` -> 4 bits, group 32; Q4_K ``d*sc * q - dmin*mn`` -> 4 bits, group
    32, super_groups 8 (uint8 sc, mn; super_scale d, super_zero -dmin); Q8_0 ``d * q`` ->
    8 bits, group 32; Q5_0 ``d * (q - 16)`` and Q5_1 ``d * q + m`` -> 8 bits, group 32;
    Q5_K like Q4_K at 8 bits; Q6_K ``d*sc * (q - 32)`` -> 8 bits, group 16,
    super_groups 16 (int8 sc). Decoding order matches ``gguf.quants.dequantize``, so the
    values are bit-identical to it (tested).
    """
    name = getattr(tensor_type, "name", str(tensor_type)).upper()
    decode = _GGUF_DECODERS.get(name)
    if decode is None:
        return None
    n, k = (int(s) for s in shape)
    block_elems, block_bytes = _GGUF_BLOCKS[name]
    if n < 1 or k < 1 or k % block_elems:
        raise ValueError(f"a {name} tensor needs in_features to be a multiple of {block_elems} "
                         f"(got shape {tuple(shape)})")
    data = _raw_tensor(raw)
    if data.numel() != n * (k // block_elems) * block_bytes:
        raise ValueError(f"a {name} tensor of shape {(n, k)} has {n * (k // block_elems) * block_bytes} bytes "
                         f"(got {data.numel()})")
    return decode(data.view(n, k // block_elems, block_bytes), n, k)


def _raw_tensor(raw) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    arr = np.ascontiguousarray(raw)
    return torch.from_numpy(arr.view(np.uint8).reshape(-1).copy())


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from byte pairs ``[..., 2]`` -> ``[...]``."""
    return b.contiguous().view(torch.float16)[..., 0]


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of a little-endian bit string ``qh [..., count / 8]`` as ``uint8 [..., count]``."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[..., :, None] >> shifts) & 1).reshape(*qh.shape[:-1], count)


def _q4_0(b, n, k):
    d = _f16(b[..., 0:2])
    zero = (d.float() * -8).half()
    if not torch.isfinite(zero).all():  # -8d overflows fp16 (never in practice)
        return None
    return QuantizedWeight.from_rows(4, k, 32, b[..., 2:18], d, zero)


def _q4_1(b, n, k):
    return QuantizedWeight.from_rows(4, k, 32, b[..., 4:20], _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q8_0(b, n, k):
    return QuantizedWeight.from_rows(8, k, 32, b[..., 2:34].contiguous().view(torch.int8), _f16(b[..., 0:2]), None)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 codes 0..31 [..., 32]: nibbles of qs [..., 16] (low: j, high: j+16) plus
    bit j of the 32-bit qh [..., 4] as bit 4."""
    return unpack_nibbles(qs) | (_high_bits(qh, 32) << 4)


def _q5_0(b, n, k):
    codes = _five_bit(b[..., 2:6], b[..., 6:22]).to(torch.int8) - 16
    return QuantizedWeight.from_rows(8, k, 32, codes, _f16(b[..., 0:2]), None)


def _q5_1(b, n, k):
    codes = _five_bit(b[..., 4:8], b[..., 8:24]).to(torch.int8)
    return QuantizedWeight.from_rows(8, k, 32, codes, _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block from its 12 bytes:
    bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 take their low
    4 bits from bytes 8-11 (low/high nibble) and their top 2 bits from the top 2 bits
    of bytes 0-3 (scales) and 4-7 (mins)."""
    a, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((a & 63, (md & 15) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((m & 63, (md >> 4) | ((m >> 6) << 4)), dim=-1)
    return sc.contiguous(), mn.contiguous()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Codes [..., 256] of a K-quant super-block's 128 nibble bytes: chunk c of 32 bytes
    holds columns 64c + j (low nibbles) and 64c + 32 + j (high)."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack((q & 15, q >> 4), dim=-2).reshape(*qs.shape[:-1], 256)


def _k_supers(b, n):
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    return d, -dmin, sc.reshape(n, -1), mn.reshape(n, -1)


def _q4_k(b, n, k):
    d, neg_dmin, sc, mn = _k_supers(b, n)
    codes = pack_nibbles(_k_nibbles(b[..., 16:144]).reshape(n, -1, 32))
    return QuantizedWeight.from_rows(4, k, 32, codes, sc, mn, d, neg_dmin, 8)


def _q5_k(b, n, k):
    d, neg_dmin, sc, mn = _k_supers(b, n)
    high = _high_bits(b[..., 16:48], 256).reshape(*b.shape[:-1], 32, 8).transpose(-1, -2).reshape(*b.shape[:-1], 256)
    codes = (_k_nibbles(b[..., 48:176]) | (high << 4)).to(torch.int8).reshape(n, -1, 32)
    return QuantizedWeight.from_rows(8, k, 32, codes, sc, mn, d, neg_dmin, 8)


def _q6_k(b, n, k):
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64)
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)
    low = torch.stack((ql & 15, ql >> 4), dim=-2).reshape(*b.shape[:-1], 2, 4, 32)  # half, quarter, col
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    codes = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, -1, 16)
    scales = b[..., 192:208].contiguous().view(torch.int8).reshape(n, -1)
    return QuantizedWeight.from_rows(8, k, 16, codes, scales, None, _f16(b[..., 208:210]), None, 16)


_GGUF_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1,
                  "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q5_1": (32, 24),
                "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def transformers_row_order(architecture: str, tensor_name: str, num_heads: int, num_kv_heads: int,
                           rows: int) -> torch.Tensor | None:
    """The row order that turns a GGUF tensor into transformers' weight, or None when
    transformers keeps the file's order.

    llama.cpp's converter permutes the rows of a llama model's ``attn_q`` and ``attn_k``
    within each head (interleaved rotary halves); transformers' GGUF loader
    (``LlamaTensorProcessor``, architecture ``"llama"`` only, qwen2 is stored unpermuted)
    undoes it: row ``h*hd + p*hd/2 + i`` of its matrix is row ``h*hd + 2i + p`` of the
    file (``hd`` the rows per head, ``p`` in {0, 1}). Use with
    `QuantizedWeight.take_rows`: rows are quantized independently, so this is exact.
    """
    if architecture != "llama" or not any(f".{t}." in tensor_name for t in ("attn_q", "attn_k")):
        return None
    heads = num_heads if ".attn_q." in tensor_name else num_kv_heads
    if rows % (2 * heads):
        raise ValueError(f"{tensor_name}: {rows} rows do not split into {heads} heads of rotary pairs")
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


# ----------------------------------------------------------------------------- product

def check_linear_args(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    """ValueError unless ``x`` is a float ``[T, in_features]`` and ``bias`` None or ``[out_features]``."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qw must be a QuantizedWeight (got {type(qw).__name__})")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != qw.in_features or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor [T, {qw.in_features}] (got {got})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != qw.out_features):
        raise ValueError(f"bias must be [{qw.out_features}] (got {tuple(bias.shape)})")


def qlinear_torch(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference twin: ``F.linear(x, qw.dequantize(), bias)`` in fp32, returned in x's dtype."""
    check_linear_args(x, qw, bias)
    y = F.linear(x.float(), qw.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *,
            backend: str = "auto") -> torch.Tensor:
    """``x [T, in_features] @ Wᵀ + bias [out_features]`` -> ``[T, out_features]``.

    Computed in fp32 (float16/bfloat16 ``x`` are widened) and returned in x's dtype.
    backend: ``"numba"`` (CPU: the fused kernel for a few tokens, a tile-wise fp32 product
    for more; both equal to the twin up to fp32 summation order), ``"triton"`` (CUDA, or
    Triton's interpreter: `qlinear_triton`, the fused kernel for a few tokens, the decoded
    matrix and torch's product for more), ``"torch"`` (the twin: dequantize, then
    ``F.linear``; any device) or ``"auto"`` (Triton on CUDA, numba on the CPU).
    """
    check_linear_args(x, qw, bias)
    chosen = resolve_backend(backend, x, qw.codes)
    if chosen == "numba":
        from . import qlinear_numba

        return qlinear_numba.product(x, qw, bias)
    if chosen == "triton":
        from .qlinear_triton import qlinear_triton

        return qlinear_triton(x, qw, bias)
    return qlinear_torch(x, qw, bias)


def time_qlinear(qw: QuantizedWeight, *, tokens: int = 1, backend: str = "auto", repeats: int = 20,
                 baseline: torch.Tensor | None = None) -> dict[str, float]:
    """Seconds per call of `qlinear` on ``tokens`` random tokens (median of ``repeats``
    calls), with ``baseline`` (a float matrix, e.g. the fp16 weight) timed in alternation
    through ``F.linear`` like `edgekv.model.linear` does; also the bytes of each.
    Returns ``{"seconds", "bytes", "baseline_seconds", "baseline_bytes"}`` (the last two
    only with a baseline)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, qw.in_features, generator=gen).to(qw.device)
    calls = {"": lambda: qlinear(x, qw, backend=backend)}
    if baseline is not None:
        calls["baseline_"] = lambda: F.linear(x.to(baseline.dtype), baseline).float()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():  # compile / warm up
        f()
    for _ in range(repeats):
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            if x.is_cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
    out = {"seconds": float(np.median(times[""])), "bytes": float(qw.nbytes)}
    if baseline is not None:
        out["baseline_seconds"] = float(np.median(times["baseline_"]))
        out["baseline_bytes"] = float(baseline.numel() * baseline.element_size())
    return out
