"""An imported nnU-Net model on the GPU path, unchanged: ``import-nnunet`` writes the bundle, the TensorRT backend
plans it (tile batch from the patch and the free memory, not the manifest's ``batch = 1``), builds and caches
the plan, checks it against ONNX Runtime (node/infer/gpu/check.py: the bundle's [gpu] tolerances), and the
node's labels for a real CT through that plan agree with its labels through ONNX Runtime on the CPU.

The model is the tests' tiny nnU-Net fixture (tests/data/nnunet/tiny) trained briefly on the CT's intensity
bands, so its labels follow the anatomy. Skipped with the reason without a GPU (tests/gpu/conftest.py),
TensorRT, torch/nnunetv2 (the [import] extra) or the real CT in ../shared/data.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = SHARED / "ct" / "totalseg-abdomen-20-j2k"

pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install '.[gpu]')")
if not all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2")):
    pytest.skip("importing an nnU-Net model needs torch and nnunetv2 (the [import] extra)", allow_module_level=True)
if not CT.is_dir():
    pytest.skip(f"real abdomen CT not found at {CT}", allow_module_level=True)

from node.assemble.volume import build_volume, read_series  # noqa: E402
from node.infer.backends.onnxrt import OnnxRuntimeEngine  # noqa: E402
from node.infer.gpu.backend import GpuSession  # noqa: E402
from node.infer.gpu.plan import tile_batch_for_patch  # noqa: E402
from node.infer.segment import segment_volume  # noqa: E402
from node.model.bundle import Bundle  # noqa: E402
from node.model.volume import Volume  # noqa: E402

ITERATIONS = 300  # as the parity test: fewer leave fat and bone nearly empty (60 steps: 0 and 11 voxels)
#: Labels with fewer voxels than this in both results are left out of the Dice (a few voxels say nothing).
MIN_VOXELS = 1000


@pytest.fixture(scope="module")
def volume() -> Volume:
    return build_volume(read_series(sorted(CT.glob("CT.*"))))


@pytest.fixture(scope="module")
def imported(volume: Volume, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_tiny import LABELS_CSV, make_model_folder

    root = tmp_path_factory.mktemp("imported")
    model = make_model_folder(root / "model", hu=volume.voxels.astype(np.float32), iterations=ITERATIONS,
                              batch_norm=True)
    (root / "engines").mkdir()
    return import_nnunet(model, root / "engines" / "tiny", labels_map=LABELS_CSV).bundle


@pytest.fixture(scope="module")
def session() -> Iterator[Any]:
    gpu = GpuSession(0)
    yield gpu
    gpu.close()


class _Counting:
    """The TensorRT engine, recording the batch of every run (the window asks the engine's own batch)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = engine.name
        self.max_batch = engine.max_batch
        self.batches: list[int] = []

    def run(self, tiles: np.ndarray) -> np.ndarray:
        self.batches.append(len(tiles))
        out: np.ndarray = self.engine.run(tiles)
        return out


def test_an_imported_bundle_is_planned_checked_and_cached(session: Any, imported: Bundle, tmp_path: Path) -> None:
    engine, plan, cached = session.engine(imported, tmp_path)  # raises when the plan disagrees with ONNX Runtime
    try:
        assert cached.built  # built here, so the precision check ran
        assert imported.window.batch == 1
        assert plan.sizing.opt_batch == plan.sizing.max_batch > 1
        assert plan.sizing.max_batch <= tile_batch_for_patch(imported.window.patch)
        assert plan.key.onnx_sha256 == imported.model_sha256
    finally:
        engine.close()
    again, _, second = session.engine(imported, tmp_path)
    again.close()
    assert not second.built and second.path == cached.path


def test_the_gpu_labels_agree_with_onnx_runtimes(session: Any, imported: Bundle, volume: Volume,
                                                 tmp_path: Path) -> None:
    engine, plan, _ = session.engine(imported, tmp_path)
    try:
        counting = _Counting(engine)
        gpu_labels = segment_volume(volume, imported, counting)
    finally:
        engine.close()
    assert imported.model_file is not None
    cpu = OnnxRuntimeEngine(imported.model_file, input_name=imported.input_name, output_name=imported.output_name)
    cpu_labels = segment_volume(volume, imported, cpu)
    assert max(counting.batches) == min(plan.sizing.max_batch, sum(counting.batches))  # full batches, not 1
    agreement = float((gpu_labels == cpu_labels).mean())
    dice = {}
    for label in imported.labels:
        a, b = gpu_labels == label.value, cpu_labels == label.value
        if max(a.sum(), b.sum()) >= MIN_VOXELS:
            dice[label.name] = 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
    print(f"{plan.precision.precision.value}, batch {plan.sizing.max_batch}: voxel agreement {agreement:.5f}, "
          f"Dice {dice}")
    assert dice, "the model found nothing: the test would prove nothing"
    assert agreement >= 0.995
    assert min(dice.values()) >= imported.gpu.min_dice
