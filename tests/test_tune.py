"""`edgekv tune`: the cost model, the search, profiles and their errors.

Most tests run on constructed hardware figures (no measuring): they state what the
planner must do given those figures, so they hold on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import edgekv
from edgekv.config import Policy
from edgekv.costmodel import Calibration, Measurement, fit_calibration, layer_rows_bytes, placement, predict
from edgekv.errors import EdgekvError
from edgekv.hardware import Capacity, HardwareFigures, StepProgress
from edgekv.loader import ModelSource, resolve_model
from edgekv.model import ModelShape
from edgekv.profiles import (ProfileModel, dumps, load_profile, policy_from_profile, profile_names, profile_policy,
                             profile_tables, shipped_dir, write_profile)
from edgekv.quality_table import judge, judge_weights
from edgekv.tune import Limits, Request, explain, limits_for, prediction_table, search
from edgekv.tune_cli import tune_command

GiB, MiB = 1 << 30, 1 << 20
SMOL = ModelShape(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                  vocab_size=49152, max_context=8192, rms_eps=1e-5)
LONG = dataclasses.replace(SMOL, max_context=32768)  # the same model with a 32K context


def cpu_figures(**changes) -> HardwareFigures:
    """A 2-core CPU's figures, roughly as measured here (what the tests reason about)."""
    base = dict(
        source="published: a constructed test machine", device_type="cpu", device_name="cpu", cpu_name="test CPU",
        cpu_cores=2, cpu_threads=2, threads=torch.get_num_threads(), ram_total_bytes=24 * GiB,
        ram_available_bytes=20 * GiB, disk_free_bytes=70 * GiB, device_total_bytes=0, device_free_bytes=0,
        ram_read_gbps=10.0, tier_ram_fetch_gbps=2.0, disk_read_gbps=1.5, disk_read_latency_s=80e-6,
        disk_write_gbps=0.8, matvec_fp32_gbps=8.0, matvec_fp16_gbps=15.0, matvec_int8_gbps=0.0, matvec_int4_gbps=0.0,
        matmul_gflops=60.0, matmul_widen_gflops=45.0, attention_gflops=60.0, dense_attend_s_per_token=65e-9,
        kv_step_overhead_s=100e-6, attend_2bit_s_per_block=0.9e-6, attend_4bit_s_per_block=1.0e-6,
        attend_8bit_s_per_block=1.3e-6, attend_16bit_s_per_block=6e-6, select_keys4_s_per_block=0.19e-6,
        select_mass_s_per_block=0.35e-6, select_call_s=60e-6, kv_decode_s_per_row=2e-6, compress_s_per_row=5e-6,
        kernel_block_size=32, kernel_head_dim=64, h2d_gbps=0.0, d2h_gbps=0.0, device_mem_gbps=0.0,
        device_gemm_gflops=0.0, measure_s=0.0)
    base.update(changes)
    return HardwareFigures(**base)


def cuda_figures(**changes) -> HardwareFigures:
    """A small GPU behind PCIe: fast compute, slow transfers."""
    gpu = dict(device_type="cuda", device_name="test GPU", device_total_bytes=8 * GiB, device_free_bytes=7 * GiB,
               tier_ram_fetch_gbps=12.0, matvec_fp16_gbps=200.0, matvec_fp32_gbps=200.0, matmul_gflops=20000.0,
               matmul_widen_gflops=20000.0, attention_gflops=10000.0, kv_step_overhead_s=30e-6,
               attend_4bit_s_per_block=20e-9, select_keys4_s_per_block=10e-9, select_call_s=20e-6,
               h2d_gbps=12.0, d2h_gbps=12.0, device_mem_gbps=250.0, device_gemm_gflops=20000.0)
    gpu.update(changes)
    return cpu_figures(**gpu)


def request(context: int, shape: ModelShape = SMOL, new_tokens: int = 64) -> Request:
    return Request(shape, "a test model", "0" * 24, context, new_tokens)


def step_s(policy: Policy, context: int = 4096, hw: HardwareFigures | None = None, shape: ModelShape = SMOL) -> float:
    return predict(shape, policy, context, hw or cpu_figures(), Calibration()).decode_step_s


# ---- the cost model ----------------------------------------------------------------------------

