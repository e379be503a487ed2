"""Partial recomputation (KVPR): a share of the blocks keep their layer inputs, decode makes their K/V again."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.config import Policy
from edgekv.engine import Engine
from edgekv.errors import EdgekvError
from edgekv.kernels.rope import rotate_keys
from edgekv.kvcache import PagedKVCache
from edgekv.loader import ModelSource, resolve_model
from edgekv.recompute import ActivationCodec, RecomputePlan, recompute_pattern, recompute_split, token_bytes
from edgekv.shapes import RandomWeights, shape_config
from edgekv.tiered_cache import TieredKVCache

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CUDA backend runs in Triton's interpreter here

INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
HIDDEN, HKV, D, B = 24, 2, 16, 4
WEIGHTS = torch.randn(2, 2 * HKV * D, HIDDEN, generator=torch.Generator().manual_seed(5)) / HIDDEN**0.5


def project(layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's k/v projection for the cache-level tests: h [T, HIDDEN] -> k_pre, v [HKV, T, D]."""
    k, v = (h @ WEIGHTS[layer].T).split(HKV * D, dim=-1)
    return k.reshape(-1, HKV, D).transpose(0, 1), v.reshape(-1, HKV, D).transpose(0, 1)


def cache(tmp_path, share: float, *, backend: str = "torch", kv_bits: int = 4, act_bits: int = 16) -> TieredKVCache:
    plan = RecomputePlan(share, act_bits, HIDDEN, project) if share else None
    return TieredKVCache(num_layers=2, num_kv_heads=HKV, head_dim=D, max_context=512, block_size=B, kv_bits=kv_bits,
                         recent_window=4, device_cache_bytes=1 << 20, ram_bytes=1 << 20, disk_dir=str(tmp_path),
                         disk_bytes=1 << 20, dtype=torch.float32, device=torch.device("cpu"),
                         rope_inv_freq=INV_FREQ, backend=backend, recompute=plan)


def feed(c: TieredKVCache, tokens: int, g: torch.Generator) -> list[torch.Tensor]:
    """One forward pass of `tokens` tokens through both layers, as the layer loop hands them
    over (k/v projected from h, h given); returns each layer's attention output."""
    h = torch.randn(tokens, HIDDEN, generator=g).half().float()  # 16-bit rows hold it exactly
    q = torch.randn(4, tokens, D, generator=g)
    outs = []
    for layer in range(2):
        k_pre, v = project(layer, h)
        k = rotate_keys(k_pre, torch.arange(c.length, c.length + tokens), INV_FREQ)
        outs.append(c.attend(layer, q, k, v, k_pre, h))
    c.commit(tokens)
    return outs


# ---- the pattern and the rows ------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.25, 1 / 3, 0.5, 1.0])
def test_the_pattern_spreads_the_share_over_the_blocks_after_the_sink(share):
    marked = recompute_pattern(share, 101)
    assert not marked[0]  # the exact sink
    assert int(marked.sum()) == math.floor(100 * share)
    for start in range(1, 90):  # any run of 12 blocks holds its share, to within one block
        assert abs(int(marked[start:start + 12].sum()) - 12 * share) <= 1
    if share == 0.5:
        assert marked[2::2].all() and not marked[1::2].any()


def test_activation_rows_hold_16_bit_inputs_exactly_and_8_bit_within_half_a_step_per_channel():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, B, HIDDEN, generator=g) * torch.linspace(0.1, 30, HIDDEN)).half().float()
    for dtype in (torch.float16, torch.bfloat16):
        codec = ActivationCodec(16, B, HIDDEN, dtype)
        x = h.to(dtype).float()
        assert codec.row_bytes == B * HIDDEN * 2
        assert torch.equal(codec.decode(codec.encode(x), torch.float32), x)
    codec = ActivationCodec(8, B, HIDDEN)
    assert codec.row_bytes == (B + 2) * HIDDEN  # int8 codes + an fp16 scale per channel
    back = codec.decode(codec.encode(h), torch.float32)
    step = h.abs().amax(dim=1, keepdim=True) / 127  # per block and channel
    assert ((back - h).abs() <= step * 0.5 + 1e-3 * step).all()
    with pytest.raises(EdgekvError):
        ActivationCodec(4, B, HIDDEN)


