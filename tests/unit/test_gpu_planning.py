"""GPU decisions checked on the CPU against recorded GPU profiles: rates, precision, batch sizing,
plan cache keys. No GPU, CUDA or TensorRT is needed (the issue: TensorRT cannot be installed here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.errors import InferenceError
from node.infer.gpu.backend import model_input, plan_engine
from node.infer.gpu.plan import MAX_BATCH_CAP, Precision, choose_precision, roofline, size_batches, workspace_for
from node.infer.gpu.plan_cache import PlanKey, TensorProfile
from node.infer.gpu.profile import GpuProfile
from node.infer.manifest import load_bundle
from node.infer.model_cost import model_cost

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "tests" / "data" / "gpu_profiles"
MiB = 1 << 20


def gpu(name: str) -> GpuProfile:
    return GpuProfile.load(PROFILES / f"{name}.json")


@pytest.fixture(scope="module")
def liver():
    return load_bundle(REPO / "engines" / "liver")


@pytest.fixture(scope="module")
def body():
    return load_bundle(REPO / "engines" / "body-threshold")


# ------------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("name, bandwidth_tb_s, fp16_tflops", [
    # NVIDIA's published figures: the derived rates must land near them (clocks as CUDA reports
    # the maximum boost, so compute lands a little above the datasheet's sustained-clock numbers).
    ("h100-sxm-80gb", 3.35, 989),
    ("h200-141gb", 4.8, 989),
    ("a100-sxm4-40gb", 1.555, 312),
    ("t4-16gb", 0.320, 65),
    ("l4-24gb", 0.300, 121),
])
def test_derived_rates_match_published_figures(name: str, bandwidth_tb_s: float, fp16_tflops: float) -> None:
    p = gpu(name)
    assert p.peak_bandwidth_bytes_s / 1e12 == pytest.approx(bandwidth_tb_s, rel=0.05)
    assert p.peak_flops("fp16") / 1e12 == pytest.approx(fp16_tflops, rel=0.12)


def test_profiles_round_trip_through_json(tmp_path: Path) -> None:
    for path in PROFILES.glob("*.json"):
        p = GpuProfile.load(path)
        again = tmp_path / path.name
        again.write_text(p.to_json())
        assert GpuProfile.load(again) == p


def test_a_broken_profile_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(InferenceError, match="bad.json is not a GPU profile"):
        GpuProfile.load(bad)


def test_gpus_without_tensor_cores_are_recognised() -> None:
    assert not gpu("gtx1080ti-11gb").has_tensor_cores  # Pascal, cc 6.1
    assert not gpu("gtx1650-4gb").has_tensor_cores     # cc 7.5 but a TU117
    assert gpu("t4-16gb").has_tensor_cores
    assert gpu("gtx1650-4gb").peak_flops("fp16") == gpu("gtx1650-4gb").peak_fp32_flops


# ----------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name, requested, expected", [
    ("h100-sxm-80gb", "auto", Precision.FP16),
    ("h100-sxm-80gb", "bf16", Precision.BF16),
    ("a100-sxm4-40gb", "bf16", Precision.BF16),
    ("t4-16gb", "auto", Precision.FP16),
    ("t4-16gb", "bf16", Precision.FP16),           # Turing has no BF16
    ("gtx1080ti-11gb", "auto", Precision.FP32),    # no tensor cores
    ("gtx1080ti-11gb", "fp16", Precision.FP32),
    ("gtx1650-4gb", "auto", Precision.FP32),
    ("h200-141gb", "fp32", Precision.FP32),
])
def test_precision_follows_the_tensor_cores(name: str, requested: str, expected: Precision) -> None:
    choice = choose_precision(gpu(name), requested)
    assert choice.precision is expected
    assert choice.reason  # a sentence for the log and `engines doctor`


def test_precision_reasons_name_what_is_missing() -> None:
    assert "needs compute capability 8.0" in choose_precision(gpu("t4-16gb"), "bf16").reason
    assert "no tensor cores" in choose_precision(gpu("gtx1080ti-11gb"), "auto").reason
    with pytest.raises(InferenceError, match="'int8' is not one of"):
        choose_precision(gpu("t4-16gb"), "int8")


# ------------------------------------------------------------------------------------- sizing
def test_tile_batch_is_a_power_of_two_that_fits(body) -> None:
    shape = model_input(body)
    cost = model_cost(body.model_file, shape.sample_shape)
    for path in PROFILES.glob("*.json"):
        p = GpuProfile.load(path)
        precision = choose_precision(p).precision
        s = size_batches(p, cost, precision, batch_dim_fixed=shape.fixed_batch, preferred_batch=2, name="body")
        assert s.min_batch == 1 and s.opt_batch <= s.max_batch <= MAX_BATCH_CAP
        assert s.max_batch & (s.max_batch - 1) == 0
        assert s.fixed_bytes + s.max_batch * s.per_sample_bytes <= s.budget_bytes


def test_less_free_memory_never_gives_a_bigger_batch(body) -> None:
    shape = model_input(body)
    cost = model_cost(body.model_file, (1, 1, 128, 256, 256))  # larger tiles, so memory is what limits
    base = gpu("t4-16gb")
    batches = []
    for free_gib in (14, 10, 8, 6, 5, 4):
        s = size_batches(base.with_free_memory(free_gib << 30), cost, Precision.FP16, batch_dim_fixed=shape.fixed_batch,
                         preferred_batch=2, name="body")
        batches.append(s.max_batch)
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1]


def test_small_changes_in_free_memory_keep_the_plan_key(body) -> None:
    """Free memory moves a little between starts; the plan must not be rebuilt for that."""
    h100 = gpu("h100-sxm-80gb")
    a = plan_engine(body, h100, "11.4.0.106").key
    b = plan_engine(body, h100.with_free_memory(h100.free_memory_bytes - 700 * MiB), "11.4.0.106").key
    assert a == b and a.digest == b.digest


def test_the_liver_block_is_one_sample_and_does_not_fit_a_4_gb_card(liver) -> None:
    plan = plan_engine(liver, gpu("h100-sxm-80gb"), "11.4.0.106")
    assert (plan.sizing.min_batch, plan.sizing.max_batch) == (1, 1)  # one block per series
    assert plan.key.profiles[0].max_shape == (1, 1, 162, 162, 189)
    with pytest.raises(InferenceError, match=r"bundle liver needs [\d,]+ MiB per sample at FP32 .* GTX 1650"):
        plan_engine(liver, gpu("gtx1650-4gb"), "11.4.0.106")


def test_workspace_is_bounded_by_memory() -> None:
    assert workspace_for(gpu("h100-sxm-80gb")) == 4 << 30
    assert workspace_for(gpu("gtx1650-4gb")) == int(gpu("gtx1650-4gb").total_memory_bytes // 4)
    assert workspace_for(gpu("h100-sxm-80gb"), budget_bytes=2 << 30) == 512 * MiB  # little free: little scratch
    assert workspace_for(gpu("h100-sxm-80gb"), budget_bytes=100 * MiB) == 256 * MiB


def test_roofline_says_what_bounds_the_liver(liver) -> None:
    h100, t4 = gpu("h100-sxm-80gb"), gpu("t4-16gb")
    cost = model_cost(liver.model_file, (1, 1, 162, 162, 189))
    fast = roofline(h100, cost, Precision.FP16)
    slow = roofline(t4, cost, Precision.FP16)
    assert fast.seconds < slow.seconds
    assert fast.bound in ("compute", "memory")
    assert fast.compute_s == pytest.approx(cost.conv_flops / h100.peak_flops("fp16")
                                           + cost.elementwise_flops / h100.peak_fp32_flops)
    assert roofline(h100, cost, Precision.FP32).seconds > fast.seconds


# ------------------------------------------------------------------------------------ the key
def _key(**changes: object) -> PlanKey:
    base = PlanKey(bundle="liver@0.3", onnx_sha256="a" * 64, tensorrt_version="11.4.0.106",
                   gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", precision="fp16",
                   profiles=(TensorProfile("image", (1, 1, 8, 8, 8), (2, 1, 8, 8, 8), (4, 1, 8, 8, 8)),))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64},
    {"tensorrt_version": "11.3.0.99"},
    {"tensorrt_version": "10.16.1.11"},
    {"gpu_name": "NVIDIA H200"},
    {"compute_capability": "8.0"},
    {"precision": "bf16"},
    {"profiles": (TensorProfile("image", (1, 1, 8, 8, 8), (2, 1, 8, 8, 8), (8, 1, 8, 8, 8)),)},
    {"recipe": 2},
])
def test_everything_that_invalidates_a_plan_changes_its_key(change: dict[str, object]) -> None:
    assert _key(**change).digest != _key().digest
    assert _key(**change).differences(_key().as_dict())


def test_the_same_key_has_the_same_digest() -> None:
    assert _key().digest == _key().digest and not _key().differences(_key().as_dict())


def test_each_gpu_gets_its_own_plan(liver, body) -> None:
    keys = {plan_engine(b, GpuProfile.load(p), "11.4.0.106").key.digest
            for b in (body,) for p in PROFILES.glob("*.json")}
    assert len(keys) == len(list(PROFILES.glob("*.json")))


def test_cuda_versions_read_as_operators_write_them() -> None:
    from node.infer.gpu.profile import _cuda_version_text

    assert [_cuda_version_text(v) for v in (12040, 13000, 11080, 12020)] == ["12.4", "13.0", "11.8", "12.2"]