def test_more_bytes_over_a_slower_tier_is_slower():
    """Rows that miss the device cache come from RAM; past the RAM budget, from the slower disk."""
    small_cache = dict(device="cpu", device_cache_bytes=2 * MiB, disk_bytes=1 * GiB)
    in_ram = Policy(**small_cache, ram_bytes=1 * GiB)
    spilling = Policy(**small_cache, ram_bytes=8 * MiB)
    assert step_s(spilling) > step_s(in_ram)
    slow_disk = cpu_figures(disk_read_gbps=0.2)
    assert step_s(spilling, hw=slow_disk) > step_s(spilling)
    assert step_s(in_ram, hw=slow_disk) == pytest.approx(step_s(in_ram))  # nothing on disk: disk speed is moot


def test_a_device_cache_that_holds_every_row_fetches_nothing():
    terms = dict(predict(SMOL, Policy(device="cpu", device_cache_bytes=1 * GiB), 4096, cpu_figures(),
                         Calibration()).decode_terms)
    assert terms["fetch_ram"] == terms["fetch_disk"] == 0
    small = dict(predict(SMOL, Policy(device="cpu", device_cache_bytes=2 * MiB), 4096, cpu_figures(),
                         Calibration()).decode_terms)
    assert small["fetch_ram"] > 0


def test_decode_terms_grow_with_what_they_count():
    all_blocks = Policy(device="cpu")
    assert step_s(all_blocks, 8000) > step_s(all_blocks, 2000)  # attention over more blocks
    assert step_s(Policy(device="cpu", budget="10%"), 8000) < step_s(all_blocks, 8000)  # fewer blocks attended
    assert step_s(Policy(device="cpu", kv_bits=16)) > step_s(Policy(device="cpu", kv_bits=4))  # per-block cost
    assert step_s(Policy(device="cpu", weight_dtype="float32")) > step_s(Policy(device="cpu", weight_dtype="float16"))
    assert step_s(Policy(device="cpu", offload=False), 8000) > step_s(Policy(device="cpu", offload=False), 2000)


def test_prefill_is_more_than_linear_in_the_context():
    p = Policy(device="cpu")
    short, long = (predict(SMOL, p, n, cpu_figures(), Calibration()).prefill_s for n in (2000, 8000))
    assert long > 4 * short  # the attention term is quadratic


def test_speculation_hides_pcie_transfers_on_cuda_and_costs_on_a_cpu():
    sparse = dict(budget="10%", device_cache_bytes=2 * 3 * 256 * 2432)  # two layers: every step misses
    cuda, cpu = cuda_figures(tier_ram_fetch_gbps=2.0), cpu_figures()
    terms = dict(predict(SMOL, Policy(device="cuda", speculate=True, **sparse), 8000, cuda, Calibration()).decode_terms)
    assert terms["hidden"] < 0
    assert step_s(Policy(device="cuda", speculate=True, **sparse), 8000, cuda) < \
        step_s(Policy(device="cuda", speculate=False, **sparse), 8000, cuda)
    assert step_s(Policy(device="cpu", speculate=True, **sparse), 8000, cpu) > \
        step_s(Policy(device="cpu", speculate=False, **sparse), 8000, cpu)


def test_placement_follows_the_store_rules():
    """Every row has one home (RAM up to its budget, then disk); the device cache holds copies."""
    p = Policy(device="cpu", device_cache_bytes=2 * MiB, ram_bytes=10 * MiB, disk_bytes=1 * GiB)
    pl = placement(SMOL, p, 8000, "cpu")
    assert pl.ram_rows + pl.disk_rows == pl.rows
    assert pl.ram_rows * pl.row_bytes <= 10 * MiB and pl.device_rows * pl.row_bytes <= 2 * MiB
    assert pl.disk_rows > 0
    cuda = placement(SMOL, p.replace(device="cuda"), 8000, "cuda")
    assert cuda.host_ram_bytes == cuda.ram_rows * cuda.row_bytes  # only the RAM tier stays in host memory
    assert cuda.device_mem_bytes >= 2 * MiB + cuda.weights_bytes


