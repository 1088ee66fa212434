"""ONNX Runtime on the CPU: the backend that runs everywhere, and the reference the others are checked against."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from node.errors import InferenceError
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.backends.threads import heavy_step
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend, WindowMode


def status() -> BackendStatus:
    try:
        import onnxruntime
    except ImportError:
        return BackendStatus("onnxruntime-cpu", False, "onnxruntime is not installed: pip install onnxruntime")
    return BackendStatus("onnxruntime-cpu", True, f"onnxruntime {onnxruntime.__version__}")


class OnnxRuntimeEngine:
    """One ONNX model in an ONNX Runtime CPU session."""

    def __init__(self, model_file: Path, *, input_name: str, output_name: str, threads: int = 0,
                 memory_arena: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ``memory_arena``: ONNX Runtime's CPU arena, shrunk after each run (see ``run``). Measured on 2 cores
        # (one run each, peak RSS of the process): the liver's single 162x162x189 block needs it (without it
        # every tensor is a fresh mmap: 8.9 s of system time instead of 1.4 s, the same 2.1 GB peak); an
        # imported nnU-Net's 160x128x112 tile does not (peak 1.4 GB without it, 1.8-2.3 GB with it, of
        # which 0.5 GB stays held after the run; +1 s of system time on 19 s). So the session below keeps
        # it for single-block bundles only. No pre-planned memory pattern either way: it only adds to the
        # peak (3.0 GB on that nnU-Net tile).
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = memory_arena
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
        self._run_options = ort.RunOptions()
        if memory_arena:  # ONNX Runtime refuses to shrink an arena that is not there
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, tiles: np.ndarray) -> np.ndarray:
        try:
            feed = {self.input_name: np.ascontiguousarray(tiles, np.float32)}
            with heavy_step():  # one memory-heavy step at a time in the worker (node/infer/backends/threads.py)
                (out,) = self._session.run([self.output_name], feed, self._run_options)
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a batch of shape {tiles.shape}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


def uses_memory_arena(bundle: Bundle) -> bool:
    """Whether the bundle's ONNX Runtime session keeps a memory arena: for a single block, not for tiles
    (see :class:`OnnxRuntimeEngine`)."""
    return bundle.window.mode is WindowMode.SINGLE_BLOCK


class _OnnxRuntimeSession:
    def __init__(self, settings: BackendSettings) -> None:
        self.threads = settings.threads

    def engine(self, bundle: Bundle) -> LoadedEngine:
        assert bundle.model_file is not None  # built-in algorithms never reach a backend
        engine = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                                   threads=self.threads, memory_arena=uses_memory_arena(bundle))
        return LoadedEngine(engine, "ONNX Runtime on the CPU")

    def close(self) -> None:
        pass


class OnnxRuntimeBackend:
    """``engines.backend = "cpu"``, and the last resort of ``"auto"``."""

    name = EngineBackend.CPU
    label = "ONNX Runtime on the CPU"
    runs = "ONNX Runtime runs on the CPU"
    strict = False

    def status(self) -> BackendStatus:
        return status()

    def open(self, settings: BackendSettings) -> _OnnxRuntimeSession:
        found = status()
        if not found.available:
            raise InferenceError(found.detail)
        return _OnnxRuntimeSession(settings)
