"""The engine-backend seam: the registry's order is "auto"'s preference, a named backend has no fallback,
and a new backend is one class plus one registration — shown with a small NumPy backend registered in
front of the others, which the loader then uses for a real bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from node.errors import InferenceError
from node.infer.backends import registry
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.backends.loader import EngineLoader
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.engine import BackendStatus
from node.infer.manifest import load_bundle
from node.model.bundle import Bundle
from node.model.enums import EngineBackend

ENGINES = Path(__file__).resolve().parents[2] / "engines"


class _ZerosEngine:
    name = "zeros"

    def run(self, tiles: np.ndarray) -> np.ndarray:
        n, _, d, h, w = tiles.shape
        return np.zeros((n, 2, d, h, w), np.float32)


class _ZerosSession:
    def engine(self, bundle: Bundle) -> LoadedEngine:
        return LoadedEngine(_ZerosEngine(), "zeros for " + bundle.name)

    def close(self) -> None:
        pass


class _ZerosBackend:
    """A backend as a new module would define it (it takes the TensorRT slot's name for the test)."""

    name = EngineBackend.TENSORRT
    label = "the zeros backend"
    runs = "zeros run"
    strict = True

    def __init__(self, available: bool) -> None:
        self.available = available

    def status(self) -> BackendStatus:
        return BackendStatus("zeros", self.available, "numpy" if self.available else "pip install zeros")

    def open(self, settings: BackendSettings) -> _ZerosSession:
        if not self.available:
            raise InferenceError("zeros is not installed: pip install zeros")
        return _ZerosSession()


def test_auto_prefers_the_gpu_and_ends_on_the_cpu() -> None:
    auto = registry.candidates(EngineBackend.AUTO)
    assert [b.name for b in auto] == [EngineBackend.TENSORRT, EngineBackend.CUDA, EngineBackend.OPENVINO,
                                      EngineBackend.CPU]
    assert [b.name for b in registry.candidates(EngineBackend.CPU)] == [EngineBackend.CPU]
    assert registry.LAST_RESORT is auto[-1].name
    assert registry.is_strict(EngineBackend.TENSORRT) and not registry.is_strict(EngineBackend.CPU)
    assert not registry.is_strict(EngineBackend.AUTO)


def test_statuses_say_what_runs_and_what_to_install() -> None:
    found = {s.name: s for s in registry.statuses()}
    assert found["onnxruntime-cpu"].available and found["onnxruntime-cpu"].detail.startswith("onnxruntime ")
    trt = found["tensorrt"]
    if not trt.available:
        assert "install" in trt.detail


def test_a_registered_backend_is_used_first_under_auto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "BACKENDS", (_ZerosBackend(True), *registry.BACKENDS[1:]))
    bundle = load_bundle(ENGINES / "body-threshold")
    loaded = EngineLoader(EngineBackend.AUTO, BackendSettings(tmp_path)).get(bundle)
    assert loaded.description == "zeros for body-threshold"
    assert loaded.engine is not None
    assert loaded.engine.run(np.ones((1, 1, 4, 4, 4), np.float32)).shape == (1, 2, 4, 4, 4)


def test_an_unavailable_backend_falls_through_once_with_its_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The zeros backend, then ONNX Runtime (OpenVINO's own place in the order: test_openvino_backend.py).
    monkeypatch.setattr(registry, "BACKENDS", (_ZerosBackend(False), registry.backend(EngineBackend.CPU)))
    loader = EngineLoader(EngineBackend.AUTO, BackendSettings(tmp_path))
    with caplog.at_level(logging.WARNING):
        engines = [loader.get(load_bundle(ENGINES / name)).engine for name in ("body-threshold", "liver")]
    assert all(isinstance(e, OnnxRuntimeEngine) for e in engines)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["the zeros backend is not available, so ONNX Runtime runs on the CPU: "
                        "zeros is not installed: pip install zeros"]


def test_a_named_backend_has_no_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "BACKENDS", (_ZerosBackend(False), *registry.BACKENDS[1:]))
    loader = EngineLoader(EngineBackend.TENSORRT, BackendSettings(tmp_path))
    with pytest.raises(InferenceError, match=r"^bundle body-threshold: engines.backend is 'tensorrt' but zeros is "
                                             r"not installed"):
        loader.get(load_bundle(ENGINES / "body-threshold"))
