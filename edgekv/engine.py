"""Prefill and decode: the engine that turns a prompt into tokens.

    engine = edgekv.load()                      # embedded model, default policy
    result = engine.generate("Summarise: …", max_new_tokens=64)
    result.text, result.token_ids, result.stats

One generate call is: encode the prompt (chat template for instruct models) → reuse the
KV of the longest prefix shared with the previous call → chunked prefill of the rest →
decode loop (sample, stream, stop). The engine keeps the KV of its last call, so a chat
that resends its whole history, or a second question about the same document, only
processes the new tokens.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from .backends import backend_class, backend_name
from .config import Policy
from .errors import EdgekvError
from .kvcache import PagedKVCache
from .loader import ModelSource, cache_root, load_config, load_tokenizer, resolve_model
from .model import Decoder, KVCache
from .recompute import RecomputePlan, RecomputeSplit, choose_split
from .sampling import sample_next
from .speculation import Speculator
from .textstream import TextStream, find_stop
from .weights import QuantizedState, exact_bits, gguf_source, load_weights, weight_bytes
from .tiered_cache import TieredKVCache

Messages = Sequence[dict] | Sequence[int]
OnToken = Callable[[str], "bool | None"]
OnProgress = Callable[[int, int], None]


class ContextOverflowError(EdgekvError):
    """The prompt plus the tokens to generate do not fit in the model's context."""

    def __init__(self, needed: int, limit: int, prompt_tokens: int):
        self.needed, self.limit, self.prompt_tokens = needed, limit, prompt_tokens
        super().__init__(
            f"input too long: {prompt_tokens} prompt tokens + generation need {needed} tokens, "
            f"but the model's context is {limit} tokens; shorten the input, lower --max-new-tokens, "
            f"or pass --truncate head|tail|middle"
        )