# ---- the cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("budget", ["all", 24])
@pytest.mark.parametrize("kv_bits", [16, 4])
def test_every_backend_attends_recomputed_rows_like_stored_ones_and_counts_the_bytes(tmp_path, backend, budget,
                                                                                    kv_bits):
    plain, mixed = cache(tmp_path / "a", 0.0, backend=backend, kv_bits=kv_bits), \
        cache(tmp_path / "b", 0.5, backend=backend, kv_bits=kv_bits)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    feed(plain, 37, ga), feed(mixed, 37, gb)
    act_row = ActivationCodec(16, B, HIDDEN).row_bytes
    for c in (plain, mixed):
        c.configure_selection(budget=budget, sink_blocks=1, dense_layers=0, speculate=False)
    for step in range(6):
        blocks = mixed.num_blocks
        for c in (plain, mixed):
            c.reset_counters()
        want, got = feed(plain, 1, ga), feed(mixed, 1, gb)
        for a, b in zip(want, got):
            assert (a - b).abs().max().item() < 1e-5, (step, backend)
        stats = mixed.decode_stats(1)
        plain_bytes = plain.decode_stats(1)["fetch_bytes"]
        assert stats["recompute_blocks"] > 0 and stats["fetch_bytes"] < plain_bytes
        assert stats["recompute_bytes"] == stats["recompute_blocks"] * act_row
        if budget == "all":  # every block after the sink, of both layers
            again = int(recompute_pattern(0.5, blocks)[1:].sum())
            assert stats["recompute_blocks"] == 2 * again
            assert stats["fetch_bytes"] == 2 * HKV * (blocks - 1 - again) * mixed.codec.row_bytes
            assert plain_bytes == 2 * HKV * (blocks - 1) * plain.codec.row_bytes
    for c in (plain, mixed):
        c.close()


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_every_block_but_the_sink_recomputed_attends_like_stored_rows(tmp_path, backend):
    plain, every = cache(tmp_path / "a", 0.0, backend=backend), cache(tmp_path / "b", 1.0, backend=backend)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    feed(plain, 37, ga), feed(every, 37, gb)
    for _ in range(6):  # a commit of recompute blocks alone on the way
        for a, b in zip(feed(plain, 1, ga), feed(every, 1, gb)):
            assert (a - b).abs().max().item() < 1e-5
    assert len(every.store) == 2 * HKV  # block 0 of each layer and head: the sink's row
    for c in (plain, every):
        c.close()


def test_a_cache_that_recomputes_stores_no_k_v_rows_for_those_blocks_and_needs_the_inputs(tmp_path):
    c = cache(tmp_path, 0.5)
    feed(c, 41, torch.Generator().manual_seed(0))
    rows = {int(i) for i in c._all_row_ids()}
    again = recompute_pattern(0.5, c.num_blocks)
    for layer in range(2):
        for block in range(c.num_blocks):
            assert (c.layout.row_ids(layer, torch.tensor([block]))[0].item() in c.store) == (not again[block])
            assert (c.layout.row_ids(layer, torch.tensor([block]))[0].item() in rows) == (not again[block])
    assert len(c.recompute.acts) == 2 * int(again.sum())
    with pytest.raises(ValueError, match="needs h"):
        c.attend(0, *(torch.randn(n, 1, D) for n in (4, 2, 2, 2)))
    c.close()


def test_export_import_and_truncate_keep_recomputed_blocks_right(tmp_path):
    g = torch.Generator().manual_seed(3)
    source, plain = cache(tmp_path / "a", 0.5, act_bits=8), cache(tmp_path / "b", 0.0)
    for c in (source, plain):
        feed(c, 45, torch.Generator().manual_seed(3))
    state = source.export_state()
    assert "act_rows" in state and state["act_rows"].shape[1] == ActivationCodec(8, B, HIDDEN).row_bytes
    copy = cache(tmp_path / "c", 0.5, act_bits=8)
    copy.import_state(state)
    for layer in range(2):
        for a, b in zip(source.layer_keys_values(layer), copy.layer_keys_values(layer)):
            assert torch.equal(a, b)
        keys, _ = source.layer_keys_values(layer)  # 8-bit inputs: close to the stored keys, not equal
        want, _ = plain.layer_keys_values(layer)
        assert 0 < (keys - want).abs().max().item() < 0.3
    for c in (source, copy):
        c.truncate(21)  # the blocks a fresh prefill of 21 tokens compresses stay: (21 - window 4) // 4
        assert c.length == 16 and c.num_blocks == 4
        feed(c, 9, torch.Generator().manual_seed(4))
    for layer in range(2):
        for a, b in zip(source.layer_keys_values(layer), copy.layer_keys_values(layer)):
            assert torch.equal(a, b)
    for c in (source, plain, copy):
        c.close()


