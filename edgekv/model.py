"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) with an explicit layer loop.

The maths follows transformers' own implementation step for step (RMSNorm in float32,
rotary embedding from transformers' rope initialisers, SiLU-gated MLP), so logits agree
with transformers' forward to float rounding. Attention is not done here: each layer
hands its rotated queries and keys, the keys before rotation and the values to the KV
cache, which stores them and attends (`KVCache.attend`). That call is where tiers,
selection and kernels hook in; `LayerHook` is where layer-ahead speculation does.

Batch size is one sequence: activations are [T, hidden] for T new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import EdgekvError
from .kernels.qlinear import QuantizedWeight, qlinear, quantize_weight, stack_rows

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes of a decoder, read from its transformers config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # tokens the model can attend over
    rms_eps: float

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        max_context = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            # edgekv attends the whole context; within the window that is the same maths.
            max_context = min(max_context, window)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_context=max_context,
            rms_eps=config.rms_norm_eps,
        )


class KVCache(Protocol):
    """Everything the layer loop and the engine use of a KV cache (`edgekv.kvcache` dense,
    `edgekv.tiered_cache` offloaded)."""

    length: int  # tokens stored in every layer
    persistent: bool  # whether export_state / import_state keep it (the document cache)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_pre: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Store k, v for the new tokens of `layer` and attend with q over everything stored.

        q: [num_heads, T, head_dim] and k: [num_kv_heads, T, head_dim] rotated to their
        positions; k_pre: the same keys before rotation (the rope scale applied: rotating
        k_pre gives k); v: [num_kv_heads, T, head_dim]; h: the layer's normed input
        [T, hidden] that k and v were projected from (a cache that recomputes K/V keeps
        it, `edgekv.recompute`; others ignore it). Returns [num_heads, T, head_dim].
        The new tokens sit at positions `length .. length+T-1`, where `length` is the
        count before this forward pass.
        """

    def commit(self, num_tokens: int) -> None:
        """All layers have stored `num_tokens` new tokens: advance the length."""

    def truncate(self, num_tokens: int) -> int:
        """Keep at most the first `num_tokens` tokens; returns how many were kept."""

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held now per tier ("device", and "ram", "disk" when offloaded)."""

    def decode_stats(self, decode_steps: int) -> dict:
        """Traffic and selection figures (stats keys) over the decode steps since
        `reset_counters`; {} when there are none to give."""

    def reset_counters(self) -> None: ...

    def export_state(self) -> dict[str, torch.Tensor]: ...

    def import_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