def synthetic_runs(truth: Calibration, hw: HardwareFigures) -> list[Measurement]:
    """What engine runs would measure on a machine whose constants are `truth`."""
    layer = 3 * 256 * 2432
    plan = [("dense", dict(offload=False)), ("4-bit", {}), ("10%", dict(budget="10%")), ("25%", dict(budget="25%")),
            ("fp32", dict(weight_dtype="float32")), ("small cache", dict(device_cache_bytes=2 * layer)),
            ("disk", dict(ram_bytes=layer, device_cache_bytes=2 * layer, disk_bytes=GiB)),
            ("chunk 256", dict(prefill_chunk=256)), ("chunk 2048", dict(prefill_chunk=2048)),
            ("dense chunk 2048", dict(offload=False, prefill_chunk=2048))]
    runs = []
    for label, keys in plan:
        policy = Policy(**{"device": "cpu", "weight_dtype": "float16", **keys})
        for context in (1024, 4096, 7000):
            p = predict(SMOL, policy, context, hw, truth, new_tokens=0)
            runs.append(Measurement(policy, context, p.decode_step_s, p.prefill_s, label))
    return runs


def test_the_fit_recovers_known_constants():
    hw = cpu_figures()
    truth = Calibration(weights_scale=1.3, layer_overhead_s=80e-6, select_scale=1.5, attend_scale=0.7,
                        dense_attend_scale=1.2, fetch_scale=0.9, prefill_linear_scale=0.8,
                        prefill_attention_scale=0.5, prefill_kv_scale=1.1, chunk_overhead_s=300e-6)
    fitted = fit_calibration(synthetic_runs(truth, hw), SMOL, hw)
    for name in ("weights_scale", "layer_overhead_s", "select_scale", "attend_scale", "dense_attend_scale",
                 "fetch_scale", "prefill_linear_scale", "prefill_attention_scale"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.05), name
    assert fitted.fit_rms_rel_error < 0.01 and fitted.fit_runs == 30


def test_the_fit_keeps_priors_for_what_the_runs_do_not_exercise():
    hw = cpu_figures()
    runs = [m for m in synthetic_runs(Calibration(fetch_scale=3.0), hw) if m.label in ("dense", "4-bit")]
    fitted = fit_calibration(runs, SMOL, hw)
    assert fitted.fetch_scale == pytest.approx(Calibration().fetch_scale)  # no run missed the device cache
    assert fitted.fit_rms_rel_error < 0.01


# ---- the search --------------------------------------------------------------------------------

def test_budget_all_at_a_short_context_and_a_sparse_budget_at_a_long_one():
    """Selection has a fixed cost per layer: over a few blocks it costs more than attending them all."""
    hw = cpu_figures(select_call_s=200e-6)
    short = search(request(1024, LONG, new_tokens=1024), hw, Calibration(), limits_for(hw.capacity))
    long = search(request(30000, LONG, new_tokens=1024), hw, Calibration(), limits_for(hw.capacity))
    assert short.chosen.policy.budget == "all"
    assert long.chosen.policy.budget != "all" and long.chosen.policy.offload


def test_the_search_never_plans_more_than_the_limits():
    for hw in (cpu_figures(), cuda_figures()):
        for ram, disk, device in ((600 * MiB, 10 * GiB, 1 * GiB), (20 * GiB, 0, 2 * GiB), (700 * MiB, 60 * MiB, GiB)):
            limits = Limits(ram_bytes=ram, disk_bytes=disk, device_bytes=device)
            try:
                plan = search(request(8000), hw, Calibration(), limits)
            except EdgekvError as exc:
                assert "nothing fits" in str(exc)
                continue
            pl, p = plan.prediction.placement, plan.chosen.policy
            assert pl.host_ram_bytes <= ram
            assert pl.disk_rows * pl.row_bytes <= p.disk_bytes <= disk
            if hw.device_type == "cuda":
                assert pl.device_mem_bytes <= device


def test_short_ram_spills_to_disk_and_long_prompts_get_a_disk_safety_net():
    """16-bit weights (310 MiB) pinned: 500 MiB of RAM leave less than the KV at 8K needs."""
    hw = cpu_figures()
    plan = search(request(8000), hw, Calibration(), Limits(ram_bytes=500 * MiB, disk_bytes=10 * GiB, device_bytes=0),
                  fixed={"weight_bits": 16})
    assert plan.prediction.placement.disk_rows > 0 and plan.chosen.policy.disk_bytes > 0


