"""Choosing the next token from logits: greedy, or temperature + top-p with a seeded generator."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: float32 [vocab] -> token id. temperature 0 means greedy (argmax)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        sorted_probs[(cumulative - sorted_probs) >= top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
