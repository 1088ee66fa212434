"""The OpenVINO backend (issue 20): the CPU's units and peaks, the precision a bundle gets, the ``[cpu]``
table, the model cache's key and records, "auto"'s order, and — where openvino is installed — the FP32
path (everywhere), the BF16 path and its agreement check (where the CPU has a BF16 unit), a rejected
BF16 model running FP32 with the reason, the cache across restarts, doctor's rows and bench's rows.
Every network here is the small body-threshold model."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.errors import BundleError
from node.infer.backends import registry
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.cpu.features import CpuInfo, parse_cpuinfo, peak
from node.infer.cpu.model_cache import Check, CompiledKey, ModelCache
from node.infer.cpu.precision import CpuPrecision, choose_cpu_precision
from node.infer.manifest import load_bundle
from node.model.bundle import Bundle, CpuOptions
from node.model.enums import CpuPrecisionRequest, EngineBackend

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
"""
ZEN4 = ("vendor_id : AuthenticAMD\ncpu family : 25\nmodel name : AMD EPYC 9654\ncpu MHz : 2400.0\n"
        "flags : avx fma avx2 avx512f avx512_vnni avx512_bf16\n")
SKYLAKE_AVX2 = ("vendor_id : GenuineIntel\ncpu family : 6\nmodel name : Intel Xeon E5\ncpu MHz : 3000\n"
                "flags : avx fma avx2\n")


def cpu_from(text: str, cores: int = 2) -> CpuInfo:
    vendor, model, family, flags, mhz = parse_cpuinfo(text)
    return CpuInfo(model, vendor, family, flags, cores, cores, mhz, "test")


def body(**cpu: Any) -> Bundle:
    bundle = load_bundle(ENGINES / "body-threshold")
    return dataclasses.replace(bundle, cpu=dataclasses.replace(bundle.cpu, **cpu)) if cpu else bundle


# ------------------------------------------------------------------------------------ the CPU
def test_cpuinfo_units_and_peaks() -> None:
    spr = cpu_from(SAPPHIRE_RAPIDS)
    assert spr.model == "Intel(R) Xeon(R) Platinum 8480+" and spr.bf16_unit == "AMX-BF16"
    assert spr.vnni == ("avx512_vnni", "amx_int8") and "amx_bf16" in spr.isa
    assert peak(spr, "fp32").flops == pytest.approx(2 * 2.0e9 * 64)  # 2 × 512-bit FMA pipes
    bf16 = peak(spr, "bf16")
    assert bf16.flops == pytest.approx(2 * 2.0e9 * 1024) and "AMX-BF16 tile unit" in bf16.how
    zen4 = cpu_from(ZEN4, cores=4)
    assert zen4.bf16_unit == "AVX-512 BF16" and zen4.datapath_bits == 256  # AVX-512 in two 256-bit halves
    assert peak(zen4, "fp32", threads=2).flops == pytest.approx(2 * 2.4e9 * 32)  # threads cap the cores
    assert peak(zen4, "bf16").flops == pytest.approx(4 * 2.4e9 * 64)
    avx2 = cpu_from(SKYLAKE_AVX2)
    assert avx2.bf16_unit is None and "AMX-BF16 no, AVX-512 BF16 no, VNNI no" in avx2.units()
    assert peak(avx2, "bf16").flops == peak(avx2, "fp32").flops == pytest.approx(2 * 3e9 * 32)
    with pytest.raises(Exception, match="precision 'fp16' has no CPU peak"):
        peak(avx2, "fp16")


def test_precision_follows_the_bf16_units_and_the_bundle() -> None:
    spr, avx2 = cpu_from(SAPPHIRE_RAPIDS), cpu_from(SKYLAKE_AVX2)
    auto = choose_cpu_precision(spr, CpuPrecisionRequest.AUTO, openvino_bf16=True)
    assert auto.precision is CpuPrecision.BF16 and "AMX-BF16" in auto.reason
    fp32 = choose_cpu_precision(spr, CpuPrecisionRequest.FP32, openvino_bf16=True)
    assert fp32.precision is CpuPrecision.FP32 and fp32.reason == "FP32, as the bundle asks"
    none = choose_cpu_precision(avx2, CpuPrecisionRequest.BF16, openvino_bf16=True)
    assert none.precision is CpuPrecision.FP32
    assert none.reason == "FP32: Intel Xeon E5 has no AMX-BF16 or AVX-512 BF16 unit (the bundle asks for BF16)"
    refused = choose_cpu_precision(spr, CpuPrecisionRequest.AUTO, openvino_bf16=False)
    assert refused.precision is CpuPrecision.FP32 and "OpenVINO does not offer BF16" in refused.reason