def test_speculation_is_planned_where_a_transfer_can_hide():
    """16-bit weights pinned (310 MiB): 0.55 GiB of device memory cannot also hold the 200 MiB
    of KV at 30K, so rows cross a slow link, and the layer-ahead request hides them."""
    hw = cuda_figures(tier_ram_fetch_gbps=1.0)
    limits = Limits(ram_bytes=20 * GiB, disk_bytes=10 * GiB, device_bytes=int(0.55 * GiB))
    plan = search(request(30000, LONG, new_tokens=1024), hw, Calibration(), limits, fixed={"weight_bits": 16})
    assert plan.chosen.policy.budget != "all" and plan.chosen.policy.speculate is True


LLAMA2_7B = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128, vocab_size=32000, max_context=32768, rms_eps=1e-5)


def test_recompute_is_planned_for_mha_16_bit_kv_over_a_slow_link_and_never_for_gqa_4_bit():
    """KVPR: a Llama-2-7B-shaped (MHA) model whose 16-bit KV crosses PCIe recomputes part
    of its blocks, and --explain says why; the embedded GQA model at 4 bits never does."""
    hw = cuda_figures(h2d_gbps=25.0, tier_ram_fetch_gbps=25.0, device_gemm_gflops=100000.0, device_total_bytes=24 * GiB,
                      device_free_bytes=23 * GiB, attend_16bit_s_per_block=40e-9)
    limits = Limits(ram_bytes=200 * GiB, disk_bytes=0, device_bytes=8 * GiB)  # 15.7 GB of KV cannot stay
    mha = search(request(30000, LLAMA2_7B, new_tokens=256), hw, Calibration(), limits,
                 fixed={"kv_bits": 16, "budget": "all", "weight_bits": 4})
    assert 0 < mha.chosen.policy.recompute < 1
    assert "recompute: " in explain(mha) and "fewer bytes than" in explain(mha)
    gqa = search(request(7000), hw, Calibration(), limits, fixed={"kv_bits": 4})
    assert gqa.chosen.policy.recompute == 0
    assert "recompute: off: an activation row" in explain(gqa)


def test_quality_floor_rejects_what_was_measured_below_it():
    assert not judge("SmolLM2-135M-Instruct.Q4_1", "174b85b4086a63f9bd409688", offload=True, kv_bits=4,
                     fraction=0.1, scorer="keys4", floor=0.95).allowed
    assert judge("SmolLM2-135M-Instruct.Q4_1", "174b85b4086a63f9bd409688", offload=True, kv_bits=4,
                 fraction=0.12, scorer="keys4").allowed
    unmeasured = dict(offload=True, scorer="keys4")
    assert not judge("other", "1", kv_bits=2, fraction=1.0, **unmeasured).allowed  # 2-bit: never by default
    assert not judge("other", "1", kv_bits=4, fraction=0.05, **unmeasured).allowed
    assert judge("other", "1", kv_bits=4, fraction=0.10, **unmeasured).allowed
    assert judge("other", "1", offload=False, kv_bits=2, fraction=0.01, scorer="mean").allowed  # the exact KV


def test_four_bit_weights_only_when_pinned_or_measured_on_the_model():
    assert judge_weights(16).allowed and judge_weights(8).allowed
    assert not judge_weights(4).allowed and judge_weights(4, pinned=True).allowed
    embedded = judge_weights(4, model="SmolLM2-135M-Instruct.Q4_1", identity="174b85b4086a63f9bd409688")
    assert embedded.allowed and embedded.source.startswith("measured: 4-bit weights")


def test_explain_names_the_binding_resource_and_the_runners_up():
    plan = search(request(8000), cpu_figures(), Calibration(), limits_for(cpu_figures().capacity))
    text = explain(plan)
    assert "chosen:" in text and "binds:" in text and "runners-up:" in text
    assert len(plan.runners_up) >= 2 and all(o.why for o in plan.runners_up)


# ---- a plan that runs --------------------------------------------------------------------------

