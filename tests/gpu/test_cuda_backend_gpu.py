"""``engines.backend = "cuda"`` on a GPU: ONNX Runtime's CUDA execution provider computes what the CPU backend
computes (FP32). Runs where onnxruntime-gpu sees a GPU; skipped with the reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.infer.backends.base import BackendSettings
from node.infer.backends.cuda import CudaEngine, status
from node.infer.backends.loader import EngineLoader
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.manifest import load_bundle
from node.model.enums import EngineBackend

ENGINES = Path(__file__).resolve().parents[2] / "engines"


@pytest.fixture(autouse=True)
def _needs_cuda_provider() -> None:
    found = status()
    if not found.available:
        pytest.skip(found.detail)


def test_the_cuda_provider_matches_the_cpu_backend(tmp_path: Path) -> None:
    bundle = load_bundle(ENGINES / "body-threshold")
    assert bundle.model_file is not None
    loaded = EngineLoader(EngineBackend.CUDA, BackendSettings(tmp_path)).get(bundle)
    assert isinstance(loaded.engine, CudaEngine) and "ONNX Runtime CUDA on GPU 0" in loaded.description
    tiles = np.random.default_rng(5).uniform(-1.0, 1.5, (2, 1, 32, 128, 128)).astype(np.float32)
    want = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name).run(tiles)
    np.testing.assert_allclose(loaded.engine.run(tiles), want, atol=1e-4)
