"""Dense causal attention over one sequence's stored keys and values (torch, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int) -> torch.Tensor:
    """Causal grouped-query attention.

    q: [num_heads, T, head_dim], the queries of positions q_start .. q_start+T-1.
    k, v: [num_kv_heads, L, head_dim], positions 0 .. L-1 with L >= q_start + T.
    Query t sees keys 0 .. q_start+t. Returns [num_heads, T, head_dim].
    """
    T, L = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if T == 1:
        # One decode query sees every stored key: no mask needed.
        return F.scaled_dot_product_attention(q, k[:, : q_start + 1], v[:, : q_start + 1], enable_gqa=gqa)
    if q_start == 0 and L == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # [T, L] True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