def test_a_ram_cap_below_the_kv_plans_disk_spill_and_the_plan_runs(tiny_models, tmp_path):
    folder = tiny_models["llama3"]
    source = resolve_model(folder)
    engine = edgekv.load(folder, progress=False, device="cpu")
    shape, ids = engine.shape, list(range(100, 1600))
    engine.close()
    hw, offloaded = cpu_figures(), {"offload": True, "kv_bits": 4}
    req = Request(shape, source.name, source.identity, len(ids), 16)
    roomy = search(req, hw, Calibration(), Limits(ram_bytes=8 * GiB, disk_bytes=GiB, device_bytes=0), fixed=offloaded)
    pl = roomy.prediction.placement
    assert pl.disk_rows == 0
    # RAM for everything but the KV rows, plus the engine's minimum (a layer at full context)
    # for the device cache and for the RAM tier: less than the KV needs
    layer = layer_rows_bytes(shape, roomy.chosen.policy)
    cap = pl.host_ram_bytes - (pl.device_rows + pl.ram_rows) * pl.row_bytes + 2 * layer + pl.row_bytes
    assert cap < pl.host_ram_bytes - pl.row_bytes
    plan = search(req, hw, Calibration(), Limits(ram_bytes=cap, disk_bytes=GiB, device_bytes=0, disk_dir=str(tmp_path)),
                  fixed=offloaded)
    assert plan.prediction.placement.disk_rows > 0 and plan.prediction.placement.host_ram_bytes <= cap
    policy = plan.policy_dict()
    spilled = edgekv.load(folder, progress=False, **policy)
    in_ram = edgekv.load(folder, progress=False, **{**policy, "ram_bytes": GiB, "disk_bytes": 0})
    try:
        a = spilled.generate(ids, max_new_tokens=12, ignore_eos=True)
        b = in_ram.generate(ids, max_new_tokens=12, ignore_eos=True)
    finally:
        spilled.close()
        in_ram.close()
    assert a.stats["kv_bytes"]["disk"] > 0 and b.stats["kv_bytes"]["disk"] == 0
    assert a.token_ids == b.token_ids


def test_fixed_keys_pin_the_search():
    plan = search(request(4000), cpu_figures(), Calibration(), limits_for(cpu_figures().capacity),
                  fixed={"kv_bits": 8, "budget": "25%"})
    assert plan.chosen.policy.kv_bits == 8 and plan.chosen.policy.budget == "25%"
    with pytest.raises(EdgekvError, match="unknown policy key 'kv_bit'"):
        search(request(4000), cpu_figures(), Calibration(), limits_for(cpu_figures().capacity), fixed={"kv_bit": 8})


# ---- profiles ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeSource:
    name: str
    identity: str


@pytest.mark.parametrize("name", profile_names(shipped_dir()))
def test_every_shipped_profile_loads_and_validates(name):
    profile = load_profile(name)
    assert profile.hardware.source.startswith(("measured on ", "published: "))
    policy = profile_policy(profile, FakeSource(profile.model.name, profile.model.identity), profile.hardware.capacity)
    Policy.from_kwargs(**policy)
    assert set(policy) <= {f.name for f in dataclasses.fields(Policy)}
    assert profile.predictions["decode_tok_s"] > 0


def test_shipped_profiles_cover_the_common_machines():
    names = set(profile_names(shipped_dir()))
    assert {"cpu-2core", "laptop-cpu-8core", "rtx4060-laptop-8gb", "rtx4090-24gb", "jetson-orin-64gb",
            "a100-80gb", "h100-80gb"} <= names
    assert load_profile("cpu-2core").hardware.source.startswith("measured on ")


@functools.lru_cache(maxsize=None)
def planned_tables(kind: str, name: str) -> dict:
    """A profile's tables for a plan on the cpu or cuda test figures (planned once per session)."""
    hw = cpu_figures() if kind == "cpu" else cuda_figures()
    plan = search(request(4000), hw, Calibration(layer_overhead_s=70e-6, fit_runs=3), limits_for(hw.capacity))
    return profile_tables(name=name, description='quotes " and \\ and ünïcode', hardware=hw,
                          model=ProfileModel("a test model", "0" * 24, 4000, 64, SMOL),
                          calibration=plan.calibration, policy=plan.policy_dict(), predictions=prediction_table(plan))


def written_profile(tmp_path: Path, kind: str = "cpu", name: str = "mine") -> Path:
    return write_profile(tmp_path / f"{name}.toml", planned_tables(kind, name), header="a header\nof two lines")


