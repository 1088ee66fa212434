"""ONNX Runtime's CUDA execution provider on an NVIDIA GPU (``onnxruntime-gpu``): the GPU path where TensorRT
cannot be installed.

``"auto"`` tries it after TensorRT and before the CPU backends. It runs the bundle's ONNX model as it is
(FP32, no plan to build); the pre- and post-processing stay on the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.errors import InferenceError
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend

PROVIDER = "CUDAExecutionProvider"


def status() -> BackendStatus:
    try:
        import onnxruntime
    except ImportError:
        return BackendStatus("onnxruntime-cuda", False, "onnxruntime is not installed: pip install onnxruntime-gpu")
    if PROVIDER not in onnxruntime.get_available_providers():
        return BackendStatus("onnxruntime-cuda", False,
                             f"onnxruntime has no {PROVIDER} (install onnxruntime-gpu)")
    return BackendStatus("onnxruntime-cuda", True, f"onnxruntime-gpu {onnxruntime.__version__}")


class CudaEngine:
    """One ONNX model in an ONNX Runtime session on the CUDA execution provider."""

    def __init__(self, model_file: Path, *, input_name: str, output_name: str, gpu_index: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[tuple[str, dict[str, object]]] = [(PROVIDER, {"device_id": gpu_index})]
        try:
            self._session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"ONNX Runtime (CUDA) cannot load {model_file}: {exc}") from exc
        if PROVIDER not in self._session.get_providers():  # ORT falls back to the CPU without saying so
            raise InferenceError(f"ONNX Runtime did not put {model_file.name} on GPU {gpu_index}: "
                                 f"its providers are {self._session.get_providers()}")
        names = [i.name for i in self._session.get_inputs()]
        if input_name not in names:
            raise InferenceError(f"{model_file.name} has no input named {input_name!r}; it has {names}")
        self.input_name = input_name
        self.output_name = output_name
        self.name = f"onnxruntime-cuda:{model_file.name}"

    def run(self, tiles: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self.output_name], {self.input_name: np.ascontiguousarray(tiles, np.float32)})
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime (CUDA) failed on a batch of shape {tiles.shape}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


class _CudaSession:
    def __init__(self, settings: BackendSettings) -> None:
        self.gpu_index = settings.gpu_index

    def engine(self, bundle: Bundle) -> LoadedEngine:
        assert bundle.model_file is not None  # built-in algorithms never reach a backend
        engine = CudaEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                            gpu_index=self.gpu_index)
        return LoadedEngine(engine, f"ONNX Runtime CUDA on GPU {self.gpu_index} (FP32)")

    def close(self) -> None:
        pass


class CudaBackend:
    """``engines.backend = "cuda"``, and ``"auto"``'s choice after TensorRT."""

    name = EngineBackend.CUDA
    label = "ONNX Runtime on the GPU (CUDA)"
    runs = "ONNX Runtime runs on the GPU (CUDA)"
    strict = True  # named, it is the GPU or nothing

    def status(self) -> BackendStatus:
        return status()

    def open(self, settings: BackendSettings) -> _CudaSession:
        found = status()
        if not found.available:
            raise InferenceError(found.detail)
        return _CudaSession(settings)
