"""Which engine a bundle gets under each ``engines.backend``, on a machine without a GPU or TensorRT
(the CI machine): "auto" falls back to the CPU (OpenVINO where it is installed, else ONNX Runtime) and
says why once, "tensorrt" refuses, "cpu" never touches the GPU code."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from node.config import NodeConfig
from node.errors import InferenceError
from node.infer.backends.loader import EngineLoader
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.backends.openvino import OpenVinoEngine
from node.infer.backends.openvino import status as openvino_status
from node.infer.manifest import discover_bundles
from node.jobs.worker import load_engines
from node.model.enums import CpuPrecisionRequest, EngineBackend

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"


def _gpu_missing() -> str | None:
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return None if cuda.Device.count() else "no GPU"
    except Exception as exc:
        return str(exc)


pytestmark = pytest.mark.skipif(_gpu_missing() is None, reason="this machine has a GPU and TensorRT: the fallback "
                                                              "tests need a machine without them")


def bundles(*names: str):
    return discover_bundles(ENGINES, names)


def test_auto_falls_back_to_the_cpu_and_says_why_once(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    openvino = openvino_status().available
    factory = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.AUTO,
                                                  state_dir=tmp_path))
    # The liver at FP32: the fallback is the point here, not its BF16 check (test_openvino_backend.py).
    found = [dataclasses.replace(b, cpu=dataclasses.replace(b.cpu, precision=CpuPrecisionRequest.FP32))
             for b in bundles("body-threshold", "liver")]
    with caplog.at_level(logging.WARNING, logger="node.infer.backends.loader"):
        loaded = [factory.get(b) for b in found]
    runner = "OpenVINO" if openvino else "ONNX Runtime"
    assert all(isinstance(x.engine, OpenVinoEngine if openvino else OnnxRuntimeEngine) for x in loaded)
    assert all(x.description.startswith(f"{runner} ") and "on the CPU" in x.description for x in loaded)
    warnings = [r.getMessage() for r in caplog.records]
    # two bundles, one reason per backend passed over: logged once (and OpenVINO's when it is missing)
    assert len(warnings) == (2 if openvino else 3), warnings
    assert f"{runner} runs on the CPU" in warnings[0] and "pip install '.[gpu]'" in warnings[0]
    assert "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)" in warnings[1]  # "cuda" after TensorRT
    if not openvino:
        assert "pip install openvino" in warnings[2]
    # The fallback engine really runs.
    out = loaded[0].engine.run(np.zeros((1, 1, 32, 128, 128), np.float32))  # type: ignore[union-attr]
    assert out.shape == (1, 2, 32, 128, 128)


def test_tensorrt_backend_refuses_to_fall_back() -> None:
    factory = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.TENSORRT))
    with pytest.raises(InferenceError, match=r"bundle body-threshold: engines.backend is 'tensorrt' but .*install"):
        factory.get(bundles("body-threshold")[0])


def test_cpu_backend_never_opens_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import node.infer.gpu.backend

    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GPU was opened under engines.backend = 'cpu'")

    monkeypatch.setattr(node.infer.gpu.backend, "GpuSession", explode)
    factory = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.CPU))
    assert isinstance(factory.get(bundles("body-threshold")[0]).engine, OnnxRuntimeEngine)


def test_built_in_algorithms_need_no_engine() -> None:
    factory = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.TENSORRT))
    loaded = factory.get(bundles("body-lungs")[0])
    assert loaded.engine is None and "built-in" in loaded.description


def test_the_worker_report_names_each_engine_or_its_failure() -> None:
    found = {b.id: b for b in bundles("body-threshold", "body-lungs")}
    report = load_engines(EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.AUTO)),
                          found, "worker-0-1")
    assert set(report.engines) == set(found) and not report.failed
    strict = load_engines(
        EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.TENSORRT)), found,
        "worker-0-1")
    assert list(strict.failed) == ["body-threshold@0.1.0"] and "engines.backend is 'tensorrt'" in strict.failed[
        "body-threshold@0.1.0"]
    assert list(strict.engines) == ["body-lungs@1.0.0"]


def test_workers_that_crash_while_loading_go_on_without_the_gpu_or_stop_the_service() -> None:
    """A TensorRT build or driver fault that kills the worker process: after LOAD_CRASH_LIMIT deaths in a
    row, "auto" restarts it on ONNX Runtime; "cpu" and "tensorrt" have nowhere to go and stop."""
    from node.jobs.worker import LOAD_CRASH_LIMIT, restart_config

    auto = NodeConfig(engine_backend=EngineBackend.AUTO)
    assert restart_config(auto, LOAD_CRASH_LIMIT - 1, -11) == (auto, None)
    cfg, fatal = restart_config(auto, LOAD_CRASH_LIMIT, -11)
    assert cfg.engine_backend == "cpu" and fatal is None
    for backend in ("cpu", "tensorrt"):
        cfg, fatal = restart_config(NodeConfig(engine_backend=EngineBackend(backend)), LOAD_CRASH_LIMIT, -11)
        assert fatal is not None
        assert f"died {LOAD_CRASH_LIMIT} times while loading its engines (last exit code -11)" in fatal
        assert repr(backend) in fatal