@dataclass
class GenerateResult:
    """text: the generated text (stop string excluded); token_ids: the generated ids."""

    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def pick_device(policy: Policy) -> torch.device:
    if policy.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(policy.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgekvError("device 'cuda' requested but no CUDA GPU is available: use --device cpu or auto")
    return device


def _pick_dtype(policy: Policy, device: torch.device) -> torch.dtype:
    if policy.dtype != "auto":
        return getattr(torch, policy.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _pick_weight_dtype(policy: Policy, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if policy.weight_dtype != "auto":
        return getattr(torch, policy.weight_dtype)
    if device.type == "cpu" and dtype == torch.float32:
        # a CPU decode step reads every weight once per token: half the bytes, and torch's
        # fp16 matrix-vector product accumulates in fp32 (see `model.linear`)
        return torch.float16
    return dtype


def pick_weight_bits(policy: Policy, source: ModelSource | None) -> int:
    """`Policy.weight_bits` resolved: "auto" keeps a GGUF file's own blocks (the bits they
    fit exactly: 4 or 8) and a folder's floats (16)."""
    if policy.weight_bits != "auto":
        return int(policy.weight_bits)
    gguf = None if source is None else gguf_source(source.folder)
    return 16 if gguf is None else exact_bits(gguf)


def load(model: str | os.PathLike | None = None, *, progress: bool = True, **policy: object) -> "Engine":
    """Load a model (default: the embedded SmolLM2-135M-Instruct) with a validated policy."""
    return Engine(resolve_model(model, progress=progress), Policy.from_kwargs(**policy))


class Engine:
    """One model, one policy, one sequence's KV cache kept between calls."""

    def __init__(self, source: ModelSource, policy: Policy, *, config=None, state=None, tokenizer=None):
        """The model's config, tokenizer and weights come from `source`, unless given
        (`edgekv.shapes.random_engine`: a real shape with random weights and no tokenizer)."""
        self.source, self.policy = source, policy
        self._apply_threads()
        self.device = pick_device(policy)
        self.dtype = _pick_dtype(policy, self.device)
        self.weight_dtype = _pick_weight_dtype(policy, self.device, self.dtype)
        self.backend = backend_name(policy.kernels, self.device)  # the decode backend, chosen once
        if self.backend == "triton" and self.device.type != "cuda":
            # Triton runs CPU tensors only in its interpreter, chosen when it is first imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
        backend_class(self.backend)  # a missing package fails here, once
        given = config is not None
        self.config = config if given else load_config(source)
        self.tokenizer = tokenizer if given else load_tokenizer(source)
        self.weight_bits = pick_weight_bits(policy, None if given else source)
        if given:
            weights = state if self.weight_bits == 16 else QuantizedState(state, {}, self.weight_bits)
        else:
            weights = load_weights(source, self.config, self.weight_bits)
        with torch.inference_mode():
            self.model = Decoder(self.config, weights, dtype=self.dtype, device=self.device,
                                 weight_dtype=self.weight_dtype, weight_bits=self.weight_bits)
        self.shape = self.model.shape
        self.eos_ids = self._eos_ids()
        self.speculator: Speculator | None = None  # the decode steps' layer hook, when speculating
        self.recompute_split: RecomputeSplit | None = None  # the recompute share in use, and why
        self.kv = self._new_cache()
        self.cached_ids: list[int] = []  # token ids whose KV is in self.kv

    # ---- facts about the model --------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def max_context(self) -> int:
        return self.shape.max_context

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (self.config.eos_token_id, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    def _apply_threads(self) -> None:
        """CPU threads for torch (and the compiled kernels, which split work like torch)."""
        if self.policy.threads:
            torch.set_num_threads(self.policy.threads)

    def _new_cache(self) -> KVCache:
        s, p = self.shape, self.policy
        if not p.offload:
            self.speculator = self.recompute_split = None
            return PagedKVCache(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                                block_size=p.block_size, dtype=self.dtype, device=self.device)
        disk_dir = (p.disk_dir or str(cache_root() / "kv")) if p.disk_bytes else None
        self.recompute_split = split = choose_split(p.recompute, s, kv_bits=p.kv_bits, recompute_bits=p.recompute_bits,
                                                    device=self.device, block_size=p.block_size)
        plan = RecomputePlan(split.share, p.recompute_bits, s.hidden_size, self.model.key_values) if split.share else None
        cache = TieredKVCache(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                              max_context=s.max_context, block_size=p.block_size, kv_bits=p.kv_bits,
                              recent_window=p.recent_window, device_cache_bytes=p.device_cache_bytes,
                              ram_bytes=p.ram_bytes, disk_dir=disk_dir, disk_bytes=p.disk_bytes,
                              dtype=self.dtype, device=self.device, rope_inv_freq=self.model.inv_freq,
                              scorer=p.scorer, backend=self.backend, recompute=plan)
        self._configure_selection(cache)
        return cache

    def _configure_selection(self, cache: TieredKVCache) -> None:
        """Hand the selection knobs to the offloaded cache; make the speculation hook when on."""
        p = self.policy
        speculate = p.speculate if isinstance(p.speculate, bool) else self.device.type == "cuda"
        cache.configure_selection(budget=p.budget, sink_blocks=p.sink_blocks, dense_layers=p.dense_layers,
                                  speculate=speculate, head_budget="adaptive" if p.adaptive_heads else "uniform")
        self.speculator = Speculator(self.model, cache) if cache.speculating else None

    # ---- policy and state -------------------------------------------------------------
    KV_LAYOUT_KEYS = ("block_size", "offload", "kv_bits", "recent_window", "device_cache_bytes",
                      "ram_bytes", "disk_dir", "disk_bytes", "kernels", "scorer", "recompute", "recompute_bits")

    def update_policy(self, **changes: object) -> None:
        """Change policy keys (validated); a change to the KV layout drops the kept KV."""
        if {"device", "dtype", "weight_dtype", "weight_bits"} & set(changes):
            raise EdgekvError("device, dtype, weight_dtype and weight_bits are fixed when the model loads: "
                              "load it again to change them")
        new = self.policy.replace(**changes)
        layout_changed = any(getattr(new, k) != getattr(self.policy, k) for k in self.KV_LAYOUT_KEYS)
        old, self.policy = self.policy, new
        self._apply_threads()
        if layout_changed:
            try:
                self.reset()
            except EdgekvError:
                self.policy = old
                raise
        elif self.policy.offload:
            self._configure_selection(self.kv)

    def reset(self) -> None:
        """Forget the kept KV cache (a new, empty one replaces it)."""
        fresh = self._new_cache()
        self.close()
        self.kv, self.cached_ids = fresh, []

    def close(self) -> None:
        """Release the KV cache's tiers (the disk tier's file)."""
        if getattr(self, "kv", None) is not None:
            self.kv.close()

    # ---- prompts ----------------------------------------------------------------------
    def encode(self, prompt_or_messages: str | Messages) -> list[int]:
        """Prompt token ids: token ids as given, a chat-templated message list, or plain text."""
        if isinstance(prompt_or_messages, (list, tuple)) and all(isinstance(t, int) for t in prompt_or_messages):
            return list(prompt_or_messages)
        if self.tokenizer is None:
            raise EdgekvError(f"{self.model_name} has no tokenizer: give it token ids")
        if isinstance(prompt_or_messages, str):
            if self.tokenizer.chat_template:
                prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
            else:
                return self.tokenizer.encode(prompt_or_messages)
        if not self.tokenizer.chat_template:
            text = "\n\n".join(m["content"] for m in prompt_or_messages)
            return self.tokenizer.encode(text)
        ids = self.tokenizer.apply_chat_template(list(prompt_or_messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def count_tokens(self, prompt_or_messages: str | Messages) -> int:
        return len(self.encode(prompt_or_messages))

    # ---- the forward passes -----------------------------------------------------------
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Run new tokens through the model after the cached ones; returns last hidden [hidden]."""
        start = self.kv.length
        t = torch.tensor(ids, dtype=torch.int64, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)
        hook = self.speculator if len(ids) == 1 else None
        hidden = self.model(t, positions, self.kv, hook)
        self.cached_ids.extend(ids)
        return hidden[-1]

    def _decode_step(self, token: int) -> torch.Tensor:
        """Feed one token after the cached ones; returns its float32 logits [vocab]."""
        return self.model.logits(self._forward([token])[None])[0]

    def prefill(self, ids: list[int], on_progress: OnProgress | None = None) -> tuple[torch.Tensor, int]:
        """Make the KV cache hold `ids`, reusing the shared prefix; returns (last logits, reused tokens).

        At least the last token is always run so its logits are fresh.
        """
        shared = 0
        limit = min(len(self.cached_ids), len(ids) - 1)
        while shared < limit and self.cached_ids[shared] == ids[shared]:
            shared += 1
        shared = self.kv.truncate(shared)
        del self.cached_ids[shared:]
        total, chunk = len(ids), self.policy.prefill_chunk
        hidden = None
        for begin in range(shared, total, chunk):
            hidden = self._forward(ids[begin:begin + chunk])
            if on_progress:
                on_progress(min(begin + chunk, total), total)
        return self.model.logits(hidden[None])[0], shared

    def load_state(self, token_ids: list[int], state: dict) -> None:
        """Make the KV cache hold `token_ids` from an `export_state` of the same layout."""
        self.kv.import_state(state)
        if self.kv.length != len(token_ids):
            self.reset()
            raise EdgekvError("the cached KV does not match its tokens: it was discarded and will be rebuilt")
        self.cached_ids = list(token_ids)

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], *, prefill: int, argmax: bool = False, margin: bool = False,
              on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Teacher-forced negative log-likelihood (nats) of token_ids[prefill:], float32 [n].

        The first `prefill` tokens are prefilled; every later token is fed as a decode
        step under the current policy (offloaded tiers, compression), exactly the path
        `generate` takes, and scored before it is fed. A cached prefix of token_ids is
        reused. Extras, returned after the NLL in this order when asked for:
        `argmax`: the greedy choice at each of those positions (int64 [n]); where it equals
        token_ids[prefill:], greedy decoding would have produced that token from the same
        prefix. `margin`: the gap between the top two logits there (float32 [n]); a greedy
        choice with a small gap flips under a small change of the logits (a near-tie).
        """
        ids = list(token_ids)
        if not 0 < prefill < len(ids):
            raise EdgekvError(f"score needs 0 < prefill < {len(ids)} tokens (got prefill={prefill})")
        if len(ids) > self.max_context:
            raise ContextOverflowError(len(ids), self.max_context, len(ids))
        logits, _ = self.prefill(ids[:prefill])
        self._reset_counters()  # selection figures cover the scored decode steps
        nll, best, gap = [], [], []
        for i in range(prefill, len(ids)):
            if on_logits is not None:
                on_logits(i - prefill, logits.float())
            nll.append(-torch.log_softmax(logits.float(), dim=-1)[ids[i]])
            best.append(logits.argmax())  # greedy decoding's own choice (first of equal maxima)
            if margin:
                top2 = logits.float().topk(2).values
                gap.append(top2[0] - top2[1])
            if i + 1 < len(ids):
                logits = self._decode_step(ids[i])
        extras = [torch.stack(x).cpu() for x, wanted in ((best, argmax), (gap, margin)) if wanted]
        nll = torch.stack(nll).cpu()
        return (nll, *extras) if extras else nll

    def generate(self, prompt_or_messages: str | Messages, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, on_token: OnToken | None = None,
                 on_progress: OnProgress | None = None, ignore_eos: bool = False) -> GenerateResult:
        """Generate up to `max_new_tokens` tokens after the prompt.

        prompt_or_messages: text, a list of {"role", "content"} messages (chat template
        applied for instruct models), or a list of token ids used as is.
        on_token(piece) is called with each new piece of text; returning False stops
        at once (finish_reason "cancelled"). on_progress(done, total) reports prefill tokens.
        """
        steps = self.stream(prompt_or_messages, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, stop=stop, on_progress=on_progress, ignore_eos=ignore_eos)
        try:
            piece = next(steps)
            while True:
                go_on = not (piece and on_token and on_token(piece) is False)
                piece = steps.send(go_on)
        except StopIteration as done:
            return done.value

    def stream(self, prompt_or_messages: str | Messages, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, on_progress: OnProgress | None = None,
               ignore_eos: bool = False) -> Generator[str, bool | None, GenerateResult]:
        """`generate` as a generator: prefills at the first ``next()``, then yields the new
        piece of text of each token (possibly "", e.g. half a UTF-8 character) and runs
        the next decode step when resumed; ``send(False)`` stops (finish_reason
        "cancelled"). Its return value (``StopIteration.value``) is the `GenerateResult`;
        its timings count the time the caller held the generator between tokens."""
        if max_new_tokens < 0:
            raise EdgekvError(f"invalid max_new_tokens {max_new_tokens}: must be >= 0")
        if temperature < 0 or not 0 < top_p <= 1:
            raise EdgekvError("invalid sampling options: temperature must be >= 0 and top_p in (0, 1]")
        ids = self.encode(prompt_or_messages)
        if not ids:
            raise EdgekvError("empty prompt: give some text to process")
        needed = len(ids) + max_new_tokens
        if needed > self.max_context:
            raise ContextOverflowError(needed, self.max_context, len(ids))
        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, reused = self.prefill(ids, on_progress)
            t_prefill = time.perf_counter() - t0
        stream, stops = TextStream(self.tokenizer), [s for s in (stop or []) if s]
        generated: list[int] = []
        finish, ttft, cut = "length", None, None
        self._reset_counters()  # traffic and selection figures cover the decode steps only
        t_decode0 = time.perf_counter()
        while len(generated) < max_new_tokens:
            with torch.inference_mode():
                if generated:
                    logits = self._decode_step(generated[-1])
                token = sample_next(logits.cpu(), temperature=temperature, top_p=top_p, generator=generator)
            if ttft is None:
                ttft = time.perf_counter() - t0
            if token in self.eos_ids and not ignore_eos:
                finish = "eos"
                break
            generated.append(token)
            before = len(stream.text)
            piece = stream.push(token)
            if stops and (cut := find_stop(stream.text, stops, before)) is not None:
                piece = stream.text[before:cut] if cut > before else ""
                finish = "stop"
            if (yield piece) is False:
                finish = "cancelled"
                break
            if finish == "stop":
                break
        t_decode = time.perf_counter() - t_decode0
        text = stream.text if cut is None else stream.text[:cut]
        return GenerateResult(text=text, token_ids=generated, stats=self._stats(
            ids, reused, generated, t_prefill, t_decode, ttft, finish))

    def _reset_counters(self) -> None:
        """Zero the cache's traffic and selection counters."""
        self.kv.reset_counters()

    def _stats(self, ids, reused, generated, t_prefill, t_decode, ttft, finish) -> dict:
        prefilled = len(ids) - reused
        decode_steps = max(len(generated) - 1, 0)  # the first token comes from prefill logits
        return {
            "prompt_tokens": len(ids),
            "reused_tokens": reused,
            "generated_tokens": len(generated),
            "ttft_s": round(ttft if ttft is not None else t_prefill, 6),
            "prefill_s": round(t_prefill, 6),
            "prefill_tok_s": round(prefilled / t_prefill, 3) if t_prefill > 0 else 0.0,
            "decode_s": round(t_decode, 6),
            "decode_tok_s": round(decode_steps / t_decode, 3) if decode_steps and t_decode > 0 else 0.0,
            "kv_bytes": self.kv.resident_bytes(),
            "weights_bytes": weight_bytes(self.model),
            **self.kv.decode_stats(decode_steps),
            "finish_reason": finish,
            "model": self.model_name,
            "device": str(self.device),
            "policy": {**dataclasses.asdict(self.policy), "weight_bits": self.weight_bits},
        }