# ------------------------------------------------------------------------------------ the manifest
def test_cpu_table_defaults_to_the_gpu_tolerances(tmp_path: Path) -> None:
    assert body().cpu == CpuOptions(CpuPrecisionRequest.AUTO, 0.05, 0.99)
    liver = load_bundle(ENGINES / "liver")
    assert liver.cpu == CpuOptions(CpuPrecisionRequest.AUTO, 0.1, 0.98)  # justified in its manifest
    source = (ENGINES / "body-threshold" / "manifest.toml").read_text()
    for table, problem in (('[cpu]\nprecision = "fp16"\n', "key 'cpu.precision' is 'fp16'"),
                           ("[cpu]\nmin_dice = 1.5\n", "key 'cpu.min_dice' is 1.5"),
                           ("[cpu]\nthreads = 2\n", "cpu.threads")):
        bundle_dir = tmp_path / str(len(problem))
        bundle_dir.mkdir()
        (bundle_dir / "manifest.toml").write_text(source + "\n" + table)
        with pytest.raises(BundleError, match=problem.replace(".", r"\.")):
            load_bundle(bundle_dir)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "manifest.toml").write_text(source + '\n[gpu]\nmin_dice = 0.95\n[cpu]\nprecision = "fp32"\n')
    assert load_bundle(tmp_path / "ok").cpu == CpuOptions(CpuPrecisionRequest.FP32, 0.05, 0.95)


# ------------------------------------------------------------------------------------ the cache
def _key(**changes: Any) -> CompiledKey:
    key = CompiledKey("body-threshold@0.1.0", "ab" * 32, "2026.4.1", "AMD EPYC", ("avx2", "avx512_bf16"), "bf16",
                      (2, 1, 32, 128, 128))
    return dataclasses.replace(key, **changes)


def test_the_key_changes_with_everything_that_invalidates_a_model() -> None:
    base = _key()
    for change in ({"onnx_sha256": "cd" * 32}, {"openvino_version": "2026.5.0"}, {"cpu_model": "Xeon"},
                   {"cpu_isa": ("avx2",)}, {"precision": "fp32"}, {"input_shape": (1, 1, 32, 128, 128)},
                   {"recipe": 2}):
        assert _key(**change).digest != base.digest, change
    assert base.differences(_key(cpu_model="Xeon").as_dict()) == ["cpu_model: 'Xeon' → 'AMD EPYC'"]


def test_cache_records_models_and_rejections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ModelCache(tmp_path)
    key = _key()
    assert cache.lookup(key) is None
    stored = cache.store(key, b"model bytes", Check(True, "max |Δ| 0.01"), 1.5)
    found = cache.lookup(key)
    assert found is not None and found.blob == b"model bytes" and found.check == Check(True, "max |Δ| 0.01")
    assert stored.path == tmp_path / "engines" / "openvino" / "body-threshold-0.1.0" / f"{key.digest}.blob"
    rejected = cache.store(key, None, Check(False, "max |Δ| 0.3"), 1.0)
    assert not rejected.path.exists()  # a rejected model is never kept
    found = cache.lookup(key)
    assert found is not None and found.blob is None and found.check == Check(False, "max |Δ| 0.3")
    fp32 = _key(precision="fp32")
    cache.store(fp32, b"fp32 model", None, 0.5)
    cache.blob_path(fp32).write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(fp32) is None
    assert "does not match its recorded sha256" in caplog.text
    sidecar = cache.blob_path(fp32).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["openvino_version"] = "2025.0"
    sidecar.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(fp32) is None
    assert "openvino_version: '2025.0' → '2026.4.1'" in caplog.text


def test_auto_tries_openvino_after_the_gpu_and_before_onnxruntime() -> None:
    assert [b.name for b in registry.candidates(EngineBackend.AUTO)] == [
        EngineBackend.TENSORRT, EngineBackend.CUDA, EngineBackend.OPENVINO, EngineBackend.CPU]
    assert registry.is_strict(EngineBackend.OPENVINO)  # named, it is OpenVINO or nothing
    found = {s.name: s for s in registry.statuses()}
    assert found["openvino"].available or found["openvino"].detail == "openvino is not installed: pip install openvino"