class LayerHook(Protocol):
    """Called by the layer loop of a decode step before each layer's projections."""

    def before_layer(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """h: the layer's normed input [1, hidden]; cos, sin: [1, head_dim], the rotation
        at the token's position (the rope scale applied)."""


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]ᵀ + bias [out], in x's dtype.

    A `QuantizedWeight` (4/8-bit, `Policy.weight_bits`) goes to `kernels.qlinear`: its
    codes are decoded in registers (the CPU kernel reads them in place), products in fp32.

    Weights may be stored narrower than the activations (`Policy.weight_dtype`, e.g.
    fp16 weights with fp32 activations): the product then rounds x to the weights'
    dtype, accumulates in fp32 and rounds the result to the weights' dtype. A single
    token (a decode step, bound by reading the weights) runs torch's matrix-vector
    product on the stored weights, which does exactly that; more tokens (a prefill
    chunk, bound by arithmetic, where narrow CPU matrix products are slow) widen the
    weights and compute the same exact products in fp32 — so a token gets the same
    outputs, up to fp32 summation order, alone or in a chunk.
    """
    if isinstance(weight, QuantizedWeight):
        return qlinear(x, weight, bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    narrow = x.to(weight.dtype)
    if x.shape[0] == 1:
        y = F.linear(narrow, weight)
    else:
        y = F.linear(narrow.to(x.dtype), weight.to(x.dtype)).to(weight.dtype)
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def rope_inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] float32 and the cos/sin scale, as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise EdgekvError(f"unsupported rope scaling {rope_type!r}: edgekv supports {', '.join(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        shape = ModelShape.from_config(config)
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dims = torch.arange(0, shape.head_dim, 2, dtype=torch.int64).to(torch.float32)
        return 1.0 / (base ** (dims / shape.head_dim)), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.to(torch.float32), float(scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _head_rows(weight, rows: int):
    """The first `rows` rows of a (stacked) projection weight: a view, or for a quantized
    weight whose rows split inside a tile, a copy."""
    if not isinstance(weight, QuantizedWeight):
        return weight[:rows]
    if rows % 32 == 0:
        return weight.head_rows(rows)
    return weight.take_rows(torch.arange(rows, device=weight.device))


class Decoder(torch.nn.Module):
    """Weights of one Llama-family model and its forward pass.

    Weight names are transformers' (`model.layers.{i}.self_attn.q_proj.weight`, …), so a
    transformers state dict loads as is.
    """

    def __init__(self, config, state, *, dtype: torch.dtype, device: torch.device,
                 weight_dtype: torch.dtype | None = None, weight_bits: int = 16):
        """state: name -> float tensor, or `QuantizedWeight` for tensors kept quantized
        (`edgekv.weights`); weight_bits 4/8: projections stacked as quantized weights
        (a float one is quantized here), 16: floats stored in weight_dtype."""
        super().__init__()
        weight_dtype = weight_dtype or dtype
        self.shape = ModelShape.from_config(config)
        self.weight_bits = weight_bits
        s = self.shape

        def take(name: str, rows: int | None = None, cols: int | None = None):
            if name not in state:
                raise EdgekvError(f"the weights have no tensor {name!r}: the model files do not match its config")
            t = state[name]
            shape = (t.out_features, t.in_features) if isinstance(t, QuantizedWeight) else tuple(t.shape)
            if rows is not None and shape[0] != rows or cols is not None and shape[-1] != cols:
                raise EdgekvError(f"tensor {name!r} has shape {shape}, which does not match the config")
            return t.to(device) if isinstance(t, QuantizedWeight) else t.to(device=device, dtype=dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in state else None

        def matrix(*parts):
            """Row-stacked projection weights: quantized (weight_bits 4/8) or in weight_dtype."""
            if weight_bits == 16:
                floats = [p.dequantize(dtype) if isinstance(p, QuantizedWeight) else p for p in parts]
                return torch.cat(floats).to(weight_dtype) if len(floats) > 1 else floats[0].to(weight_dtype)
            quantized = [p if isinstance(p, QuantizedWeight) else quantize_weight(p, weight_bits) for p in parts]
            if len(quantized) == 1:
                return quantized[0]
            try:
                return stack_rows(*quantized)
            except ValueError:  # forms differ (e.g. GGUF blocks of two types): one form for all
                return stack_rows(*(quantize_weight(q.dequantize(), weight_bits) for q in quantized))

        def bias(*names: str, rows: tuple[int, ...]) -> torch.Tensor | None:
            """The stacked biases of `names` (zeros where one has none); None when none has one."""
            found = [maybe(n) for n in names]
            if all(b is None for b in found):
                return None
            return torch.cat([torch.zeros(r, dtype=dtype, device=device) if b is None else b
                              for b, r in zip(found, rows)])

        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.embed = take("model.embed_tokens.weight", s.vocab_size, s.hidden_size)
        self.layers = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            # q, k, v (and gate, up) stacked: one matrix product each per layer
            qkv = matrix(take(a + "q_proj.weight", q_rows, s.hidden_size),
                         take(a + "k_proj.weight", kv_rows, s.hidden_size),
                         take(a + "v_proj.weight", kv_rows, s.hidden_size))
            self.layers.append({
                "ln1": take(p + "input_layernorm.weight"),
                "ln2": take(p + "post_attention_layernorm.weight"),
                "qkv": qkv,
                "q": _head_rows(qkv, q_rows),  # the query rows alone (speculation): a view where possible
                "qkv_bias": bias(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias",
                                 rows=(q_rows, kv_rows, kv_rows)),
                "o": matrix(take(a + "o_proj.weight", s.hidden_size, q_rows)),
                "o_bias": maybe(a + "o_proj.bias"),
                "gate_up": matrix(take(m + "gate_proj.weight", s.intermediate_size, s.hidden_size),
                                  take(m + "up_proj.weight", s.intermediate_size, s.hidden_size)),
                "gate_up_bias": bias(m + "gate_proj.bias", m + "up_proj.bias",
                                     rows=(s.intermediate_size, s.intermediate_size)),
                "down": matrix(take(m + "down_proj.weight", s.hidden_size, s.intermediate_size)),
                "down_bias": maybe(m + "down_proj.bias"),
            })
        self.norm = take("model.norm.weight")
        tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
        head = self.embed if tied else take("lm_head.weight", s.vocab_size, s.hidden_size)
        self.lm_head = head if isinstance(head, QuantizedWeight) else matrix(head)
        if weight_bits < 16 and not isinstance(self.lm_head, QuantizedWeight):  # a float head kept at 8 bits
            self.lm_head = quantize_weight(head, 8)
        if tied and isinstance(self.lm_head, QuantizedWeight):
            self.embed = self.lm_head  # one table: the embedding looks rows up in the head's codes
        inv_freq, self.rope_scale = rope_inverse_frequencies(config)
        self.inv_freq = inv_freq.to(device)
        self.dtype, self.device = dtype, device
        self._kv_weights: dict = {}  # layer -> its k/v projection rows (`key_values`), made on demand

    def weights(self) -> list:
        """Every weight the decoder holds, once each (tensors and `QuantizedWeight`s)."""
        seen, out = set(), []
        for t in (self.embed, self.norm, self.lm_head, *(w for layer in self.layers for k, w in layer.items()
                                                         if k != "q")):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, hidden] in the model dtype (a quantized table decodes only those rows)."""
        if isinstance(self.embed, QuantizedWeight):
            return self.embed.dequantize_rows(input_ids, self.dtype)
        return F.embedding(input_ids, self.embed)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == weight.dtype == torch.float32:  # the same arithmetic in one op
            return F.rms_norm(x, (x.shape[-1],), weight, self.shape.rms_eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.rms_eps)
        return weight * x32.to(x.dtype)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] in the model dtype for int64 positions [T]."""
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                hook: LayerHook | None = None) -> torch.Tensor:
        """Run T new tokens through every layer.

        input_ids, positions: int64 [T]. Returns the final-normed hidden states [T, hidden].
        hook: told each layer's normed input (a decode step's layer-ahead speculation).
        """
        s = self.shape
        T = input_ids.shape[0]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions)
        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w["ln1"])
            if hook is not None:
                hook.before_layer(i, h, cos, sin)
            qk, v = linear(h, w["qkv"], w["qkv_bias"]).split((q_rows + kv_rows, kv_rows), dim=-1)
            qk_pre = qk.reshape(T, s.num_heads + s.num_kv_heads, s.head_dim).transpose(0, 1)
            qk = qk_pre * cos + _rotate_half(qk_pre) * sin  # queries and keys rotated together: [Hq + Hkv, T, D]
            k_pre = qk_pre[s.num_heads:]
            if self.rope_scale != 1.0:
                k_pre = k_pre * self.rope_scale
            v = v.reshape(T, s.num_kv_heads, s.head_dim).transpose(0, 1)
            attn = kv.attend(i, qk[:s.num_heads], qk[s.num_heads:], v, k_pre, h)  # [Hq, T, D]
            x = x + linear(attn.transpose(0, 1).reshape(T, q_rows), w["o"], w["o_bias"])
            h = self._rms_norm(x, w["ln2"])
            gate, up = linear(h, w["gate_up"], w["gate_up_bias"]).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, w["down"], w["down_bias"])
        kv.commit(T)
        return self._rms_norm(x, self.norm)

    def query(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotated queries [num_heads, T, head_dim] of `layer` for normed inputs h [T, hidden]."""
        s, w = self.shape, self.layers[layer]
        q_rows = s.num_heads * s.head_dim
        bias = None if w["qkv_bias"] is None else w["qkv_bias"][:q_rows]
        q = linear(h, w["q"], bias).reshape(h.shape[0], s.num_heads, s.head_dim).transpose(0, 1)
        return q * cos + _rotate_half(q) * sin

    def key_values(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys before RoPE (the rope scale applied) and values of `layer` for normed
        inputs h [T, hidden]: each [num_kv_heads, T, head_dim], what `forward` hands the
        cache as k_pre and v (recomputation, `edgekv.recompute`)."""
        s, w = self.shape, self.layers[layer]
        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        bias = None if w["qkv_bias"] is None else w["qkv_bias"][q_rows:]
        k, v = linear(h, self._kv_weight(layer), bias).split(kv_rows, dim=-1)
        T = h.shape[0]
        k_pre = k.reshape(T, s.num_kv_heads, s.head_dim).transpose(0, 1)
        if self.rope_scale != 1.0:
            k_pre = k_pre * self.rope_scale
        return k_pre, v.reshape(T, s.num_kv_heads, s.head_dim).transpose(0, 1)

    def _kv_weight(self, layer: int):
        """The k and v rows of layer's stacked projection: a view of float weights; for a
        quantized one a copy, made at the first call (only a recomputing cache asks)."""
        cache = self._kv_weights
        if layer not in cache:
            qkv = self.layers[layer]["qkv"]
            q_rows = self.shape.num_heads * self.shape.head_dim
            if isinstance(qkv, QuantizedWeight):
                cache[layer] = qkv.take_rows(torch.arange(q_rows, qkv.out_features, device=qkv.device))
            else:
                cache[layer] = qkv[q_rows:]
        return cache[layer]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> float32 logits [T, vocab]."""
        return linear(hidden, self.lm_head).float()
