"""Rotary position embedding of stored keys: rows hold keys *before* rotation.

Keys are stored un-rotated because RoPE spins the high-frequency channel pairs within a
block: after rotation a channel's values over a block's 32 tokens spread over a wide
range, so a per-channel 4-bit grid is coarse; before rotation the channels are smooth
(KVQuant's pre-RoPE key quantization; what it buys on the embedded model: README, "Why
the formats are what they are").

The rotation is the rotate-half form of Llama-family models, *without* the rope scale
factor (it is already inside the stored keys): for a key ``x: [head_dim]`` at position
``p``, with ``H = head_dim // 2`` and ``a[c] = p * inv_freq[c]`` (fp32)::

    rotate(x)[:H] = x[:H] * cos(a) - x[H:] * sin(a)
    rotate(x)[H:] = x[H:] * cos(a) + x[:H] * sin(a)

and `unrotate` is the same with ``-a``, so ``unrotate(rotate(x)) == x`` up to rounding.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin: [..., head_dim // 2]`` for int positions ``[...]`` and ``inv_freq: [head_dim // 2]``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    return angles.cos(), angles.sin()


def rotate_keys(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                inverse: bool = False) -> torch.Tensor:
    """Rotate keys ``x: [..., T, head_dim]`` at int ``positions: [T]`` (or broadcastable to
    ``x.shape[:-1]``) by their angles (``inverse``: by minus their angles). Computed in
    fp32; returns fp32."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    if inverse:
        sin = -sin
    x = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def block_token_positions(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 ``[..., k * block_size]`` positions of the tokens of blocks ``block_ids: [..., k]``
    (token ``t`` of block ``b`` is at ``b * block_size + t``)."""
    t = torch.arange(block_size, device=block_ids.device)
    pos = block_ids.to(torch.int64)[..., None] * block_size + t
    return pos.flatten(-2)