def test_profile_write_read_round_trip(tmp_path):
    path = written_profile(tmp_path)
    profile = load_profile(path)
    assert profile.hardware == cpu_figures()
    assert profile.calibration == Calibration(layer_overhead_s=70e-6, fit_runs=3)
    assert profile.model == ProfileModel("a test model", "0" * 24, 4000, 64, SMOL)
    assert profile.description == 'quotes " and \\ and ünïcode'
    assert Policy.from_kwargs(**profile.policy).kv_bits in (2, 4, 8, 16)


def test_dumps_writes_what_tomllib_reads():
    import tomllib

    tables = {"format": 1, "s": "a\tb\x7f\n\"'", "t": {"x": 1.5e-7, "y": True, "z": [1, 2], "inf": math.inf}}
    assert tomllib.loads(dumps(tables)) == tables


def edited(tmp_path: Path, change) -> Path:
    import tomllib

    path = written_profile(tmp_path)
    data = tomllib.loads(path.read_text())
    change(data)
    path.write_text(dumps(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("policy"), "lacks its [policy] table"),
    (lambda d: d["hardware"].pop("disk_read_gbps"), "lacks disk_read_gbps"),
    (lambda d: d["policy"].update(kv_bit=4), "unknown policy key 'kv_bit' (did you mean 'kv_bits'?)"),
    (lambda d: d["hardware"].update(ram_read_gbs=1.0), "unknown key 'ram_read_gbs' (did you mean 'ram_read_gbps'?)"),
    (lambda d: d.update(format=0), "has format 0, and this edgekv reads format 1"),
    (lambda d: d.pop("format"), "has no `format` key"),
    (lambda d: d["hardware"].update(source="my laptop"), "must say where its figures come from"),
    (lambda d: d["hardware"].update(cpu_cores="two"), "wrong type"),
])
def test_a_damaged_profile_is_one_clear_error(tmp_path, change, message):
    with pytest.raises(EdgekvError, match="edgekv tune|where its figures|did you mean") as err:
        load_profile(edited(tmp_path, change))
    assert message in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(EdgekvError) as err:
        load_profile("rtx4090-24g")
    assert "did you mean 'rtx4090-24gb'" in str(err.value) and "cpu-2core" in str(err.value)


def test_malformed_toml_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("format = 1\n[policy\nkv_bits = 4\n")
    with pytest.raises(EdgekvError, match="is not valid TOML .*line 2"):
        load_profile(path)


def test_a_profile_for_another_model_is_refused(tmp_path):
    profile = load_profile(written_profile(tmp_path))
    with pytest.raises(EdgekvError, match=r"was tuned for a test model .*edgekv tune --model PATH --hardware mine"):
        profile_policy(profile, FakeSource("other", "1" * 24), cpu_figures().capacity)


def test_sizes_beyond_this_machine_are_refused(tmp_path):
    profile = load_profile(written_profile(tmp_path))
    me = FakeSource("a test model", "0" * 24)
    small = Capacity(ram_total_bytes=1 * MiB, ram_available_bytes=MiB, disk_free_bytes=100 * GiB)
    with pytest.raises(EdgekvError, match="of RAM for the KV cache, more than this machine's"):
        profile_policy(profile, me, small, overrides={"offload": True})
    no_disk = Capacity(ram_total_bytes=64 * GiB, ram_available_bytes=60 * GiB, disk_free_bytes=0)
    with pytest.raises(EdgekvError, match="plans a disk tier of .* free where it goes"):
        profile_policy(profile, me, no_disk, overrides={"offload": True, "disk_bytes": GiB})
    assert profile_policy(profile, me, no_disk, overrides={"offload": True, "disk_bytes": 0})["disk_bytes"] == 0


def test_a_dense_plan_larger_than_this_machines_ram_is_refused(tmp_path):
    profile = load_profile(written_profile(tmp_path))
    small = Capacity(ram_total_bytes=64 * MiB, ram_available_bytes=64 * MiB, disk_free_bytes=100 * GiB)
    with pytest.raises(EdgekvError, match="of RAM in all"):
        profile_policy(profile, FakeSource("a test model", "0" * 24), small, overrides={"offload": False})


def test_policy_from_profile_checks_against_the_model_given(tiny_models):
    with pytest.raises(EdgekvError, match="was tuned for SmolLM2-135M-Instruct"):
        policy_from_profile("cpu-2core", tiny_models["llama3"])


