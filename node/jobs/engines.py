"""Which engine runs each bundle in this process: TensorRT on the GPU, or ONNX Runtime on the CPU.

Under ``engines.backend = "auto"`` the GPU path is tried first; when it cannot run (no GPU, no
TensorRT or pycuda, a plan that fails to build, too little memory) the bundle runs on ONNX Runtime
and the reason is logged once per process, not once per job. Under ``"tensorrt"`` the same failure
is an error: the operator asked for the GPU. Under ``"cpu"`` the GPU is never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from node.config import NodeConfig
from node.errors import InferenceError
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.engine import Engine
from node.model.bundle import Bundle

if TYPE_CHECKING:
    from node.infer.gpu.backend import GpuSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEngine:
    engine: Engine | None  # None for a built-in (rule-based) algorithm
    description: str       # for the log and the readiness report: backend, precision, where the plan came from


class EngineFactory:
    """Makes and keeps one engine per bundle; opens the GPU at most once."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self._gpu: GpuSession | None = None
        self._gpu_error: str | None = None
        self._logged: set[str] = set()
        self._engines: dict[str, LoadedEngine] = {}

    def get(self, bundle: Bundle) -> LoadedEngine:
        if bundle.id not in self._engines:
            self._engines[bundle.id] = self._make(bundle)
        return self._engines[bundle.id]

    def close(self) -> None:
        """Release the engines and the GPU (a worker's last act)."""
        for loaded in self._engines.values():
            close = getattr(loaded.engine, "close", None)
            if close is not None:
                close()
        self._engines.clear()
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def _gpu_session(self) -> GpuSession:
        if self._gpu is None and self._gpu_error is None:
            from node.infer.gpu.backend import GpuSession

            try:
                self._gpu = GpuSession(self.cfg.gpu_index)
            except InferenceError as exc:
                self._gpu_error = str(exc)
        if self._gpu is None:
            raise InferenceError(self._gpu_error or "the GPU could not be opened")
        return self._gpu

    def _make(self, bundle: Bundle) -> LoadedEngine:
        if bundle.model_file is None:
            return LoadedEngine(None, "built-in algorithm (CPU)")
        if self.cfg.engine_backend in ("auto", "tensorrt"):
            try:
                gpu_engine, plan, cached = self._gpu_session().engine(bundle, self.cfg.state_dir)
                origin = f"built in {cached.build_seconds:.0f} s" if cached.built else "from the plan cache"
                return LoadedEngine(gpu_engine,
                                    f"TensorRT {plan.precision.precision.value.upper()} on {plan.gpu.name}, "
                                    f"batch ≤ {plan.sizing.max_batch}, plan {origin}")
            except InferenceError as exc:
                if self.cfg.engine_backend == "tensorrt":
                    raise InferenceError(f"bundle {bundle.name}: engines.backend is 'tensorrt' but {exc}") from exc
                self._note_fallback(str(exc))
        cpu_engine = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                                       threads=self.cfg.engine_threads)
        return LoadedEngine(cpu_engine, "ONNX Runtime on the CPU")

    def _note_fallback(self, reason: str) -> None:
        if reason in self._logged:
            return
        self._logged.add(reason)
        log.warning("the GPU path is not available, so ONNX Runtime runs on the CPU: %s", reason)


def make_engine(bundle: Bundle, cfg: NodeConfig) -> Engine | None:
    """One bundle's engine under ``cfg`` (a fresh factory: for tools and tests that need just one)."""
    return EngineFactory(cfg).get(bundle).engine
