"""Sparse block selection: which compressed blocks a decode step attends to.

Per decode step, layer and KV head (the query heads of a GQA group combined), attention
covers

    [ sink blocks ][ top-k blocks by score ]  +  the exact recent tail
      always kept    chosen from block summaries

so that sinks + top-k + tail fit the token budget (`budget_blocks`): the same k for every KV
head (head_budget "uniform"), or, with "adaptive", one budget of k blocks per head on average
shared between the KV heads of a layer by estimated attention mass (Ada-KV), so that a head
whose attention is spread out gets more blocks than one that looks at a few. Scores come from
small per-block summaries that stay in the device tier (`BlockSummaries`), made when a
block is compressed, from its *rotated* keys (the positions queries see). Scorers are a
registry (`SCORERS`); each says what it keeps per block and how it scores a query:

    scorer   keeps per block and KV head                 bytes/token (head_dim 64, block 32)
    mass     a 4-bit copy of the keys (KIVI layout)       40    the block's share of the softmax
                                                                 over all blocks and the exact tail
    keys4    the same 4-bit key copy                      40    block max of q.k, token by token
    minmax   per-channel key min and max, fp16            8     Quest's upper bound
    mean     the mean key, fp16                           4     q . mean key

keys4 is the default: mass with adaptive heads measured better in quality at a 10%
budget on the embedded model, but its CPU scorer costs about twice as much and it found
fewer passkeys (README has the figures).

Speculation (`speculate`): from layer l's input, the engine computes an approximate
query of layer l+1 and asks for layer l+1's top-k blocks before layer l+1 runs
(InfiniGen's layer-ahead prefetch); the true query then decides, and blocks it needs
that were not requested are fetched at once. `SelectionCounters` measures the hit rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import SCORERS as POLICY_SCORERS
from .kernels import bound_scores, score_blocks
from .kernels.block_score import adaptive_top_blocks, block_mass, key_copy_bytes, top_blocks
from .quant import BlockCodec, round_down_f16, round_up_f16


@dataclass(frozen=True, slots=True)
class Scorer:
    """One way to summarize blocks and score them against a query.

    summarize(keys [Hkv, n*B, D] rotated, codec) -> summary [Hkv, n, W] (uint8 or fp16)
    score(q [Hq, D], summary [Hkv, nb, W], tail_k [Hkv, T, D], codec, backend) -> [Hkv, nb] fp32
        (tail_k: the exact recent keys, after RoPE, that the step attends besides blocks)
    width(codec) -> (W, dtype)
    mass: scores are estimated attention mass, comparable across KV heads (what the
        "adaptive" head budget shares blocks by)
    key_copies: its summaries are 4-bit copies of the keys (`key_copy_codec`), which the
        compiled CPU decode step scores
    """

    name: str
    summarize: Callable[[torch.Tensor, BlockCodec, str], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockCodec, str], torch.Tensor]
    width: Callable[[BlockCodec], tuple[int, torch.dtype]]
    mass: bool = False
    key_copies: bool = False


def key_copy_codec(codec: BlockCodec) -> BlockCodec:
    """The layout of the keys4 scorer's key copies: 4-bit keys of codec's blocks."""
    return BlockCodec(bits=4, block_size=codec.block_size, head_dim=codec.head_dim)


def _keys4_summarize(keys: torch.Tensor, codec: BlockCodec, backend: str) -> torch.Tensor:
    c4, h = key_copy_codec(codec), keys.shape[0]
    return c4.encode_keys(keys.reshape(-1, codec.block_size, codec.head_dim)).view(h, -1, key_copy_bytes(c4))


def _keys4_score(q: torch.Tensor, summary: torch.Tensor, tail_k: torch.Tensor, codec: BlockCodec,
                 backend: str) -> torch.Tensor:
    return score_blocks(q, summary, key_copy_codec(codec), backend=backend)


def _mass_score(q: torch.Tensor, summary: torch.Tensor, tail_k: torch.Tensor, codec: BlockCodec,
                backend: str) -> torch.Tensor:
    return block_mass(q, summary, key_copy_codec(codec), tail_k, backend=backend)


def _keys4_width(codec: BlockCodec) -> tuple[int, torch.dtype]:
    return key_copy_bytes(key_copy_codec(codec)), torch.uint8


def _minmax_summarize(keys: torch.Tensor, codec: BlockCodec, backend: str) -> torch.Tensor:
    h, d = keys.shape[0], codec.head_dim
    blocks = keys.reshape(h, -1, codec.block_size, d).float()
    # rounded outward, so that kmin <= k <= kmax holds for every key: the bound stays a bound
    return torch.cat((round_down_f16(blocks.amin(dim=2)), round_up_f16(blocks.amax(dim=2))), dim=-1)


def _minmax_score(q: torch.Tensor, summary: torch.Tensor, tail_k: torch.Tensor, codec: BlockCodec,
                  backend: str) -> torch.Tensor:
    d = codec.head_dim
    return bound_scores(q, summary[..., :d], summary[..., d:], backend=backend)


def _mean_summarize(keys: torch.Tensor, codec: BlockCodec, backend: str) -> torch.Tensor:
    h, d = keys.shape[0], codec.head_dim
    return keys.reshape(h, -1, codec.block_size, d).float().mean(dim=2).to(torch.float16)


def _mean_score(q: torch.Tensor, summary: torch.Tensor, tail_k: torch.Tensor, codec: BlockCodec,
                backend: str) -> torch.Tensor:
    hkv, _, d = summary.shape
    qg = q.float().view(hkv, -1, d)  # [Hkv, group, D] @ [Hkv, D, nb] -> [Hkv, group, nb]
    return torch.bmm(qg, summary.float().transpose(1, 2)).amax(dim=1)


_IMPLEMENTATIONS = {  # name -> (summarize, score, width)
    "mass": (_keys4_summarize, _mass_score, _keys4_width),
    "keys4": (_keys4_summarize, _keys4_score, _keys4_width),
    "minmax": (_minmax_summarize, _minmax_score, lambda c: (2 * c.head_dim, torch.float16)),
    "mean": (_mean_summarize, _mean_score, lambda c: (c.head_dim, torch.float16)),
}
# the policy's scorers (`edgekv.config.SCORERS`: names and traits), each with its code
SCORERS: dict[str, Scorer] = {
    name: Scorer(name, *_IMPLEMENTATIONS[name], mass=traits.mass, key_copies=traits.key_copies)
    for name, traits in POLICY_SCORERS.items()
}


class BlockSummaries:
    """Per layer, the summaries of every compressed block: [Hkv, max_blocks, W] on the device."""

    def __init__(self, scorer: Scorer, codec: BlockCodec, *, num_layers: int, num_kv_heads: int,
                 max_blocks: int, device: torch.device, backend: str):
        self.scorer, self.codec, self.backend = scorer, codec, backend
        width, dtype = scorer.width(codec)
        self.layers = [torch.zeros((num_kv_heads, max_blocks, width), dtype=dtype, device=device)
                       for _ in range(num_layers)]

    def write(self, layer: int, first_block: int, keys: torch.Tensor) -> None:
        """Summarize rotated keys [Hkv, n*B, D] of blocks first_block .. first_block+n-1."""
        self.write_layers(range(layer, layer + 1), first_block, keys[None])

    def write_layers(self, layers: range, first_block: int, keys: torch.Tensor) -> None:
        """Summarize rotated keys [len(layers), Hkv, n*B, D] of blocks first_block .. of each
        layer, in one call of the scorer (its ops run once, not once per layer)."""
        num_layers, hkv = keys.shape[0], keys.shape[1]
        s = self.scorer.summarize(keys.reshape(num_layers * hkv, *keys.shape[2:]), self.codec, self.backend)
        s = s.view(num_layers, hkv, *s.shape[1:])
        for i, layer in enumerate(layers):
            self.layers[layer][:, first_block:first_block + s.shape[2]] = s[i]

    def scores(self, layer: int, q: torch.Tensor, num_blocks: int, tail_k: torch.Tensor) -> torch.Tensor:
        """[Hkv, num_blocks] fp32 scores of the first num_blocks blocks for q [Hq, D], the
        step attending the exact keys tail_k [Hkv, T, D] besides them."""
        return self.scorer.score(q, self.layers[layer][:, :num_blocks], tail_k, self.codec, self.backend)

    def bytes_used(self, num_blocks: int) -> int:
        t = self.layers[0]
        return len(self.layers) * t.shape[0] * num_blocks * t.shape[2] * t.element_size()


def budget_tokens(budget: int | str, context: int) -> int | None:
    """Tokens a decode step may attend over a `context`-token sequence (None: all)."""
    if budget == "all":
        return None
    if isinstance(budget, str):  # "N%"
        return max(1, math.ceil(float(budget[:-1]) / 100 * context))
    return int(budget)


def budget_blocks(budget: int | str, *, context: int, tail: int, block_size: int, num_blocks: int,
                  sink_blocks: int) -> int:
    """Compressed blocks per KV head a step attends: sinks + top-k, filling what the
    exact tail leaves of the budget; at least the sinks, at most every block."""
    tokens = budget_tokens(budget, context)
    if tokens is None:
        return num_blocks
    k = max(sink_blocks, (tokens - tail) // block_size)
    return min(num_blocks, k)


def select_blocks(scores: torch.Tensor, k: int, sink_blocks: int, *, adaptive: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """int64 [Hkv, k] block ids: the first `sink_blocks` blocks, then the top scores, ascending;
    adaptive: [Hkv, k_max], the top scores of any head, each row padded with -1
    (`adaptive_top_blocks`: scores must be comparable across heads)."""
    if adaptive:
        return adaptive_top_blocks(scores, k, sink_blocks, backend=backend)
    return top_blocks(scores, k, sink_blocks, backend=backend)


@dataclass
class SelectionCounters:
    """What selection did over the decode steps since the last reset.

    needed_blocks: (KV head, block) pairs the true queries selected, in layers that were
    speculated for; hit_blocks: of those, the ones speculation had requested;
    miss_bytes: bytes of the needed rows that were not requested; selected_blocks /
    candidate_blocks: over every sparse layer, blocks attended vs blocks that existed.
    """

    needed_blocks: int = 0
    hit_blocks: int = 0
    miss_bytes: int = 0
    selected_blocks: int = 0
    candidate_blocks: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("speculate", "select", "fetch", "attend"), 0.0))
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> requested block ids

    def reset(self) -> None:
        self.needed_blocks = self.hit_blocks = self.miss_bytes = 0
        self.selected_blocks = self.candidate_blocks = 0
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.pending.clear()

    def record(self, layer: int, needed: torch.Tensor, row_bytes: int) -> None:
        """Count the true selection `needed` [Hkv, k] (-1: no block) against layer's speculated request."""
        requested = self.pending.pop(layer, None)
        if requested is None:
            return
        rows = [needed[h][needed[h] >= 0] for h in range(needed.shape[0])]
        hits = sum(int(torch.isin(row, requested[h]).sum()) for h, row in enumerate(rows))
        count = sum(row.numel() for row in rows)
        self.needed_blocks += count
        self.hit_blocks += hits
        self.miss_bytes += (count - hits) * row_bytes

    def as_stats(self, decode_steps: int) -> dict:
        return {
            "decode_ms_per_token": {k: round(1000 * v / decode_steps, 3) for k, v in self.seconds.items()}
            if decode_steps else None,
            "prefetch_hit_rate": round(self.hit_blocks / self.needed_blocks, 4) if self.needed_blocks else None,
            "prefetch_miss_bytes": self.miss_bytes,
            "selected_fraction": round(self.selected_blocks / self.candidate_blocks, 4)
            if self.candidate_blocks else None,
        }
