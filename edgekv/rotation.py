"""Values are stored in a rotated basis when they are quantized.

Values are quantized per token in groups of channels (`edgekv.quant`), so one large
channel sets the grid of the whole group and the small channels lose their resolution.
Multiplying each value vector by an orthonormal Hadamard matrix ``R`` (``R @ R.T = I``)
spreads every channel over all channels before quantization, and attention never needs
to undo it per token: softmax weights are linear in the values, so

    softmax(q . K) @ (V @ R)  @  R.T  ==  softmax(q . K) @ V

The offloaded cache keeps *every* value it holds, exact tail and sink included, in the
rotated basis, attends there, and rotates each attention output back once. (What it
buys on the embedded model: README, "Why the formats are what they are".)

Only for head_dim a power of two (the Sylvester construction) and bits below 16: the
16-bit path stays bit-exact.
"""

from __future__ import annotations

import torch


def value_rotation(head_dim: int, bits: int, device: torch.device) -> torch.Tensor | None:
    """fp32 ``[head_dim, head_dim]`` orthonormal Hadamard matrix, or None (no rotation)."""
    if bits >= 16 or head_dim < 2 or head_dim & (head_dim - 1):
        return None
    h = torch.ones(1, 1)
    while h.shape[0] < head_dim:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return (h / head_dim**0.5).to(device)


def rotate(x: torch.Tensor, r: torch.Tensor | None, *, inverse: bool = False) -> torch.Tensor:
    """``x: [..., head_dim]`` times ``r`` (``inverse``: times ``r.T``), computed in fp32,
    returned in x's dtype; x itself when r is None."""
    if r is None:
        return x
    return (x.float() @ (r.T if inverse else r)).to(x.dtype)
