"""The byte layout of one compressed KV block, and its encoder/decoder.

This is the one module that knows how a block of keys and values is laid out in bytes.
The CPU and disk tiers store these rows as opaque ``uint8``; attention kernels read them
through `BlockCodec.offsets`.

Quantization follows KIVI: keys are quantized *per channel* (outliers live in a few
channels, so each channel gets its own range over the block's tokens), values *per
token* in groups of channels. Both are asymmetric: ``x ~= code * scale + zero`` with
``code`` in ``[0, 2**bits - 1]`` and ``scale``, ``zero`` stored as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekv.errors import EdgekvError

SUPPORTED_BITS = (2, 4, 8, 16)


def dense_row_bytes(block_size: int, head_dim: int) -> int:
    """Bytes of one head's K and V for one block at fp16 (the uncompressed size)."""
    return 2 * 2 * block_size * head_dim


@dataclass(frozen=True, slots=True)
class BlockCodec:
    """Packs the K and V of one KV head for one block of tokens into one ``uint8`` row.

    Row layout for ``bits`` in (2, 4, 8), ``B = block_size``, ``D = head_dim``,
    ``G = D // value_group`` groups per token::

        [ K codes | V codes | K scale | K zero | V scale | V zero ]
          packed    packed    fp16 [D]  fp16 [D] fp16 [B,G] fp16 [B,G]

    Code segments hold the ``B * D`` codes of the ``[B, D]`` tensor in row-major order
    (code ``i`` belongs to token ``i // D``, channel ``i % D``), ``8 // bits`` codes per
    byte, lowest bits first: code ``i`` is ``(byte[i // cpb] >> (bits * (i % cpb))) &
    (2**bits - 1)`` with ``cpb = 8 // bits``. Each code segment is zero-padded to an even
    byte count so every fp16 segment starts 2-byte aligned.

    For ``bits == 16`` the row is the raw fp16 bytes, no scales::

        [ K fp16 [B, D] | V fp16 [B, D] ]

    Decoding: ``k[t, c] = code * k_scale[c] + k_zero[c]`` and
    ``v[t, c] = code * v_scale[t, c // value_group] + v_zero[t, c // value_group]``.
    Encoding picks fp16 ``zero <= min`` and ``scale`` so that the grid covers
    ``[min, max]``, and computes codes against those stored fp16 values: every decoded
    element is within ``scale / 2`` of its input (plus fp32 rounding). A constant slice
    whose value is an fp16 number gets ``scale == 0`` and decodes exactly. Inputs must
    lie in the fp16 range (|x| <= 65504).
    """

    bits: int
    block_size: int
    head_dim: int
    value_group: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise EdgekvError(f"kv_bits must be one of 2, 4, 8, 16 (got {self.bits})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {self.block_size})")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (got {self.head_dim})")
        if self.value_group < 1:
            raise ValueError(f"value_group must be >= 1 (got {self.value_group})")
        if self.head_dim % self.group != 0:
            raise ValueError(
                f"value_group {self.value_group} must divide head_dim {self.head_dim}"
            )

    # ---- layout -----------------------------------------------------------------------

    @property
    def group(self) -> int:
        """Channels per value group (``value_group`` capped at ``head_dim``)."""
        return min(self.value_group, self.head_dim)

    @property
    def num_groups(self) -> int:
        """Value groups per token."""
        return self.head_dim // self.group

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits if self.bits < 16 else 0

    @property
    def code_bytes(self) -> int:
        """Bytes of one code segment (K or V), padded to an even count."""
        n = self.block_size * self.head_dim
        if self.bits == 16:
            return 2 * n
        nbytes = -(-n // self.codes_per_byte)
        return nbytes + (nbytes & 1)

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """Segment name -> ``(start, end)`` byte range within a row (end exclusive).

        Names: ``k``, ``v`` (codes, or raw fp16 at 16 bits) and, below 16 bits,
        ``k_scale``, ``k_zero`` (fp16 ``[D]``), ``v_scale``, ``v_zero`` (fp16 ``[B, G]``).
        """
        sizes = [("k", self.code_bytes), ("v", self.code_bytes)]
        if self.bits < 16:
            k_meta = 2 * self.head_dim
            v_meta = 2 * self.block_size * self.num_groups
            sizes += [("k_scale", k_meta), ("k_zero", k_meta),
                      ("v_scale", v_meta), ("v_zero", v_meta)]
        out, start = {}, 0
        for name, size in sizes:
            out[name] = (start, start + size)
            start += size
        return out

    @property
    def row_bytes(self) -> int:
        """Bytes of one encoded row (one KV head, one block)."""
        n = 2 * self.code_bytes
        if self.bits < 16:
            n += 2 * 2 * self.head_dim + 2 * 2 * self.block_size * self.num_groups
        return n

    @property
    def compression_ratio(self) -> float:
        """``row_bytes`` over the fp16 size of the same K and V (smaller is better)."""
        return self.row_bytes / dense_row_bytes(self.block_size, self.head_dim)

    # ---- encode / decode --------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Compress ``n`` blocks.

        k, v: ``[n, block_size, head_dim]`` fp32/fp16/bf16, same device.
        Returns ``[n, row_bytes]`` uint8 on that device.
        """
        shape = (k.shape[0], self.block_size, self.head_dim)
        if k.dim() != 3 or tuple(k.shape) != shape or tuple(v.shape) != shape:
            raise ValueError(
                f"k and v must both be [n, {self.block_size}, {self.head_dim}] "
                f"(got {tuple(k.shape)} and {tuple(v.shape)})"
            )
        n = shape[0]
        if self.bits == 16:
            parts = [k.to(torch.float16), v.to(torch.float16)]
            return torch.cat([_bytes(p, n) for p in parts], dim=1)
        k = k.float()
        v = v.float().reshape(n, self.block_size, self.num_groups, self.group)
        k_codes, k_scale, k_zero = self._quantize(k, dim=1)   # scale/zero [n, 1, D]
        v_codes, v_scale, v_zero = self._quantize(v, dim=3)   # scale/zero [n, B, G, 1]
        parts = [self._pack(k_codes), self._pack(v_codes), k_scale, k_zero, v_scale, v_zero]
        return torch.cat([_bytes(p, n) for p in parts], dim=1)

    def encode_keys(self, k: torch.Tensor) -> torch.Tensor:
        """The key part of `encode` alone: ``k: [n, block_size, head_dim]`` -> uint8
        ``[n, key_bytes]`` = ``[ K codes | K scale | K zero ]`` (16 bits: ``[ K fp16 ]``),
        the bytes `encode` puts in those segments of each row (a key copy for scoring)."""
        shape = (k.shape[0], self.block_size, self.head_dim)
        if k.dim() != 3 or tuple(k.shape) != shape:
            raise ValueError(f"k must be [n, {self.block_size}, {self.head_dim}] (got {tuple(k.shape)})")
        n = shape[0]
        if self.bits == 16:
            return _bytes(k.to(torch.float16), n)
        codes, scale, zero = self._quantize(k.float(), dim=1)
        return torch.cat([_bytes(p, n) for p in (self._pack(codes), scale, zero)], dim=1)

    def decode(
        self,
        rows: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand ``rows: [n, row_bytes] uint8`` into ``(k, v)``, each
        ``[n, block_size, head_dim]`` of ``dtype`` on the rows' device.

        out: optional ``(k, v)`` buffers of that shape and ``dtype`` to write into and
        return. Reusing them on a hot path saves allocating (and page-faulting) fresh
        memory every call; fp32 contiguous buffers are filled in place with no copy.
        """
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != self.row_bytes:
            raise ValueError(
                f"rows must be [n, {self.row_bytes}] uint8 "
                f"(got {tuple(rows.shape)} {rows.dtype})"
            )
        n, b, d, g = rows.shape[0], self.block_size, self.head_dim, self.num_groups
        if out is not None and any(o.shape != (n, b, d) or o.dtype != dtype for o in out):
            raise ValueError(f"out must be two [{n}, {b}, {d}] {dtype} tensors")
        if rows.stride(-1) != 1 or rows.stride(0) % 2 or rows.storage_offset() % 2:
            rows = rows.clone(memory_format=torch.contiguous_format)  # align fp16 segments
        seg = {name: rows[:, s:e] for name, (s, e) in self.offsets.items()}
        if self.bits == 16:
            k = seg["k"].view(torch.float16).reshape(n, b, d).to(dtype, copy=True)
            v = seg["v"].view(torch.float16).reshape(n, b, d).to(dtype, copy=True)
        else:
            bufs = [None, None] if out is None else [
                o if o.dtype == torch.float32 and o.is_contiguous() else None for o in out
            ]
            k = self._unpack(seg["k"], bufs[0]).view(n, b, d)
            k.mul_(_f32(seg["k_scale"], n, 1, d)).add_(_f32(seg["k_zero"], n, 1, d))
            v = self._unpack(seg["v"], bufs[1]).view(n, b, g, self.group)
            v.mul_(_f32(seg["v_scale"], n, b, g, 1)).add_(_f32(seg["v_zero"], n, b, g, 1))
            v = v.view(n, b, d)
        if out is None:
            return k.to(dtype), v.to(dtype)
        for o, x in zip(out, (k, v)):
            if o.data_ptr() != x.data_ptr():
                o.copy_(x)
        return out

    # ---- helpers ----------------------------------------------------------------------

    def _quantize(
        self, x: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Asymmetric quantization of fp32 ``x`` with one range per slice along ``dim``.

        Returns codes (uint8, shape of ``x``) and fp16 scale, zero (``x`` with ``dim``
        reduced to 1). ``zero`` is the slice minimum rounded down to fp16; ``scale`` is
        the nearest fp16 to ``(max - zero) / qmax``, bumped one fp16 step up if the top
        of the grid (``qmax * scale + zero`` in fp32, as decode computes it) would fall
        short of the maximum. Codes are computed against these stored fp16 values, so
        the grid covers the data and nothing is clipped.
        """
        qmax = (1 << self.bits) - 1
        lo = x.amin(dim=dim, keepdim=True)
        hi = x.amax(dim=dim, keepdim=True)
        zero = round_down_f16(lo)
        zero_f = zero.float()
        scale = ((hi - zero_f) / qmax).to(torch.float16)
        short = scale.float() * qmax + zero_f < hi
        scale = torch.where(short, f16_step(scale, +1), scale)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(lo))  # constant slice
        codes = (x - zero_f).div_(safe).round_().clamp_(0, qmax)
        return codes.to(torch.uint8), scale, zero

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes: [n, ...] uint8`` -> ``[n, code_bytes]`` uint8, lowest bits first."""
        n, cpb = codes.shape[0], self.codes_per_byte
        flat = codes.reshape(n, -1)
        pad = self.code_bytes * cpb - flat.shape[1]
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        flat = flat.view(n, self.code_bytes, cpb)
        packed = flat[..., 0].clone()
        for j in range(1, cpb):
            packed |= flat[..., j] << (self.bits * j)
        return packed

    def _unpack(self, packed: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
        """``packed: [n, code_bytes] uint8`` -> ``[n, block_size * head_dim]`` fp32 codes,
        written into ``buf`` (fp32, contiguous, ``n * block_size * head_dim`` elements)
        when given.

        Bitwise results go straight into the float buffer on the CPU (one pass per code
        position within a byte, the fast path there); on CUDA through a uint8 temporary.
        """
        n, cpb, mask = packed.shape[0], self.codes_per_byte, (1 << self.bits) - 1
        length, padded = self.block_size * self.head_dim, self.code_bytes * cpb
        if buf is not None and padded == length:
            codes = buf.view(n, length)
        else:
            codes = torch.empty(n, padded, dtype=torch.float32, device=packed.device)
        slots = codes.view(n, self.code_bytes, cpb)
        for j in range(cpb):
            shifted = packed >> (self.bits * j) if j else packed
            if j == cpb - 1:  # the top code needs no mask
                slots[..., j].copy_(shifted)
            elif packed.is_cpu:  # the CPU writes the integer result straight into floats
                torch.bitwise_and(shifted, mask, out=slots[..., j])
            else:  # CUDA's bitwise kernels have no float output
                slots[..., j].copy_(shifted & mask)
        if padded == length:
            return codes
        if buf is None:
            return codes[:, :length].contiguous()
        return buf.view(n, length).copy_(codes[:, :length])


def round_down_f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the largest fp16 not above it (round toward -inf)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, f16_step(h, -1), h)


def round_up_f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the smallest fp16 not below it (round toward +inf)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, f16_step(h, +1), h)


def f16_step(h: torch.Tensor, direction: int) -> torch.Tensor:
    """The fp16 neighbour of each finite ``h``, one step toward +inf (``direction=+1``)
    or -inf (``-1``). Integer arithmetic on the bits, so it runs on every device."""
    bits = h.view(torch.int16).int()
    order = torch.where(bits < 0, -(bits & 0x7FFF), bits) + direction  # monotonic in h
    return torch.where(order < 0, -order - 32768, order).to(torch.int16).view(torch.float16)


def _bytes(x: torch.Tensor, n: int) -> torch.Tensor:
    """Any ``[n, ...]`` tensor as ``[n, nbytes]`` uint8 (its raw bytes, row-major)."""
    return x.contiguous().view(torch.uint8).reshape(n, -1)


def _f32(segment: torch.Tensor, *shape: int) -> torch.Tensor:
    """A row segment of fp16 bytes ``[n, 2 * k]`` as fp32 of ``shape``."""
    return segment.view(torch.float16).reshape(shape).float()
