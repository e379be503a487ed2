"""Dense causal attention over one sequence's stored keys and values (torch, any device).

A decode step (one query) is a grouped matrix product. A prefill chunk of T queries after
a past of P tokens is flash-style: exact causal attention with no [T, P] score matrix in
memory and no mask over the past::

    keys   [ past: P tokens .......................... | chunk: T tokens ]
    chunk    every query sees all of the past            query t sees chunk tokens <= t
             one fused attention, no mask,               one fused causal attention over
             the query heads of a KV head folded         T x T (the chunk's keys repeated
             into its rows (no K/V repeated)             per query head: T tokens only)
                      \\__ (out_p, lse_p) ______ merged by log-sum-exp ____ (out_c, lse_c) __/

    out = (out_p * e^(lse_p - m) + out_c * e^(lse_c - m)) / (e^(lse_p - m) + e^(lse_c - m)),
    m = max(lse_p, lse_c)

On the CPU the fused attention is torch's flash kernel with its log-sum-exp; elsewhere
(CUDA) torch's fused attention with a boolean mask over the chunk's rows does the same in
one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int) -> torch.Tensor:
    """Causal grouped-query attention.

    q: [num_heads, T, head_dim], the queries of positions q_start .. q_start+T-1.
    k, v: [num_kv_heads, L, head_dim], positions 0 .. L-1 with L = q_start + T; any strides.
    Query t sees keys 0 .. q_start+t. Returns [num_heads, T, head_dim] in q's dtype.
    """
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    if T > 1:
        return chunk_attention(q, k, v, q_start=q_start)
    group = Hq // Hkv
    qg = (q * D**-0.5).reshape(Hkv, group, D)  # each KV head's keys read once for its query heads
    scores = torch.bmm(qg, k.transpose(1, 2))  # [Hkv, group, L]
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).reshape(Hq, 1, D)  # [Hkv, group, D] -> [Hq, 1, D]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int) -> torch.Tensor:
    """`dense_attention` for a chunk of T > 1 queries (see the module doc)."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    group = Hq // Hkv
    if q.device.type != "cpu" or q.dtype not in _CPU_FLASH_DTYPES:
        return _masked_fused(q, k, v, q_start=q_start)
    kc, vc = k[:, q_start:], v[:, q_start:]
    if group > 1:
        kc, vc = kc.repeat_interleave(group, 0), vc.repeat_interleave(group, 0)
    out_c, lse_c = _flash_cpu(q, kc, vc, causal=True)  # [Hq, T, D], [Hq, T]
    if q_start == 0:
        return out_c
    folded = q.reshape(Hkv, group * T, D)  # query rows of KV head h: its group x T
    out_p, lse_p = _flash_cpu(folded, k[:, :q_start], v[:, :q_start], causal=False)
    out_p, lse_p = out_p.reshape(Hq, T, D), lse_p.reshape(Hq, T)
    top = torch.maximum(lse_p, lse_c)
    w_p, w_c = (lse_p - top).exp_()[..., None], (lse_c - top).exp_()[..., None]
    return ((out_p.float() * w_p + out_c.float() * w_c) / (w_p + w_c)).to(q.dtype)


_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention of q [H, T, D] over k, v [H, S, D] (causal: top-left,
    T == S): out [H, T, D] in q's dtype and the natural-log log-sum-exp [H, T] fp32."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, causal)[:2]
    return out[0], lse[0].float()


def _masked_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int) -> torch.Tensor:
    """The same attention as one fused call with a boolean mask [T, L] (devices without the
    CPU flash kernel)."""
    Hq, T, _ = q.shape
    L = k.shape[1]
    allowed = torch.arange(L, device=q.device)[None, :] <= torch.arange(q_start, q_start + T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=Hq != k.shape[0])
