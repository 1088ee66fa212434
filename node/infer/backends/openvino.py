"""OpenVINO on the CPU: the bundle's ONNX compiled for this CPU, in BF16 where it has AMX or AVX-512 BF16.

ONNX Runtime's CPU provider runs these 3D convolutions in FP32 on AVX-512/AVX2; OpenVINO's CPU plugin
(oneDNN) also uses the AMX tile units and AVX-512 BF16 dot products — the CPU twin of what TensorRT is
on the GPU. Per bundle the backend:

1. chooses the precision (node/infer/cpu/precision.py: ``[cpu] precision``; BF16 where a BF16 unit is
   present, else FP32) and makes the cache key (ONNX sha256, OpenVINO version, CPU model and flags,
   precision, input shape; node/infer/cpu/model_cache.py);
2. imports the compiled model from ``<state>/engines/openvino`` when it is there, else reads the ONNX,
   fixes its input shape (the sliding window's batch of patches, or the single block), compiles it
   with an explicit precision (OpenVINO's own default on a BF16 CPU is BF16), the latency hint and
   ``engines.threads``, and exports it there;
3. checks a freshly compiled BF16 model against ONNX Runtime FP32 (node/infer/cpu/agreement.py); one
   outside the bundle's tolerance is not used: the bundle runs FP32, the reason is logged when found,
   recorded in the cache (so ``engines doctor`` shows it and a restart does not check again) and named
   in the engine's description.

Nothing of OpenVINO is imported until the backend is asked for its status or opened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.errors import InferenceError
from node.infer.backends.base import BackendSettings, LoadedEngine
from node.infer.backends.threads import heavy_step
from node.infer.cpu.agreement import judge, reference_output
from node.infer.cpu.features import CpuInfo, read_cpu
from node.infer.cpu.model_cache import CachedModel, Check, CompiledKey, ModelCache
from node.infer.cpu.precision import CpuPrecision, CpuPrecisionChoice, choose_cpu_precision
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend, WindowMode

log = logging.getLogger(__name__)

INSTALL = "pip install openvino"
#: Where a model came from when its BF16 check has just failed.
REJECTED = "compiled and rejected"


def status() -> BackendStatus:
    try:
        import openvino
    except ImportError:
        return BackendStatus("openvino", False, f"openvino is not installed: {INSTALL}")
    return BackendStatus("openvino", True, f"OpenVINO {openvino.__version__.split('-')[0]}")


def openvino_core() -> Any:
    """An ``openvino.Core``; InferenceError saying how to install OpenVINO when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise InferenceError(f"openvino is not installed ({exc}): {INSTALL}") from exc
    return openvino.Core()


