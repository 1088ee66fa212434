"""TensorRT on a real GPU: the profile read from the driver, plans built and cached, outputs agreeing
with ONNX Runtime within each bundle's stated tolerance ([gpu] max_abs_difference, min_dice).

Skipped, with the reason, where there is no GPU, pycuda or TensorRT (the development and CI machines
of this project: TensorRT cannot be installed there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


# tests/gpu/conftest.py skips every test here without a GPU; these also need TensorRT.
pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install '.[gpu]')")

from node.infer.backends.onnxrt import OnnxRuntimeEngine  # noqa: E402
from node.infer.gpu.backend import GpuSession, plan_engine  # noqa: E402
from node.infer.gpu.mixed_precision import precision_agreement  # noqa: E402
from node.infer.gpu.profile import read_profile  # noqa: E402
from node.infer.manifest import load_bundle  # noqa: E402


@pytest.fixture(scope="module")
def session() -> GpuSession:
    return GpuSession(0)


def test_the_profile_read_from_the_driver_is_plausible() -> None:
    p = read_profile(0)
    assert p.name and p.sm_count > 0 and 0 < p.free_memory_bytes <= p.total_memory_bytes
    assert p.peak_bandwidth_bytes_s > 100e9, p  # every CUDA GPU the node supports has > 100 GB/s
    assert p.sm_clock_khz > 0 and p.memory_clock_khz > 0 and p.memory_bus_width_bits > 0, p.source


@pytest.mark.parametrize("name", ["body-threshold", "liver"])
def test_tensorrt_agrees_with_onnxruntime(session: GpuSession, tmp_path: Path, name: str) -> None:
    bundle = load_bundle(REPO / "engines" / name)
    engine, plan, cached = session.engine(bundle, tmp_path)
    assert cached.built
    spatial = bundle.window.network_input
    batch = min(3, plan.sizing.max_batch)
    rng = np.random.default_rng(7)
    # Inputs in the normalised range the pipeline feeds: smooth blobs plus noise.
    tiles = (rng.normal(0, 0.3, size=(batch, 1, *spatial))
             + np.sin(np.linspace(0, 6, spatial[-1]))[None, None, None, None, :]).astype(np.float32)
    got = engine.run(tiles)
    assert bundle.model_file is not None
    ort = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name)
    want = np.concatenate([ort.run(tiles[i : i + 1]) for i in range(batch)])
    assert got.shape == want.shape
    agreement = precision_agreement(want, got, bundle.postprocess.threshold)
    print(f"{name} {plan.precision.precision.value}: {agreement}")
    assert agreement["nonfinite"] == 0, agreement
    assert agreement["max_abs_diff"] <= bundle.gpu.max_abs_difference, agreement
    assert agreement["dice"] >= bundle.gpu.min_dice, agreement


def test_a_second_start_reads_the_plan_from_the_cache(session: GpuSession, tmp_path: Path) -> None:
    bundle = load_bundle(REPO / "engines" / "body-threshold")
    _, _, first = session.engine(bundle, tmp_path)
    _, _, second = session.engine(bundle, tmp_path)
    assert first.built and not second.built and first.path == second.path


def test_double_buffered_run_equals_one_batch_at_a_time(session: GpuSession, tmp_path: Path) -> None:
    bundle = load_bundle(REPO / "engines" / "body-threshold")
    engine, plan, _ = session.engine(bundle, tmp_path)
    n = 2 * plan.sizing.max_batch + 1  # three batches: both slots used, one reused
    tiles = np.random.default_rng(3).normal(0, 1, size=(n, 1, *bundle.window.patch)).astype(np.float32)
    together = engine.run(tiles)
    one_by_one = np.concatenate([engine.run(tiles[i : i + 1]) for i in range(n)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-3)


def test_the_key_names_this_gpu(session: GpuSession) -> None:
    bundle = load_bundle(REPO / "engines" / "body-threshold")
    key = plan_engine(bundle, session.profile, session.tensorrt_version).key
    assert key.gpu_name == session.profile.name and key.compute_capability == session.profile.cc_text
