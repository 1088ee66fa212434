"""ONNX → TensorRT plan with the TensorRT Python API (10.12 and later; written for 11).

TensorRT 11 builds strongly typed networks only (its FP16/BF16 builder flags are gone): the
precision is in the ONNX graph, so FP16/BF16 plans are built from the graph that
:func:`node.infer.gpu.mixed_precision.to_mixed_precision` makes (float32 inputs and outputs kept). On
10.12–10.x the STRONGLY_TYPED creation flag asks for the same behaviour. Explicit batch (the only
mode since 10.0), one optimisation profile per dynamic input, the workspace bounded, and a timing
cache reused across builds on the same GPU.
"""

from __future__ import annotations

import logging
from typing import Any

from node.errors import InferenceError
from node.infer.gpu.plan_cache import PlanKey

log = logging.getLogger(__name__)

#: Oldest TensorRT whose strongly typed networks this module relies on.
MIN_TENSORRT = (10, 12)


def tensorrt_version() -> str:
    """The installed TensorRT's version; raises InferenceError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise InferenceError(
            f"TensorRT is not installed ({exc}): pip install '.[gpu]' (the tensorrt wheels come from NVIDIA's "
            "index, https://pypi.nvidia.com, which pip reaches by itself on a machine with internet access)"
        ) from exc
    version = str(trt.__version__)
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_TENSORRT:
        raise InferenceError(f"TensorRT {version} is too old: the node needs {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or "
                             "later (strongly typed networks); pip install --upgrade tensorrt")
    return version


def make_logger() -> Any:
    """A tensorrt.ILogger that forwards TensorRT's messages to Python logging and keeps the errors."""
    import tensorrt as trt

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def build_plan(onnx_model: bytes, key: PlanKey, timing_cache: bytes | None, *, workspace_bytes: int,
               model_path: str | None = None) -> tuple[bytes, bytes]:
    """Build ``onnx_model`` (already at the key's precision) into a serialised plan.

    Returns (plan, timing cache). Raises :class:`InferenceError` with the parser's or builder's
    messages on failure.
    """
    import tensorrt as trt

    logger = make_logger()
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)  # required on 10.x, ignored (always on) on 11.x
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # The model's own path lets the parser find weights stored beside it (ONNX external data).
    if not (parser.parse(onnx_model, model_path) if model_path else parser.parse(onnx_model)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InferenceError(f"TensorRT's ONNX parser rejected {key.bundle}'s model: "
                             f"{'; '.join(errors) or logger.errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache or b"")
    if cache is None or not config.set_timing_cache(cache, False):
        # A damaged cache, or one from another GPU/version: start an empty one rather than trust it.
        log.warning("the timing cache for %s was not accepted; building with an empty one", key.gpu_name)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    profiles = {p.name: p for p in key.profiles}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        wanted = profiles.get(tensor.name)
        if wanted is None:
            if any(d < 0 for d in tensor.shape):
                raise InferenceError(f"{key.bundle}: input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} "
                                     "and no optimisation profile")
            continue
        profile.set_shape(tensor.name, wanted.min_shape, wanted.opt_shape, wanted.max_shape)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InferenceError(f"TensorRT could not build {key.bundle}'s plan: "
                             f"{'; '.join(logger.errors) or 'see the log'}")
    return bytes(serialized), bytes(cache.serialize())


def merge_timing_caches(on_disk: bytes, ours: bytes) -> bytes:
    """Combine two serialised timing caches (another builder's and ours) into one."""
    import tensorrt as trt

    builder = trt.Builder(make_logger())
    config = builder.create_builder_config()
    merged = config.create_timing_cache(on_disk)
    if merged is None or not merged.combine(config.create_timing_cache(ours), True):
        return ours  # the file on disk was damaged or foreign: ours replaces it
    return bytes(merged.serialize())