def offers_bf16(core: Any) -> bool:
    """True when OpenVINO's CPU plugin lists BF16 among its optimisation capabilities here."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


@dataclass(frozen=True)
class CpuModelPlan:
    """What is decided for one bundle on this CPU before anything is compiled."""

    bundle: Bundle
    choice: CpuPrecisionChoice
    input_shape: tuple[int, ...]

    def key(self, precision: CpuPrecision, cpu: CpuInfo, openvino_version: str) -> CompiledKey:
        return CompiledKey(bundle=self.bundle.id, onnx_sha256=self.bundle.model_sha256,
                           openvino_version=openvino_version, cpu_model=cpu.model, cpu_isa=cpu.isa,
                           precision=precision.value, input_shape=self.input_shape)


def input_shape(bundle: Bundle) -> tuple[int, ...]:
    """The shape the model is compiled for: (1, 1, *block) for a single block, else (batch, 1, *patch)."""
    batch = 1 if bundle.window.mode is WindowMode.SINGLE_BLOCK else max(1, bundle.window.batch)
    return (batch, 1, *bundle.window.network_input)


def plan_cpu_model(bundle: Bundle, cpu: CpuInfo, *, openvino_bf16: bool) -> CpuModelPlan:
    if bundle.model_file is None:
        raise InferenceError(f"bundle {bundle.name} is a built-in algorithm; it has no network to compile")
    return CpuModelPlan(bundle, choose_cpu_precision(cpu, bundle.cpu.precision, openvino_bf16=openvino_bf16),
                        input_shape(bundle))


def compile_properties(precision: CpuPrecision, threads: int) -> dict[str, Any]:
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision.openvino_type, "PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


class OpenVinoEngine:
    """One compiled model. ``run`` takes any batch: it is cut into the compiled batch (the last part
    padded with zeros, its padding dropped from the output). With ``release_after_run`` (a single-block
    model: one run per series) the activations are freed after each run, as ONNX Runtime's arena is
    shrunk, so a worker does not hold the liver block's 1.2 GB (BF16) or 2.4 GB (FP32) between jobs; the
    next run allocates them again. A sliding window's patch-sized activations are kept across its runs."""

    def __init__(self, compiled: Any, *, input_name: str, output_name: str, name: str,
                 release_after_run: bool = False) -> None:
        try:
            self._input = compiled.input(input_name)
            self._output = compiled.output(output_name)
        except RuntimeError as exc:
            names = [p.get_any_name() for p in (*compiled.inputs, *compiled.outputs)]
            raise InferenceError(f"{name}: the model has no input {input_name!r} or output {output_name!r}; "
                                 f"it has {names}") from exc
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.batch = int(self._input.get_shape()[0])
        self.name = name
        # CompiledModel.release_memory: OpenVINO 2024.3 and later.
        self._release = getattr(compiled, "release_memory", None) if release_after_run else None

    def run(self, tiles: np.ndarray) -> np.ndarray:
        with heavy_step():  # one memory-heavy step at a time in the worker (node/infer/backends/threads.py)
            return self._run(tiles)

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, np.float32)
        parts = []
        for start in range(0, tiles.shape[0], self.batch):
            part = tiles[start:start + self.batch]
            n = part.shape[0]
            if n < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - n, *part.shape[1:]), np.float32)])
            try:
                self._request.infer({self._input: part}, share_inputs=True)
            except Exception as exc:  # openvino raises its own types
                raise InferenceError(f"OpenVINO failed on a batch of shape {part.shape}: {exc}") from exc
            # The request reuses its output tensor: copy it out before the next part.
            parts.append(np.array(self._request.get_tensor(self._output).data[:n], dtype=np.float32))
        if self._release is not None:
            self._release()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def release_memory(self) -> None:
        """Free the activations once a volume's sliding window is done (node.infer.window.sliding_window calls
        it after its last batch), so they are not held while the probabilities go back to the native grid."""
        release = getattr(self._compiled, "release_memory", None)
        if release is not None:
            release()

    def close(self) -> None:
        self._request = None
        self._compiled = None


def compile_model(core: Any, bundle: Bundle, shape: tuple[int, ...], precision: CpuPrecision, threads: int) -> Any:
    """The bundle's ONNX compiled for this CPU at ``shape`` and ``precision``."""
    assert bundle.model_file is not None
    try:
        model = core.read_model(str(bundle.model_file))
        model.reshape({bundle.input_name: list(shape)})
        return core.compile_model(model, "CPU", compile_properties(precision, threads))
    except Exception as exc:  # openvino raises its own types
        raise InferenceError(f"OpenVINO cannot compile {bundle.model_file} for input {shape} at "
                             f"{precision.value.upper()}: {exc}") from exc


def engine_for(bundle: Bundle, compiled: Any, precision: CpuPrecision) -> OpenVinoEngine:
    """The engine the node runs for ``bundle`` on ``compiled`` (the bench and the accuracy benchmark too)."""
    return OpenVinoEngine(compiled, input_name=bundle.input_name, output_name=bundle.output_name,
                          name=f"openvino-{precision.value}:{bundle.name}",
                          release_after_run=bundle.window.mode is WindowMode.SINGLE_BLOCK)


def export(compiled: Any) -> bytes:
    blob = compiled.export_model()
    return bytes(blob.getvalue() if hasattr(blob, "getvalue") else blob)


