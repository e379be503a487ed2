"""Real model shapes with random weights: speed and memory at scale, nothing downloaded.

Benchmarks and the GPU check time edgekv at the shapes people run (Llama-3.1-8B, GQA
32/8 heads; Llama-2-7B, MHA) without the weights: what a decode step costs depends on
the shapes, not on the values. `random_engine` builds an `Engine` on such a shape whose
weights are drawn lazily, tensor by tensor, as the model takes them (the whole fp16 8B
model is never held at once unless the policy keeps it so).

    SHAPES["llama-3.1-8b"]   32 layers, hidden 4096, 32 / 8 heads, head dim 128, 128K context
    SHAPES["llama-2-7b"]     32 layers, hidden 4096, 32 / 32 heads (MHA), head dim 128,
                             context raised to 32K here (4K in the original)
    SHAPES["tiny"]           2 layers, hidden 64, 4 / 2 heads: the same code paths in seconds
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=1, eos_token_id=2),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2),
}


def shape_config(name: str):
    """The config of a named shape (attribute access, like a transformers config)."""
    from .errors import EdgekvError

    if name not in SHAPES:
        raise EdgekvError(f"unknown model shape {name!r}: use one of {', '.join(SHAPES)}")
    values = dict(SHAPES[name])
    if values["rope_parameters"]["rope_type"] != "default":  # transformers' rope initialisers read its config class
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in values.items() if k != "model_type"})
    return SimpleNamespace(head_dim=None, sliding_window=None, **values)


class RandomWeights(Mapping):
    """The state dict of a Llama-family config with weights drawn on access: each tensor
    N(0, 0.02) (norm weights 1), seeded by its name, in `dtype` on `device`. Nothing is
    kept: taking a tensor twice draws it twice (the same values)."""

    def __init__(self, config, *, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 seed: int = 0):
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        c = config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = (c.num_key_value_heads or c.num_attention_heads) * head_dim
        q = c.num_attention_heads * head_dim
        shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        if not getattr(c, "tie_word_embeddings", False):
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
                p + "self_attn.q_proj.weight": (q, c.hidden_size),
                p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                p + "self_attn.o_proj.weight": (c.hidden_size, q),
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            })
        self.shapes = shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        return out.normal_(0.0, 0.02, generator=g)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def parameters(self) -> int:
        """How many numbers the model holds."""
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


def random_engine(shape: str, *, seed: int = 0, **policy: object):
    """An `Engine` on a named shape with random weights (drawn on the policy's device) and
    no tokenizer: give it token ids."""
    from .config import Policy
    from .engine import Engine, pick_device
    from .loader import ModelSource

    config = shape_config(shape)
    p = Policy.from_kwargs(**policy)
    weights = RandomWeights(config, device=pick_device(p), seed=seed)
    source = ModelSource(name=f"{shape} (random weights)", folder=Path("."), identity=f"random-{shape}-{seed}")
    return Engine(source, p, config=config, state=weights, tokenizer=None)