def test_recompute_blocks_spill_to_disk_like_k_v_rows(tmp_path):
    roomy = cache(tmp_path / "a", 0.5, kv_bits=16)
    # RAM just above the least accepted: one layer's K/V rows and activation rows at full context
    tight = TieredKVCache(num_layers=2, num_kv_heads=HKV, head_dim=D, max_context=512, block_size=B, kv_bits=16,
                          recent_window=4, device_cache_bytes=1 << 20, ram_bytes=48 << 10, disk_dir=str(tmp_path / "b"),
                          disk_bytes=1 << 20, dtype=torch.float32, device=torch.device("cpu"), rope_inv_freq=INV_FREQ,
                          recompute=RecomputePlan(0.5, 16, HIDDEN, project))
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    feed(roomy, 300, ga), feed(tight, 300, gb)
    assert tight.store.resident_bytes()["disk"] > 0 and tight.recompute.acts.resident_bytes()["disk"] > 0
    for _ in range(3):
        for a, b in zip(feed(roomy, 1, ga), feed(tight, 1, gb)):
            assert torch.equal(a, b)
    with pytest.raises(EdgekvError, match="RAM budget"):
        TieredKVCache(num_layers=2, num_kv_heads=HKV, head_dim=D, max_context=512, block_size=B, kv_bits=16,
                      recent_window=4, device_cache_bytes=1 << 20, ram_bytes=40 << 10, disk_dir=None, disk_bytes=0,
                      dtype=torch.float32, device=torch.device("cpu"), rope_inv_freq=INV_FREQ,
                      recompute=RecomputePlan(0.5, 16, HIDDEN, project))
    for c in (roomy, tight):
        c.close()


# ---- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mha_model(tmp_path_factory, embedded_source):
    """A tiny random Llama with as many KV heads as query heads (MHA), and a real tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("mha")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded_source.folder / f).exists():
            shutil.copy(embedded_source.folder / f, folder / f)
    return folder


class Recorder(PagedKVCache):
    """The dense cache, keeping what the layer loop hands over: (k_pre, v, h) per layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {}

    def attend(self, layer, q, k, v, k_pre=None, h=None):
        self.seen[layer] = (k_pre, v, h)
        return super().attend(layer, q, k, v, k_pre, h)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
