"""Dense causal attention over one sequence's stored keys and values (torch, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int) -> torch.Tensor:
    """Causal grouped-query attention.

    q: [num_heads, T, head_dim], the queries of positions q_start .. q_start+T-1.
    k, v: [num_kv_heads, L, head_dim], positions 0 .. L-1 with L = q_start + T; any strides.
    Query t sees keys 0 .. q_start+t. Returns [num_heads, T, head_dim].

    A first prefill chunk uses torch's fused causal kernel. Everything else (decode steps,
    later chunks) is grouped: each KV head's keys are read once for its whole group of
    query heads with no repeat/expand copy and no rescaling of K, which on CPU is an
    order of magnitude faster than scaled_dot_product_attention's generic masked path.
    """
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    if q_start == 0 and L == T and T > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
    group = Hq // Hkv
    qg = (q * D**-0.5).reshape(Hkv, group * T, D)  # query rows of head h: [h*group .. +group) x T
    scores = torch.bmm(qg, k.transpose(1, 2))  # [Hkv, group*T, L]
    if T > 1:
        q_pos = torch.arange(q_start, q_start + T, device=q.device).repeat(group)  # [group*T]
        future = torch.arange(L, device=q.device)[None, :] > q_pos[:, None]  # [group*T, L]
        scores.masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).reshape(Hq, T, D)  # [Hkv, group*T, D] -> [Hq, T, D]
