"""The GPU backend's work: whether it can run here, and a TensorRT engine for a bundle (built or cached).

``GpuSession.engine`` is the one entry point the worker uses (through the registered TensorRT
backend, :mod:`node.infer.backends.tensorrt`): it reads the GPU's profile, decides the precision and
the tile batch (:mod:`node.infer.gpu.plan`), converts the ONNX model to that precision
(:mod:`node.infer.gpu.mixed_precision`), gets the plan from the cache or builds it
(:mod:`node.infer.gpu.plan_cache`, :mod:`node.infer.gpu.trt_build`) and deserialises it
(:mod:`node.infer.gpu.trt_engine`). Any failure is an :class:`InferenceError` whose message says what
is missing or what failed; under ``engines.backend = "auto"`` the loader goes on to the next backend
with that message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.errors import InferenceError
from node.infer.engine import BackendStatus
from node.infer.gpu.plan import (
    BuildSizing,
    Precision,
    PrecisionChoice,
    choose_precision,
    size_batches,
    tile_batch_for_patch,
)
from node.infer.gpu.plan_cache import CachedPlan, PlanCache, PlanKey, TensorProfile
from node.infer.gpu.profile import GpuProfile, read_profile
from node.infer.model_cost import ModelCost, model_cost
from node.model.bundle import Bundle
from node.model.enums import WindowMode

if TYPE_CHECKING:
    from node.infer.gpu.trt_engine import TensorRTEngine

log = logging.getLogger(__name__)


def tensorrt_status() -> BackendStatus:
    from node.infer.gpu.trt_build import tensorrt_version

    try:
        return BackendStatus("tensorrt", True, f"TensorRT {tensorrt_version()}")
    except InferenceError as exc:
        return BackendStatus("tensorrt", False, str(exc))


def pycuda_status() -> BackendStatus:
    try:
        import pycuda
    except ImportError as exc:
        return BackendStatus("pycuda", False, f"pycuda is not installed ({exc}): pip install '.[gpu]'")
    try:
        import pycuda.driver as cuda

        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # ImportError of libcuda, pycuda.driver.Error
        return BackendStatus("pycuda", False, f"pycuda {pycuda.VERSION_TEXT} cannot initialise CUDA: {exc} "
                                              "(is the NVIDIA driver installed and a GPU present?)")
    if count == 0:
        return BackendStatus("pycuda", False, "the NVIDIA driver reports no GPU")
    return BackendStatus("pycuda", True, f"pycuda {pycuda.VERSION_TEXT}, {count} GPU(s)")


def nvml_status() -> BackendStatus:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return BackendStatus("nvml", False, "nvidia-ml-py is not installed (optional: fills clocks the driver does not "
                                            "report): pip install '.[gpu]'")
    return BackendStatus("nvml", True, "nvidia-ml-py installed")


# ------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class ModelInput:
    """The shape the engine is built for: one sample (batch 1) and whether the batch is fixed."""

    sample_shape: tuple[int, ...]
    fixed_batch: int | None


def model_input(bundle: Bundle) -> ModelInput:
    """The concrete input of one sample: the sliding window's patch or the single block, and the
    ONNX input's batch dimension (fixed when it is a number)."""
    import onnx

    if bundle.model_file is None:
        raise InferenceError(f"bundle {bundle.name} is a built-in algorithm; it has no network to build")
    model = onnx.load(str(bundle.model_file), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    if bundle.input_name not in inputs:
        raise InferenceError(f"bundle {bundle.name}: {bundle.model_file.name} has no input {bundle.input_name!r}")
    dims = inputs[bundle.input_name].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    if bundle.window.mode is WindowMode.SINGLE_BLOCK:
        batch = 1  # one block per series
    return ModelInput((1, 1, *bundle.window.network_input), batch)


@dataclass(frozen=True)
class EnginePlan:
    """Everything decided for one bundle on one GPU, before anything is built."""

    bundle: Bundle
    gpu: GpuProfile
    cost: ModelCost
    precision: PrecisionChoice
    sizing: BuildSizing
    key: PlanKey


def plan_engine(bundle: Bundle, gpu: GpuProfile, tensorrt_version: str) -> EnginePlan:
    """Decide precision, profile and cache key for ``bundle`` on ``gpu`` (no GPU or TensorRT needed)."""
    if bundle.model_file is None:
        raise InferenceError(f"bundle {bundle.name} is a built-in algorithm; it has no network to build")
    shape = model_input(bundle)
    cost = model_cost(bundle.model_file, shape.sample_shape)
    choice = choose_precision(gpu, bundle.gpu.precision)
    # The tile batch on the GPU comes from the patch size and the free memory, not from the manifest's
    # [window] batch (the CPU's; an imported nnU-Net bundle says 1): the resident pipeline and
    # TensorRTEngine.run run full batches of max_batch tiles, so that is also the profile's optimum.
    cap = tile_batch_for_patch(shape.sample_shape[2:])
    sizing = size_batches(gpu, cost, choice.precision, batch_dim_fixed=shape.fixed_batch, preferred_batch=cap,
                          name=f"bundle {bundle.name}", patch_cap=cap)
    if bundle.gpu.max_batch and sizing.max_batch > bundle.gpu.max_batch:
        capped = bundle.gpu.max_batch
        sizing = BuildSizing(min(sizing.min_batch, capped), min(sizing.opt_batch, capped), capped,
                             sizing.workspace_bytes, sizing.per_sample_bytes, sizing.fixed_bytes, sizing.budget_bytes,
                             sizing.reason + f"; capped at {capped} by the bundle's [gpu] max_batch")
    spatial = shape.sample_shape[1:]
    profile = TensorProfile(bundle.input_name, (sizing.min_batch, *spatial), (sizing.opt_batch, *spatial),
                            (sizing.max_batch, *spatial))
    key = PlanKey(
        bundle=bundle.id,
        onnx_sha256=bundle.model_sha256,
        tensorrt_version=tensorrt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.cc_text,
        precision=choice.precision.value,
        profiles=(profile,),
    )
    return EnginePlan(bundle, gpu, cost, choice, sizing, key)


def onnx_at_precision(bundle: Bundle, precision: Precision) -> bytes:
    """The bundle's ONNX model as bytes, converted to ``precision`` (FP32: the file as it is)."""
    assert bundle.model_file is not None
    if precision is Precision.FP32:
        return bundle.model_file.read_bytes()
    import onnx

    from node.infer.gpu.mixed_precision import to_mixed_precision

    model = to_mixed_precision(onnx.load(str(bundle.model_file)), precision.value)
    return bytes(model.SerializeToString())


def ensure_plan(plan: EnginePlan, cache: PlanCache, *, force: bool = False) -> CachedPlan:
    """The serialised plan for ``plan.key``: from the cache, or built now (minutes for a 3D U-Net)."""
    from node.infer.gpu.trt_build import build_plan

    def build(timing: bytes | None) -> tuple[bytes, bytes]:
        log.info("building the TensorRT plan for %s on %s: %s; batch %d..%d (%s); workspace %d MiB",
                 plan.bundle.id, plan.gpu.name, plan.precision.reason, plan.sizing.min_batch, plan.sizing.max_batch,
                 plan.sizing.reason, plan.sizing.workspace_bytes >> 20)
        return build_plan(onnx_at_precision(plan.bundle, plan.precision.precision), plan.key, timing,
                          workspace_bytes=plan.sizing.workspace_bytes, model_path=str(plan.bundle.model_file))

    return cache.get_or_build(plan.key, build, force=force)


def plan_cache_for(state_dir: Path) -> PlanCache:
    from node.infer.gpu.trt_build import merge_timing_caches

    return PlanCache(state_dir / "engines", merge_timing=merge_timing_caches)


class GpuSession:
    """The GPU a worker uses: its context and profile, opened once per process."""

    def __init__(self, index: int = 0) -> None:
        from node.infer.gpu.trt_build import tensorrt_version
        from node.infer.gpu.trt_engine import CudaContext

        self.tensorrt_version = tensorrt_version()  # first: says how to install it when missing
        status = pycuda_status()
        if not status.available:
            raise InferenceError(status.detail)
        self.profile = read_profile(index)
        self.context = CudaContext(index)

    def close(self) -> None:
        """Release the CUDA context (engines made in this session must not be used afterwards)."""
        self.context.close()

    def engine(self, bundle: Bundle, state_dir: Path) -> tuple[TensorRTEngine, EnginePlan, CachedPlan]:
        """A deserialised TensorRTEngine for ``bundle`` (built first when the cache has no plan)."""
        from node.infer.gpu.trt_engine import TensorRTEngine

        plan = plan_engine(bundle, self.profile, self.tensorrt_version)
        cache = plan_cache_for(state_dir)
        cached = ensure_plan(plan, cache)
        engine = TensorRTEngine(cached.plan, name=f"tensorrt-{plan.precision.precision.value}:{bundle.name}",
                                input_name=bundle.input_name, output_name=bundle.output_name,
                                max_batch=plan.sizing.max_batch, min_batch=plan.sizing.min_batch, context=self.context)
        if cached.built:
            from node.infer.backends.onnxrt import OnnxRuntimeEngine
            from node.infer.gpu.check import verify_against_reference

            assert bundle.model_file is not None
            reference = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name,
                                          output_name=bundle.output_name)
            try:
                summary = verify_against_reference(bundle, engine, reference, plan.precision.precision.value.upper())
            except InferenceError:
                engine.close()
                cache.discard(plan.key)  # never reused; the next start builds and checks again
                raise
            log.info("the new plan of %s agrees with ONNX Runtime: %s", bundle.id, summary)
        return engine, plan, cached