def test_a_cuda_profile_is_refused_without_cuda_or_with_a_smaller_gpu(tmp_path):
    profile = load_profile(written_profile(tmp_path, "cuda", name="gpu"))
    me = FakeSource("a test model", "0" * 24)
    no_gpu = Capacity(ram_total_bytes=64 * GiB, ram_available_bytes=60 * GiB, disk_free_bytes=100 * GiB)
    with pytest.raises(EdgekvError, match="runs on CUDA, and this machine has no CUDA GPU"):
        profile_policy(profile, me, no_gpu)
    tiny_gpu = dataclasses.replace(no_gpu, has_cuda=True, device_total_bytes=MiB, device_free_bytes=MiB)
    with pytest.raises(EdgekvError, match="device cache of .* more than this GPU's"):
        profile_policy(profile, me, tiny_gpu, overrides={"offload": True})


def test_explicit_flags_override_the_profile(tmp_path):
    profile = load_profile(written_profile(tmp_path))
    policy = profile_policy(profile, FakeSource("a test model", "0" * 24), cpu_figures().capacity,
                            overrides={"offload": True, "budget": "25%"})
    assert policy["budget"] == "25%"


# ---- the command -------------------------------------------------------------------------------

def cli() -> typer.Typer:
    from edgekv.cli import app

    return app


def test_tune_replans_with_a_shipped_profiles_figures(tiny_models, tmp_path):
    out = tmp_path / "plan.toml"
    result = CliRunner().invoke(cli(), ["tune", "--model", str(tiny_models["llama3"]), "--hardware", "cpu-2core",
                                        "--context", "1500", "--new-tokens", "16", "--out", str(out), "--explain"])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "runners-up:" in result.output
    profile = load_profile(out)
    assert profile.model.name == "llama3" and profile.model.context == 1500
    assert profile.hardware == load_profile("cpu-2core").hardware


@pytest.mark.parametrize("args, message", [
    (["--hardware", "no-such-machine"], "unknown profile 'no-such-machine'"),
    (["--hardware", "cpu-2core", "--ram", "lots"], "invalid --ram"),
    (["--hardware", "cpu-2core", "--context", "999999"], "invalid context 999999"),
    (["--hardware", "cpu-2core", "--measure"], "give one of them"),
    (["--hardware", "cpu-2core", "--ram", "1MiB"], "nothing fits"),
])
def test_tune_bad_input_is_one_error_line_and_exit_2(tiny_models, args, message):
    result = CliRunner().invoke(cli(), ["tune", "--model", str(tiny_models["llama3"]), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]


def test_generate_runs_a_profiles_policy_and_flags_override_it(tiny_models, tmp_path):
    """`--profile PATH` on generate: the profile's policy is the run's; a flag given beside it wins."""
    import json

    model = str(tiny_models["llama3"])
    out = tmp_path / "plan.toml"
    tuned = CliRunner().invoke(cli(), ["tune", "--model", model, "--hardware", "cpu-2core", "--context", "1500",
                                       "--new-tokens", "16", "--out", str(out), "--fix", "budget=\"25%\""])
    assert tuned.exit_code == 0, tuned.output
    assert load_profile(out).policy["budget"] == "25%"
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour master logs every ship that docks. " * 60)
    base = ["generate", str(doc), "--prompt", "Who logs ships?", "--model", model, "-n", "4", "--no-doc-cache",
            "--profile", str(out)]
    for extra, budget in (([], "25%"), (["--budget", "10%"], "10%")):
        stats = tmp_path / "stats.json"
        result = CliRunner().invoke(cli(), [*base, *extra, "--stats-json", str(stats)])
        assert result.exit_code == 0, result.output
        assert json.loads(stats.read_text())["policy"]["budget"] == budget


def test_an_unknown_profile_on_generate_is_one_error_line(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text")
    result = CliRunner().invoke(cli(), ["generate", str(doc), "--prompt", "q", "--profile", "no-such-machine"])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.strip()][-1].startswith(
        "error: unknown profile 'no-such-machine'")


def test_step_progress_prints_a_line_per_step(capsys):
    import sys

    bar = StepProgress("measuring", 2, stream=sys.stdout)
    bar("one")
    bar("two")
    out = capsys.readouterr().out.splitlines()
    assert out == ["measuring [############............] 1/2 one", "measuring [########################] 2/2 two"]