# ------------------------------------------------------------------------------------ with OpenVINO
def _openvino_missing() -> str | None:
    from node.infer.backends.openvino import status

    found = status()
    return None if found.available else found.detail


def _bf16_missing() -> str | None:
    if reason := _openvino_missing():
        return reason
    from node.infer.backends.openvino import offers_bf16, openvino_core
    from node.infer.cpu.features import read_cpu

    cpu = read_cpu()
    if cpu.bf16_unit is None:
        return f"{cpu.model} has no AMX-BF16 or AVX-512 BF16 unit"
    return None if offers_bf16(openvino_core()) else "OpenVINO does not offer BF16 on this CPU"


needs_openvino = pytest.mark.skipif(_openvino_missing() is not None, reason=f"{_openvino_missing()}")
needs_bf16 = pytest.mark.skipif(_bf16_missing() is not None, reason=f"BF16 not testable here: {_bf16_missing()}")


def _engine(bundle: Bundle, state: Path) -> LoadedEngine:
    from node.infer.backends.openvino import OpenVinoBackend

    return OpenVinoBackend().open(BackendSettings(state, threads=1)).engine(bundle)


def _reference(bundle: Bundle, tiles: np.ndarray) -> np.ndarray:
    from node.infer.backends.onnxrt import OnnxRuntimeEngine

    assert bundle.model_file is not None
    return OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                             threads=1).run(tiles)


@needs_openvino
def test_fp32_runs_any_batch_like_onnxruntime_and_is_cached(tmp_path: Path) -> None:
    from node.infer.backends.openvino import OpenVinoEngine

    bundle = body(precision=CpuPrecisionRequest.FP32)
    loaded = _engine(bundle, tmp_path)
    assert isinstance(loaded.engine, OpenVinoEngine) and loaded.engine.batch == 2  # the window's batch
    assert loaded.description.startswith("OpenVINO FP32 on the CPU, model compiled in")
    assert "FP32, as the bundle asks" in loaded.description
    tiles = np.random.default_rng(1).normal(0.0, 0.5, size=(3, 1, 32, 128, 128)).astype(np.float32)
    out = loaded.engine.run(tiles)  # 3 tiles: a full batch, then one padded
    assert out.shape == (3, 2, 32, 128, 128) and out.dtype == np.float32
    assert np.abs(out - _reference(bundle, tiles)).max() < 1e-3
    again = _engine(bundle, tmp_path)  # a restart: imported, not compiled
    assert "model from the model cache" in again.description
    assert again.engine is not None and np.array_equal(again.engine.run(tiles[:1]), out[:1])


@needs_openvino
def test_a_cpu_without_bf16_units_gets_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.infer.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "read_cpu", lambda: cpu_from(SKYLAKE_AVX2))
    loaded = _engine(body(), tmp_path)
    assert loaded.description.startswith("OpenVINO FP32 on the CPU")
    assert "Intel Xeon E5 has no AMX-BF16 or AVX-512 BF16 unit (the bundle would use BF16)" in loaded.description


@needs_bf16
def test_bf16_is_checked_against_onnxruntime_when_compiled(tmp_path: Path) -> None:
    loaded = _engine(body(), tmp_path)
    assert loaded.description.startswith("OpenVINO BF16 on the CPU (")
    assert "agreement with ONNX Runtime max |Δ|" in loaded.description
    (sidecar,) = (tmp_path / "engines" / "openvino" / "body-threshold-0.1.0").glob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["key"]["precision"] == "bf16" and meta["check"]["passed"] is True
    assert "from the model cache" in _engine(body(), tmp_path).description


