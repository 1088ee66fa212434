"""Stand-ins for ``tensorrt`` and ``pycuda.driver`` that run on the CPU, for exercising the node's own
logic around them (buffer slots, batching, event order, error sentences) where no GPU exists.

They implement only the calls node/infer/gpu/trt_engine.py makes, with the real names and argument
orders; "device memory" is host memory whose address is the pointer, copies are immediate, and the
"network" is a numpy function of the input. They say nothing about the real libraries' behaviour:
tests/gpu does, on a GPU.
"""

from __future__ import annotations

import ctypes
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class _Allocation:
    def __init__(self, nbytes: int, log: list[str]) -> None:
        self.buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.log = log

    def __int__(self) -> int:
        return int(self.buffer.ctypes.data)

    def free(self) -> None:
        self.log.append("free")


def _view(ptr: int, count: int) -> np.ndarray:
    return np.frombuffer(memoryview((ctypes.c_float * count).from_address(ptr)), dtype=np.float32)


def make_pycuda(log: list[str]) -> types.ModuleType:
    driver = types.ModuleType("pycuda.driver")

    class Stream:
        count = 0

        def __init__(self) -> None:
            Stream.count += 1
            self.handle = Stream.count

        def wait_for_event(self, event: Any) -> None:
            assert event.recorded, f"stream{self.handle} waits for {event.name}, which was never recorded"
            log.append(f"stream{self.handle} waits for {event.name}")

        def synchronize(self) -> None:
            log.append(f"stream{self.handle} synchronized")

    class Event:
        count = 0

        def __init__(self) -> None:
            Event.count += 1
            self.name = f"event{Event.count}"
            self.recorded = False

        def record(self, stream: Stream) -> None:
            self.recorded = True

        def synchronize(self) -> None:
            assert self.recorded, "synchronize on an event never recorded"

    def memcpy_htod_async(dest: _Allocation, src: np.ndarray, stream: Stream) -> None:
        raw = np.ascontiguousarray(src).view(np.uint8).ravel()
        dest.buffer[: raw.size] = raw
        log.append(f"htod {src.size} on stream{stream.handle}")

    def memcpy_dtoh_async(dest: np.ndarray, src: _Allocation, stream: Stream) -> None:
        dest.view(np.uint8).ravel()[:] = src.buffer[: dest.nbytes]
        log.append(f"dtoh {dest.size} on stream{stream.handle}")

    class _Context:
        def push(self) -> None:
            log.append("push")

        def detach(self) -> None:
            log.append("detach")

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def retain_primary_context(self) -> _Context:
            return _Context()

    class Context:
        @staticmethod
        def pop() -> None:
            log.append("pop")

    driver.init = lambda: None  # type: ignore[attr-defined]
    driver.Device = Device  # type: ignore[attr-defined]
    driver.Context = Context  # type: ignore[attr-defined]
    driver.Stream = Stream  # type: ignore[attr-defined]
    driver.Event = Event  # type: ignore[attr-defined]
    driver.pagelocked_empty = lambda count, dtype: np.zeros(count, dtype)  # type: ignore[attr-defined]
    driver.mem_alloc = lambda nbytes: _Allocation(nbytes, log)  # type: ignore[attr-defined]
    driver.memcpy_htod_async = memcpy_htod_async  # type: ignore[attr-defined]
    driver.memcpy_dtoh_async = memcpy_dtoh_async  # type: ignore[attr-defined]
    return driver


def make_tensorrt(network: Callable[[np.ndarray], np.ndarray], tile: tuple[int, ...], channels: int,
                  output_shape: tuple[int, ...], log: list[str]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"  # type: ignore[attr-defined]

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class TensorIOMode:
        INPUT, OUTPUT = 0, 1

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            batch = self.shapes["image"][0]
            return (batch, channels, *output_shape)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            batch = self.shapes["image"][0]
            n_in = batch * int(np.prod(tile))
            x = _view(self.addresses["image"], n_in).reshape(batch, 1, *tile)
            y = network(x.copy()).astype(np.float32)
            _view(self.addresses["probabilities"], y.size)[:] = y.ravel()
            log.append(f"execute batch {batch} on stream{stream_handle}")
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 1 << 20

        def get_tensor_name(self, i: int) -> str:
            return ["image", "probabilities"][i]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 1, *tile) if name == "image" else (-1, channels, *output_shape)

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if plan == b"PLAN" else None

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32 if dtype == "float32" else np.float16  # type: ignore[attr-defined]
    return trt


@contextmanager
def installed(trt: types.ModuleType, driver: types.ModuleType) -> Iterator[None]:
    """Put the stand-ins in sys.modules for the duration (and take them out again)."""
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("tensorrt", "pycuda", "pycuda.driver")}
    sys.modules.update({"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": driver})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