class _OpenVinoSession:
    def __init__(self, settings: BackendSettings) -> None:
        import openvino

        self.core = openvino_core()
        self.version = openvino.get_version()
        self.cpu = read_cpu()
        self.bf16 = offers_bf16(self.core)
        self.threads = settings.threads
        self.cache = ModelCache(settings.state_dir)

    def engine(self, bundle: Bundle) -> LoadedEngine:
        plan = plan_cpu_model(bundle, self.cpu, openvino_bf16=self.bf16)
        precision = plan.choice.precision
        if precision is CpuPrecision.BF16:
            compiled, cached, origin = self._model(plan, CpuPrecision.BF16)
            if compiled is not None:
                assert cached.check is not None
                return LoadedEngine(self._engine(bundle, compiled, precision),
                                    f"OpenVINO BF16 on the CPU ({self.cpu.bf16_unit}), model {origin}; "
                                    f"agreement with ONNX Runtime {cached.check.summary}")
            assert cached.check is not None
            rejected = f"BF16 disagreed with ONNX Runtime FP32 when compiled ({cached.check.summary})"
            # A warning when the check has just failed; at later starts (from the cache) an info line.
            (log.warning if origin == REJECTED else log.info)("bundle %s runs OpenVINO FP32: %s", bundle.id, rejected)
            compiled, _, origin = self._model(plan, CpuPrecision.FP32)
            assert compiled is not None
            return LoadedEngine(self._engine(bundle, compiled, CpuPrecision.FP32),
                                f"OpenVINO FP32 on the CPU, model {origin}; {rejected}")
        compiled, _, origin = self._model(plan, CpuPrecision.FP32)
        assert compiled is not None
        return LoadedEngine(self._engine(bundle, compiled, precision),
                            f"OpenVINO FP32 on the CPU, model {origin} ({plan.choice.reason})")

    def _engine(self, bundle: Bundle, compiled: Any, precision: CpuPrecision) -> OpenVinoEngine:
        return engine_for(bundle, compiled, precision)

    def _model(self, plan: CpuModelPlan, precision: CpuPrecision) -> tuple[Any | None, CachedModel, str]:
        """(the compiled model, or None when BF16 failed its check; the cache record; where it came from)."""
        key = plan.key(precision, self.cpu, self.version)
        found = self.cache.lookup(key)
        if found is None:
            with self.cache.locked(key):
                found = self.cache.lookup(key)  # another worker may have compiled it while we waited
                if found is None:
                    return self._compile(plan, key, precision)
        if found.blob is None:
            return None, found, "from the model cache"
        try:
            compiled = self.core.import_model(found.blob, "CPU", compile_properties(precision, self.threads))
        except Exception as exc:  # openvino raises its own types
            log.warning("the cached OpenVINO model %s cannot be imported (%s); compiling it again", found.path, exc)
            with self.cache.locked(key):
                self.cache.discard(key)
                return self._compile(plan, key, precision)
        return compiled, found, "from the model cache"

    def _compile(self, plan: CpuModelPlan, key: CompiledKey,
                 precision: CpuPrecision) -> tuple[Any | None, CachedModel, str]:
        bundle = plan.bundle
        reference = reference_output(bundle, self.threads) if precision is CpuPrecision.BF16 else None
        started = time.monotonic()
        compiled = compile_model(self.core, bundle, plan.input_shape, precision, self.threads)
        seconds = time.monotonic() - started
        check: Check | None = None
        if reference is not None:
            tiles, expected = reference
            engine = self._engine(bundle, compiled, precision)
            verdict = judge(bundle, expected, engine.run(tiles))
            check = Check(verdict.passed, verdict.summary)
            if not verdict.passed:
                engine.close()
                return None, self.cache.store(key, None, check, seconds), REJECTED
            log.info("the BF16 model of %s agrees with ONNX Runtime: %s", bundle.id, verdict.summary)
        cached = self.cache.store(key, export(compiled), check, seconds)
        log.info("compiled the OpenVINO %s model of %s in %.1f s: %s", precision.value.upper(), bundle.id, seconds,
                 cached.path)
        return compiled, cached, f"compiled in {seconds:.1f} s"

    def close(self) -> None:
        pass


class OpenVinoBackend:
    """``engines.backend = "openvino"``, and ``"auto"``'s choice on a machine without a GPU."""

    name = EngineBackend.OPENVINO
    label = "OpenVINO on the CPU"
    runs = "OpenVINO runs on the CPU"
    #: Named explicitly, it is OpenVINO or nothing (as with TensorRT): a missing openvino stops the service.
    strict = True

    def status(self) -> BackendStatus:
        return status()

    def open(self, settings: BackendSettings) -> _OpenVinoSession:
        found = status()
        if not found.available:
            raise InferenceError(found.detail)
        return _OpenVinoSession(settings)
