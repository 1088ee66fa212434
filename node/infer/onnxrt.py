"""ONNX Runtime CPU backend."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from node.errors import InferenceError
from node.infer.engine import BackendStatus


def status() -> BackendStatus:
    try:
        import onnxruntime
    except ImportError:
        return BackendStatus("onnxruntime-cpu", False, "onnxruntime is not installed: pip install onnxruntime")
    return BackendStatus("onnxruntime-cpu", True, f"onnxruntime {onnxruntime.__version__}")


class OnnxRuntimeEngine:
    """One ONNX model in an ONNX Runtime CPU session."""

    def __init__(self, model_file: Path, *, input_name: str, output_name: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No arena, no pre-planned memory pattern: tensors are freed as the graph runs and the memory
        # goes back to the system after each run. A worker then holds only the volume between jobs, and
        # a large single-block model (the liver U-Net: ~2 GB of activations) peaks ~100 MB lower; the
        # cost (allocation per tensor) is not measurable beside convolutions of this size.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        try:
            self._session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"ONNX Runtime cannot load {model_file}: {exc}") from exc
        names = [i.name for i in self._session.get_inputs()]
        if input_name not in names:
            raise InferenceError(f"{model_file.name} has no input named {input_name!r}; it has {names}")
        self.input_name = input_name
        self.output_name = output_name
        self.name = f"onnxruntime-cpu:{model_file.name}"

    def run(self, tiles: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self.output_name], {self.input_name: np.ascontiguousarray(tiles, np.float32)})
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a batch of shape {tiles.shape}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)