@pytest.mark.parametrize("weight_bits", [16, 8])
def test_the_model_s_key_values_are_what_the_layer_loop_hands_the_cache(kind, weight_bits, tiny_models):
    e = Engine(resolve_model(tiny_models[kind]), Policy(offload=False, weight_bits=weight_bits, weight_dtype="float32"))
    s = e.shape
    cache = Recorder(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, block_size=16,
                     dtype=e.dtype, device=e.device)
    ids = torch.arange(100, 140)
    e.model(ids, torch.arange(40), cache)
    for layer, (k_pre, v, h) in cache.seen.items():
        got_k, got_v = e.model.key_values(layer, h)
        assert torch.allclose(got_k, k_pre, atol=1e-5) and torch.allclose(got_v, v, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mha"])
def test_half_the_blocks_recomputed_give_the_same_128_greedy_tokens(kind, tiny_models, mha_model, long_text):
    source = resolve_model(mha_model if kind == "mha" else tiny_models[kind])
    runs = {}
    for share in (0.0, 0.5):
        e = Engine(source, Policy(block_size=16, kv_bits=16, recompute=share, recompute_bits=16, disk_bytes=0))
        runs[share] = e.generate(long_text[:3000] + "\n\nSummarise.", max_new_tokens=128, ignore_eos=True)
        e.close()
    assert runs[0.5].token_ids == runs[0.0].token_ids
    s = runs[0.5].stats
    assert s["recompute_blocks"] > 0 and s["fetch_bytes"] < runs[0.0].stats["fetch_bytes"]


def test_a_recomputing_cache_is_kept_and_reused_by_the_document_cache(tiny_models, tmp_path, long_text):
    doc = tmp_path / "d.txt"
    doc.write_text(long_text[:4000])

    def ask(*extra: str) -> dict:
        stats = tmp_path / "s.json"
        result = CliRunner().invoke(app, ["generate", str(doc), "-p", "Who wrote it?", "--model",
                                          str(tiny_models["qwen2"]), "-n", "8", "--kv-bits", "16", "--doc-cache-dir",
                                          str(tmp_path / "docs"), "--stats-json", str(stats), *extra])
        assert result.exit_code == 0, result.output
        return {**json.loads(stats.read_text()), "text": result.stdout}

    recompute = ("--recompute", "0.5", "--recompute-bits", "8")
    first, second = ask(*recompute), ask(*recompute)
    assert first["document_kv"] == "computed" and second["document_kv"] == "disk"
    assert second["text"] == first["text"] and second["recompute_blocks"] > 0
    plain = ask()  # another layout: not this cache entry
    assert plain["document_kv"] == "computed"


def test_8_bit_inputs_move_the_logits_a_little(embedded_source, long_text):
    """Teacher-forced KLD vs the dense, exact cache on the embedded model (16-bit KV)."""
    dense = Engine(embedded_source, Policy(offload=False))
    ids = dense.encode(long_text[:6000])[:272]

    def logits(engine: Engine) -> torch.Tensor:
        out = []
        engine.score(ids, prefill=256, on_logits=lambda i, x: out.append(x.double()))
        engine.close()
        return torch.stack(out)

    def kld(p: torch.Tensor, q: torch.Tensor) -> float:
        lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    want = logits(dense)
    got = {bits: logits(Engine(embedded_source, Policy(block_size=16, kv_bits=16, recompute=0.5, recompute_bits=bits,
                                                       disk_bytes=0)))
           for bits in (16, 8)}
    print(f"\nteacher-forced KLD vs dense, 16-bit KV, half the blocks recomputed from 16-bit inputs: "
          f"{kld(want, got[16]):.2e}, from 8-bit inputs: {kld(want, got[8]):.2e}")
    assert kld(want, got[16]) < 1e-5
    assert 1e-7 < kld(want, got[8]) < 1e-3


# ---- the decision -------------------------------------------------------------------------------

SMOLLM2 = SimpleNamespace(hidden_size=576, num_kv_heads=3, head_dim=64)
LLAMA2_7B = SimpleNamespace(hidden_size=4096, num_kv_heads=32, head_dim=128)
LLAMA31_8B = SimpleNamespace(hidden_size=4096, num_kv_heads=8, head_dim=128)


def test_the_split_is_off_for_gqa_or_4_bit_kv_and_on_for_mha_16_bit_kv():
    link, gemm = 25.0, 100_000.0  # a PCIe 4.0 x16 link and a device doing 100 TFLOP/s
    smol = recompute_split(SMOLLM2, 4, 16, link, gemm)
    assert smol.share == 0 and smol.reason.startswith("off: an activation row (hidden=576 x 16 bit = 1152 B/token)")
    assert "2x3x64 at 4 bits" in smol.reason
    llama2 = recompute_split(LLAMA2_7B, 16, 16, link, gemm)
    assert 0.3 < llama2.share < 0.7 and llama2.reason.startswith("on, ") and llama2.step_ratio < 0.8
    assert (llama2.kv_bytes, llama2.act_bytes) == (16384, 8192)
    assert recompute_split(LLAMA2_7B, 16, 16, link, 10 * gemm).share > llama2.share  # faster GEMM: more of it
    assert recompute_split(LLAMA2_7B, 4, 16, link, gemm).share == 0  # 4-bit K/V: fewer bytes than the input
    assert recompute_split(LLAMA2_7B, 8, 8, link, gemm).share > 0
    assert recompute_split(LLAMA31_8B, 16, 16, link, gemm).share == 0  # GQA: 8192 > 4096 bytes
    assert recompute_split(LLAMA31_8B, 16, 8, link, gemm).share == 0  # 8-bit inputs with scales: 4352 > 4096
    cpu = recompute_split(LLAMA2_7B, 16, 16, 0.0, gemm)
    assert cpu.share == 0 and "no host-device link" in cpu.reason
    for name, split in (("SmolLM2, 4-bit KV", smol), ("Llama-2-7B, 16-bit KV", llama2)):
        print(f"\n{name}: {split.reason}")


def test_recompute_is_a_policy_key_and_a_flag(tiny_models, tmp_path, long_text):
    assert Policy(recompute="50%").recompute == 0.5 and Policy(recompute="auto").recompute == "auto"
    assert Policy(recompute="0.25", recompute_bits=8).recompute == 0.25
    for bad in (dict(recompute=1.5), dict(recompute="half"), dict(recompute_bits=4),
                dict(recompute=0.5, offload=False)):
        with pytest.raises(EdgekvError):
            Policy(**bad)
    options = Policy.cli_options()
    assert options["recompute"].flag == "--recompute" and options["recompute_bits"].flag == "--recompute-bits"
    doc = tmp_path / "doc.txt"
    doc.write_text(long_text[:2000])
    run = ["generate", str(doc), "-p", "Summarise.", "--model", str(tiny_models["llama3"]), "-n", "4", "--no-doc-cache"]
    ok = CliRunner().invoke(app, [*run, "--kv-bits", "16", "--recompute", "50%", "--recompute-bits", "8"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, [*run, "--recompute", "2"])
    assert bad.exit_code == 2 and "invalid recompute '2'" in bad.output
    e = Engine(resolve_model(tiny_models["llama3"]), Policy(recompute="auto", kv_bits=16))
    assert e.recompute_split.share == 0 and e.recompute_split.reason.startswith("off")  # GQA, and the CPU
    e.close()


# ---- bytes at real shapes -----------------------------------------------------------------------


def shape_engine(name: str, **policy) -> Engine:
    """One layer of a real shape with random weights (a small vocabulary and context: the
    bytes a layer moves per token depend on hidden, KV heads and head dim only)."""
    config = shape_config(name)
    config.num_hidden_layers, config.vocab_size, config.max_position_embeddings = 1, 256, 1024
    source = ModelSource(name=f"{name} (1 layer)", folder=".", identity=f"random-{name}-1")
    return Engine(source, Policy(**policy), config=config, state=RandomWeights(config), tokenizer=None)


def test_bytes_moved_per_token_with_and_without_recompute_match_the_arithmetic():
    prompt = [int(t) for t in torch.randint(0, 256, (9 * 32 + 64,), generator=torch.Generator().manual_seed(0))]
    rows = []
    for name, shape in (("llama-2-7b", LLAMA2_7B), ("llama-3.1-8b", LLAMA31_8B)):
        for share, bits in ((0.0, 16), (0.5, 16), (0.5, 8)):
            e = shape_engine(name, kv_bits=16, block_size=32, recompute=share, recompute_bits=bits, disk_bytes=0,
                             device_cache_bytes="64MiB", ram_bytes="256MiB")
            stats = e.generate(prompt, max_new_tokens=4, ignore_eos=True).stats  # 3 decode steps, 9 blocks
            e.close()
            kv, act = token_bytes(shape, 16, bits, 32)
            again = int(recompute_pattern(share, 9)[1:].sum())  # of the 8 blocks after the sink
            assert stats["fetch_bytes"] == (8 - again) * 32 * kv
            assert stats["recompute_bytes"] == again * 32 * act
            moved = stats["fetch_bytes"] + stats["recompute_bytes"]
            rows.append((name, share, bits, stats["fetch_bytes"], stats["recompute_bytes"], moved, moved / (8 * 32)))
    print("\nbytes moved per decoded token and layer over 8 attended blocks (256 tokens), 16-bit KV:")
    print(f"{'shape':14} {'recompute':>9} {'act bits':>8} {'K/V rows':>10} {'activations':>11} {'total':>10} "
          f"{'B/ctx token':>11} {'vs off':>6}")
    for name, share, bits, fetched, recomputed, moved, per_token in rows:
        base = next(r[5] for r in rows if r[0] == name and r[1] == 0)
        print(f"{name:14} {share:>9g} {bits:>8} {fetched:>10} {recomputed:>11} {moved:>10} {per_token:>11g} "
              f"{moved / base:>6.3f}")
    llama2 = {(r[1], r[2]): r[5] for r in rows if r[0] == "llama-2-7b"}
    llama3 = {(r[1], r[2]): r[5] for r in rows if r[0] == "llama-3.1-8b"}
    assert llama2[0.5, 16] / llama2[0.0, 16] == 0.75  # half the blocks at half the bytes
    assert llama3[0.5, 16] / llama3[0.0, 16] == 1.5  # GQA: an input is twice its K/V
