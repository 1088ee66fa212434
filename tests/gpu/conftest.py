"""GPU tests: collected everywhere, run only where pycuda can open an NVIDIA GPU; skipped with the reason
otherwise ("no NVIDIA GPU: pycuda is not installed", "pycuda cannot initialise CUDA: …")."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@functools.cache
def gpu_missing_reason() -> str | None:
    """None when pycuda can open GPU 0, else why not."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return f"no NVIDIA GPU: pycuda is not installed ({exc}; pip install 'dicom-seg-node[gpu]' on a GPU machine)"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error: no driver, no device, driver too old
        return f"pycuda cannot initialise CUDA: {exc}"
    if count == 0:
        return "no NVIDIA GPU: CUDA reports no device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = gpu_missing_reason() if any(HERE in Path(str(i.fspath)).parents for i in items) else None
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def cuda_context() -> Iterator[Any]:
    """GPU 0's primary context (the one TensorRT uses), current for the session."""
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        yield context
    finally:
        cuda.Context.synchronize()
        cuda.Context.pop()


@pytest.fixture(scope="session")
def nvcc_module(cuda_context: Any) -> Any:
    """kernels.cu compiled by pycuda's SourceModule (the loader's first choice)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: SourceModule cannot compile kernels.cu here (the PTX path is tested)")
    from pycuda.compiler import SourceModule

    from node.infer.gpu.kernels import KERNELS_CU

    return SourceModule(KERNELS_CU.read_text(), no_extern_c=True)


@pytest.fixture(scope="session")
def ptx_module(cuda_context: Any) -> Any:
    """The shipped kernels.ptx, JIT-compiled by the driver (the loader's fallback)."""
    import pycuda.driver as cuda

    from node.infer.gpu.kernels import KERNELS_PTX

    return cuda.module_from_buffer(KERNELS_PTX.read_bytes() + b"\0")


@pytest.fixture(scope="session", params=["nvcc", "ptx"])
def cuda_device(request: pytest.FixtureRequest) -> Any:
    """A CudaDevice on each way of loading the kernels."""
    from node.infer.gpu.kernels import CudaDevice

    return CudaDevice(request.getfixturevalue(f"{request.param}_module"))


class GpuMemory:
    """tests/harness/cuda_cpu/checks.Memory on the GPU: synchronous copies, buffers freed at teardown."""

    def __init__(self, device: Any) -> None:
        import pycuda.driver as cuda

        self.cuda = cuda
        self.device = device
        self.pointers: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr: int = self.device.alloc(nbytes)
        self.pointers.append(ptr)
        return ptr

    def put(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        self.cuda.memcpy_htod(ptr, array)
        return ptr

    def get(self, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        self.cuda.Context.synchronize()
        out = np.empty(tuple(shape), dtype=dtype)
        self.cuda.memcpy_dtoh(out, ptr)
        return out

    def new_stream(self) -> Any:
        return self.device.new_stream()

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None:
        self.device.zero(ptr, nbytes, stream)

    def free(self) -> None:
        self.cuda.Context.synchronize()
        for ptr in self.pointers:
            self.device.free(ptr)
        self.pointers.clear()


@pytest.fixture
def memory(cuda_device: Any) -> Iterator[GpuMemory]:
    mem = GpuMemory(cuda_device)
    yield mem
    mem.free()


@pytest.fixture
def kernels(cuda_device: Any) -> Any:
    from node.infer.gpu.kernels import Kernels

    return Kernels(cuda_device)
