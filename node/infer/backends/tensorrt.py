"""TensorRT on an NVIDIA GPU: plans built for the GPU that is installed (node/infer/gpu does the work).

Nothing of TensorRT, pycuda or the GPU code is imported until the backend is asked for its status or
opened, so a CPU-only install never needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend

if TYPE_CHECKING:
    from node.infer.gpu.backend import GpuSession


class _TensorRTSession:
    def __init__(self, gpu: GpuSession, settings: BackendSettings) -> None:
        self.gpu = gpu
        self.state_dir = settings.state_dir

    def engine(self, bundle: Bundle) -> LoadedEngine:
        engine, plan, cached = self.gpu.engine(bundle, self.state_dir)
        origin = f"built in {cached.build_seconds:.0f} s" if cached.built else "from the plan cache"
        return LoadedEngine(engine, f"TensorRT {plan.precision.precision.value.upper()} on {plan.gpu.name}, "
                                    f"batch ≤ {plan.sizing.max_batch}, plan {origin}")

    def close(self) -> None:
        self.gpu.close()


class TensorRTBackend:
    """``engines.backend = "tensorrt"``, and the first choice of ``"auto"``."""

    name = EngineBackend.TENSORRT
    label = "the GPU path"
    runs = "TensorRT runs on the GPU"
    strict = True

    def status(self) -> BackendStatus:
        from node.infer.gpu.backend import pycuda_status, tensorrt_status

        trt = tensorrt_status()
        for found in (trt, pycuda_status()):
            if not found.available:
                return BackendStatus("tensorrt", False, found.detail)
        return trt

    def open(self, settings: BackendSettings) -> _TensorRTSession:
        from node.infer.gpu.backend import GpuSession

        return _TensorRTSession(GpuSession(settings.gpu_index), settings)
