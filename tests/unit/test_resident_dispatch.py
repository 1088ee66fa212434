"""segment_volume hands the volume to the GPU-resident pipeline when the engine offers one (a TensorRT
engine does), and the labels are the host path's. Runs on the CPU emulation of kernels.cu
(tests/harness/cuda_cpu); tests/gpu runs the pipeline itself on a GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.infer.gpu.resident import ResidentPipeline
from node.infer.manifest import load_bundle
from node.infer.segment import segment_volume
from node.model.enums import Crop
from node.model.volume import Geometry, Volume
from tests.harness.cuda_cpu.build import build, missing_reason
from tests.harness.cuda_cpu.device import CpuDevice
from tests.harness.cuda_cpu.engines import NumpyEngine, PointerEngine

ENGINES = Path(__file__).resolve().parents[2] / "engines"


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> CpuDevice:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    return CpuDevice(build(tmp_path_factory.mktemp("cuda_cpu")).lib)


class ResidentEngine:
    """What a TensorRTEngine offers: ``run`` on host tiles, ``enqueue`` on device buffers, and a
    resident pipeline around itself — here on the CPU emulation."""

    def __init__(self, tile: tuple[int, int, int], channels: int, output_shape: tuple[int, int, int],
                 device: CpuDevice) -> None:
        self._host = NumpyEngine(tile, channels, output_shape)
        self._device = PointerEngine(tile, channels, 2, output_shape)
        self.name, self.max_batch, self.tile_shape = "resident-test", 2, tile
        self.output_shape, self.channels = output_shape, channels
        self.pipeline_uses = 0
        self._pipeline = ResidentPipeline(self, device)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        raise AssertionError("the host path ran although a resident pipeline was offered")

    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: object) -> None:
        self._device.enqueue(input_ptr, output_ptr, batch, stream)

    def resident_pipeline(self) -> Any:
        self.pipeline_uses += 1
        return self._pipeline


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
    geometry = Geometry(origin=np.zeros(3), row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
                        normal=np.array([0, 0, 1.0]), slice_step=np.array([0, 0, spacing[0]]), spacing=spacing,
                        shape=shape)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = (z**2 + (y - 0.1) ** 2 + (x + 0.2) ** 2 < 0.45) * 1200 - 600
    noise = np.random.default_rng(5).normal(0, 40, shape)
    return Volume((blob + noise).astype(np.int16), geometry, [])


def test_sliding_window_bundles_run_resident(device: CpuDevice) -> None:
    body = load_bundle(ENGINES / "body-threshold")
    bundle = dataclasses.replace(body, window=dataclasses.replace(body.window, patch=(8, 16, 16), batch=2),
                                 preprocess=dataclasses.replace(body.preprocess, clip=(-1000.0, 1000.0), scale=0.002))
    volume = _volume((20, 40, 44), (2.5, 1.2, 1.2))
    engine = ResidentEngine((8, 16, 16), 2, (8, 16, 16), device)
    on_device = segment_volume(volume, bundle, engine)
    on_host = segment_volume(volume, bundle, NumpyEngine((8, 16, 16), 2))
    assert engine.pipeline_uses == 1
    assert on_device.any() and np.array_equal(on_device, on_host)


def test_single_block_bundles_run_resident(device: CpuDevice) -> None:
    liver = load_bundle(ENGINES / "liver")
    bundle = dataclasses.replace(
        liver,
        coverage=dataclasses.replace(liver.coverage, min_extent_mm=0.0, min_body_width_mm=0.0),
        preprocess=dataclasses.replace(liver.preprocess, crop=Crop.NONE, intermediate_spacing_mm=None, median_size=0,
                                       orientation=None),
        postprocess=dataclasses.replace(liver.postprocess, open_model_grid=False, min_volume_ml=0.0),
        window=dataclasses.replace(liver.window, block=(24, 24, 24), output_margin=3),
    )
    volume = _volume((20, 36, 40), (3.5, 2.0, 2.0))
    engine = ResidentEngine((24, 24, 24), 2, (18, 18, 18), device)
    on_device = segment_volume(volume, bundle, engine)
    on_host = segment_volume(volume, bundle, NumpyEngine((24, 24, 24), 2, (18, 18, 18)))
    assert engine.pipeline_uses == 1
    assert on_device.any() and np.array_equal(on_device, on_host)
