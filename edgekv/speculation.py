"""Layer-ahead speculation (InfiniGen): guess layer l+1's query from layer l's input.

A decode step's layers run one after another, and layer l+1's blocks cannot be chosen
before its query exists. The residual stream changes little from one layer to the next,
so layer l+1's query projection applied to layer l's normed input is a good guess of it:
the cache selects blocks for the guess and starts moving their rows while layer l
computes; when layer l+1's true query arrives, most of what it selects is already on
its way (`prefetch_hit_rate` counts how much).

`Speculator` is the `edgekv.model.LayerHook` that does it: it holds the model (for each
layer's query weights, `Decoder.query`) and the cache it asks.
"""

from __future__ import annotations

import torch


class Speculator:
    """Before layer l of a decode step, ask `cache.speculate(l + 1, guessed query)`."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache
        self.num_layers = model.shape.num_layers

    def before_layer(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        if layer + 1 < self.num_layers:
            self.cache.speculate(layer + 1, self.model.query(layer + 1, h, cos, sin)[:, 0])
