"""The registry of engine backends, and what ``engines.backend`` selects from it.

Adding a backend is one module (a class with the :class:`~node.infer.backends.base.Backend` shape)
plus one line in :data:`BACKENDS`, in the place it takes in ``"auto"``'s order of preference.
"""

from __future__ import annotations

from node.errors import InferenceError
from node.infer.backends.base import Backend
from node.infer.backends.cuda import CudaBackend
from node.infer.backends.onnxrt import OnnxRuntimeBackend
from node.infer.backends.openvino import OpenVinoBackend
from node.infer.backends.tensorrt import TensorRTBackend
from node.infer.backends.triton import TritonBackend
from node.infer.engine import BackendStatus
from node.model.enums import EngineBackend

#: Every backend, in ``"auto"``'s order of preference: the GPU first, then OpenVINO on the CPU (where
#: ``openvino`` is installed: BF16 on AMX / AVX-512 BF16 units), ONNX Runtime (which runs anywhere) last.
#: ONNX Runtime's CUDA provider comes after TensorRT: the GPU without TensorRT's libraries (onnxruntime-gpu).
BACKENDS: tuple[Backend, ...] = (TensorRTBackend(), CudaBackend(), OpenVinoBackend(), OnnxRuntimeBackend())

#: Backends only an operator names (never tried by ``"auto"``): a Triton server needs its ``[triton]`` url.
NAMED_ONLY: tuple[Backend, ...] = (TritonBackend(),)

#: Where ``"auto"`` goes when a worker cannot load its engines at all (a GPU fault that kills the process).
LAST_RESORT = EngineBackend.CPU


def backend(name: EngineBackend) -> Backend:
    """The registered backend called ``name`` (not ``AUTO``, which is a preference, not a backend)."""
    for b in (*BACKENDS, *NAMED_ONLY):
        if b.name is name:
            return b
    raise InferenceError(f"engines.backend {str(name)!r} is not a registered backend; registered: "
                         f"{', '.join(str(b.name) for b in (*BACKENDS, *NAMED_ONLY))}")


def candidates(choice: EngineBackend) -> tuple[Backend, ...]:
    """The backends to try, in order, for ``engines.backend = choice``."""
    return BACKENDS if choice is EngineBackend.AUTO else (backend(choice),)


def is_strict(choice: EngineBackend) -> bool:
    """True when an engine that cannot be loaded under ``choice`` must stop the service."""
    return choice is not EngineBackend.AUTO and backend(choice).strict


def statuses() -> list[BackendStatus]:
    """Each backend's availability here, in order of preference."""
    return [b.status() for b in (*BACKENDS, *NAMED_ONLY)]
