"""A CPU stand-in for node.infer.gpu.kernels.CudaDevice: "device memory" is host memory, a launch is the
g++-compiled kernels.cu's serial loop. It lets node.infer.gpu.resident run unchanged without a GPU.

Checks what a GPU would not report clearly: every copy and memset must lie inside one allocation,
every launch and copy must be queued on a stream this device made, and fresh allocations are filled
with 0xFF bytes (NaN as float32) so that reading memory nobody wrote shows up in the results.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np


class CpuStream:
    def __init__(self) -> None:
        self.launches: list[str] = []


class CpuDevice:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.allocations: dict[int, np.ndarray] = {}
        self.streams: list[CpuStream] = []
        self.freed = 0

    def _check(self, ptr: int, nbytes: int, what: str) -> None:
        for start, array in self.allocations.items():
            if start <= ptr and ptr + nbytes <= start + array.nbytes:
                return
        raise AssertionError(f"{what}: [{ptr:#x}, +{nbytes}) is not inside one device allocation")

    def _stream(self, stream: Any) -> CpuStream:
        assert any(stream is s for s in self.streams), f"work queued on a stream this device did not make: {stream!r}"
        return stream

    def launch(self, kernel: str, grid: int, block: int, args: Sequence[int | float], stream: Any) -> None:
        self._stream(stream).launches.append(kernel)
        for value in args:
            assert isinstance(value, (int, float, np.integer, np.floating)), f"{kernel}: argument {value!r}"
        getattr(self.lib, f"launch_{kernel}")(grid, block, *args)

    def new_stream(self) -> CpuStream:
        stream = CpuStream()
        self.streams.append(stream)
        return stream

    def alloc(self, nbytes: int) -> int:
        array = np.full(max(1, nbytes), 0xFF, dtype=np.uint8)
        ptr = array.ctypes.data
        self.allocations[ptr] = array
        return ptr

    def free(self, ptr: int) -> None:
        del self.allocations[ptr]
        self.freed += 1

    def host_array(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.empty(tuple(shape), dtype=dtype)

    def upload(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._stream(stream)
        assert src.flags.c_contiguous
        self._check(dst, src.nbytes, "upload")
        ctypes.memmove(dst, src.ctypes.data, src.nbytes)

    def download(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._stream(stream)
        assert dst.flags.c_contiguous
        self._check(src, dst.nbytes, "download")
        ctypes.memmove(dst.ctypes.data, src, dst.nbytes)

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None:
        self._stream(stream)
        self._check(ptr, nbytes, "zero")
        ctypes.memset(ptr, 0, nbytes)

    def synchronize(self, stream: Any) -> None:
        self._stream(stream)

    # --------------------------------------------------------------------- for the kernel tests
    def put(self, array: np.ndarray) -> int:
        """A device copy of ``array``."""
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)
        return ptr

    def view(self, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """The device memory at ``ptr`` as an array (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        self._check(ptr, count * dtype.itemsize, "view")
        buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(tuple(shape))

    def get(self, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A host copy of the device memory at ``ptr``."""
        return self.view(ptr, shape, dtype).copy()