@needs_bf16
def test_a_bf16_model_outside_the_tolerance_runs_fp32_and_doctor_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from node.infer.cpu.doctor import cpu_report

    strict = body(min_dice=1.01)  # no model can reach it (the manifest would refuse such a value)
    with caplog.at_level(logging.INFO, logger="node.infer.backends.openvino"):
        first = _engine(strict, tmp_path)
        second = _engine(strict, tmp_path)
    for loaded in (first, second):
        assert loaded.description.startswith("OpenVINO FP32 on the CPU")
        assert "BF16 disagreed with ONNX Runtime FP32 when compiled (max |Δ|" in loaded.description
        assert "(≥ 1.01)" in loaded.description
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "runs OpenVINO FP32: BF16 disagreed" in warnings[0]  # once, when found
    assert "model from the model cache" in second.description  # neither recompiled nor re-checked
    (row,) = cpu_report([strict], backend=EngineBackend.AUTO, state_dir=tmp_path).rows
    assert row.backend == "OpenVINO" and row.precision == "FP32" and row.model.startswith("compiled (")
    assert row.why.startswith("FP32: BF16 disagreed with ONNX Runtime FP32 when compiled")


@needs_openvino
def test_doctor_names_the_cpu_and_each_bundles_backend(tmp_path: Path) -> None:
    from node.infer.cpu.doctor import cpu_report

    bundles = [load_bundle(ENGINES / "body-lungs"), body()]
    report = cpu_report(bundles, backend=EngineBackend.AUTO, state_dir=tmp_path)
    assert report.backend == "OpenVINO" and "AMX-BF16" in report.cpu.units()
    assert set(report.peaks) == {"fp32", "bf16"} and "GFLOP/s" in report.peaks["fp32"].how
    builtin, network = report.rows
    assert builtin.backend == "-" and "built-in" in builtin.why
    assert network.backend == "OpenVINO" and network.model.startswith("not compiled (")
    cpu_only = cpu_report(bundles, backend=EngineBackend.CPU, state_dir=tmp_path)
    assert cpu_only.rows[1].backend == "ONNX Runtime" and cpu_only.rows[1].precision == "FP32"


@needs_openvino
def test_bench_has_openvino_rows_with_a_fraction_of_the_cpu_peak(tmp_path: Path) -> None:
    from node.infer.gpu.bench import bench

    rows, notes = bench([body()], state_dir=tmp_path, repeats=1, gpu_index=0, threads=1)
    engines = {r.engine: r for r in rows}
    assert {"onnxruntime-cpu fp32", "openvino-cpu fp32"} <= set(engines)
    if _bf16_missing() is None:
        assert "openvino-cpu bf16" in engines
    for name in ("onnxruntime-cpu fp32", "openvino-cpu fp32"):
        row = engines[name]
        assert row.per_tile_ms > 0 and row.achieved_tflops > 0 and row.compute_fraction.endswith("%")
    assert any(n.startswith("CPU peak FP32: 1 core(s) × ") for n in notes)


@needs_openvino
def test_a_cached_model_openvino_cannot_import_is_compiled_again(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    bundle = body(precision=CpuPrecisionRequest.FP32)
    _engine(bundle, tmp_path)
    (blob,) = (tmp_path / "engines" / "openvino" / "body-threshold-0.1.0").glob("*.blob")
    recorded: dict[str, Any] = json.loads(blob.with_suffix(".json").read_text())["key"]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    key = CompiledKey(**fields)
    ModelCache(tmp_path).store(key, b"not an OpenVINO model", None, 0.0)  # a valid record of a bad model
    with caplog.at_level(logging.WARNING):
        loaded = _engine(bundle, tmp_path)
    assert "cannot be imported" in caplog.text and "model compiled in" in loaded.description
    found = ModelCache(tmp_path).lookup(key)
    assert found is not None and found.blob != b"not an OpenVINO model"


def test_the_benchmarks_force_a_precision_through_the_manifest(tmp_path: Path) -> None:
    import tomllib

    from benchmarks.cpu_variants import bundles_for, engines_toml, with_cpu_precision

    for name in ("liver", "body-threshold"):
        text = with_cpu_precision((ENGINES / name / "manifest.toml").read_text(), "fp32")
        assert tomllib.loads(text)["cpu"]["precision"] == "fp32"
    copy = bundles_for("openvino-bf16", ENGINES, tmp_path)
    assert load_bundle(copy / "liver").cpu == CpuOptions(CpuPrecisionRequest.BF16, 0.1, 0.98)
    assert (copy / "liver" / "model.onnx").resolve() == (ENGINES / "liver" / "model.onnx").resolve()
    assert bundles_for("auto", ENGINES, tmp_path) == ENGINES
    assert engines_toml("onnxruntime", ENGINES, tmp_path).startswith('backend = "cpu"\n')
