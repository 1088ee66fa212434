"""A deserialised TensorRT plan run with pycuda: buffers allocated once, copies overlapping compute.

Ownership is explicit (the Polygraphy/TensorRT-samples pattern): the engine owns two slots, each a
page-locked host input/output pair, a device input/output pair sized for the profile's maximum batch
and a copy stream; every enqueue goes to the one compute stream (TensorRT: one execution context,
one stream at a time). ``run`` splits the tiles into batches and alternates slots: batch i+1's
host→device copy and batch i−1's device→host copy run on the slots' copy streams while batch i
computes, ordered by events (input copied → compute → output copied). The GPU-resident pipeline
uses ``enqueue`` instead, on its own device buffers and stream, with no copies at all.

Every CUDA failure becomes an :class:`InferenceError` naming the step.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.errors import InferenceError
from node.infer.gpu.kernels import cuda_step

log = logging.getLogger(__name__)


class CudaContext:
    """The device's primary context (shared with TensorRT's runtime API calls), current while held.

    Popped and released at ``close`` or at interpreter exit (as pycuda.autoprimaryctx does): pycuda
    aborts the process when its context stack is not empty at module clean-up.
    """

    def __init__(self, index: int = 0) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        with cuda_step(f"opening GPU {index}"):
            cuda.init()
            self.device = cuda.Device(index)
            self._context = self.device.retain_primary_context()
            self._context.push()
        self._open = True
        atexit.register(self.close)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self._cuda.Context.pop()
            self._context.detach()
        except Exception as exc:  # at exit nothing can be done about it but say so
            log.warning("releasing the CUDA context failed: %s", exc)


@dataclass
class _Slot:
    host_in: np.ndarray
    host_out: np.ndarray
    device_in: Any
    device_out: Any
    stream: Any        # this slot's copy stream
    copied_in: Any     # event: the input is on the device
    computed: Any      # event: this slot's enqueue has finished on the GPU
    copied_out: Any    # event: this slot's output is on the host
    pending: slice | None = None  # which tiles of the current run its host_out holds


class TensorRTEngine:
    """One plan: ``run`` for numpy tiles (the Engine protocol), ``enqueue`` for device buffers
    (the DeviceEngine protocol)."""

    def __init__(self, plan: bytes, *, name: str, input_name: str, output_name: str, max_batch: int,
                 context: CudaContext, min_batch: int = 1) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        from node.infer.gpu.trt_build import make_logger

        self._slots: list[_Slot] = []
        self.name = name
        self.input_name = input_name
        self.output_name = output_name
        self.max_batch = max_batch
        self.min_batch = min_batch  # a plan built for a fixed batch runs smaller batches padded to it
        self._context = context
        self._logger = make_logger()
        with cuda_step(f"deserialising {name}"):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise InferenceError(f"TensorRT could not deserialise {name}: {'; '.join(self._logger.errors)}")
            self._exec = self._engine.create_execution_context()
            if self._exec is None:
                raise InferenceError(f"TensorRT could not create an execution context for {name} "
                                     f"(device memory?): {'; '.join(self._logger.errors)}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        for wanted in (input_name, output_name):
            if wanted not in names:
                raise InferenceError(f"{name}: the plan has no tensor {wanted!r}; it has {names}")
        in_shape = tuple(self._engine.get_tensor_shape(input_name))
        self.tile_shape: tuple[int, int, int] = tuple(int(d) for d in in_shape[2:])  # type: ignore[assignment]
        if any(d < 0 for d in self.tile_shape):
            # Spatial dims dynamic: take them from the profile's max shape.
            _, _, max_shape = self._engine.get_tensor_profile_shape(input_name, 0)
            self.tile_shape = tuple(int(d) for d in max_shape[2:])  # type: ignore[assignment]
        with cuda_step(f"setting {name}'s input shape"):
            self._set_shape(max_batch)
            out_shape = tuple(int(d) for d in self._exec.get_tensor_shape(output_name))
        self.channels = out_shape[1]
        self.output_shape: tuple[int, int, int] = out_shape[2:]  # type: ignore[assignment]
        for tensor in (input_name, output_name):
            dtype = trt.nptype(self._engine.get_tensor_dtype(tensor))
            if dtype != np.float32:
                raise InferenceError(f"{name}: tensor {tensor!r} is {np.dtype(dtype).name}; "
                                     "the node feeds and reads float32")
        self._resident: Any = None
        self._resident_error: str | None = None
        in_count = max_batch * int(np.prod(self.tile_shape))
        out_count = max_batch * self.channels * int(np.prod(self.output_shape))
        with cuda_step(f"allocating {name}'s buffers ({(in_count + out_count) * 8 / 2**20:,.0f} MiB)"):
            self._slots = [
                _Slot(
                    host_in=cuda.pagelocked_empty(in_count, np.float32),
                    host_out=cuda.pagelocked_empty(out_count, np.float32),
                    device_in=cuda.mem_alloc(in_count * 4),
                    device_out=cuda.mem_alloc(out_count * 4),
                    stream=cuda.Stream(),
                    copied_in=cuda.Event(),
                    computed=cuda.Event(),
                    copied_out=cuda.Event(),
                )
                for _ in range(2)
            ]
            self._compute = cuda.Stream()

    def _set_shape(self, batch: int) -> None:
        if not self._exec.set_input_shape(self.input_name, (batch, 1, *self.tile_shape)):
            raise InferenceError(f"{self.name}: TensorRT refused the input shape {(batch, 1, *self.tile_shape)}: "
                                 f"{'; '.join(self._logger.errors) or 'outside the plan profile'}")

    # ----------------------------------------------------------------------------- DeviceEngine
    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: Any) -> None:
        if not 1 <= batch <= self.max_batch:
            raise InferenceError(f"{self.name}: batch {batch} is outside the plan's profile (1..{self.max_batch})")
        batch = max(batch, self.min_batch)  # the tail tiles of the buffers (sized for max_batch) are ignored
        with cuda_step(f"enqueueing {self.name} on a batch of {batch}"):
            self._set_shape(batch)
            for tensor, ptr in ((self.input_name, input_ptr), (self.output_name, output_ptr)):
                if not self._exec.set_tensor_address(tensor, int(ptr)):
                    raise InferenceError(f"{self.name}: TensorRT refused the address of {tensor!r}")
            if not self._exec.execute_async_v3(stream.handle):
                raise InferenceError(f"{self.name}: execute_async_v3 refused the batch: "
                                     f"{'; '.join(self._logger.errors)}")

    # ----------------------------------------------------------------------------------- Engine
    def run(self, tiles: np.ndarray) -> np.ndarray:
        """(N, 1, *tile_shape) float32 → (N, channels, *output_shape) float32, double-buffered."""
        import pycuda.driver as cuda

        if tuple(tiles.shape[1:]) != (1, *self.tile_shape):
            raise InferenceError(f"{self.name}: tiles of shape {tiles.shape[1:]}; "
                                 f"the plan takes (1, {self.tile_shape})")
        n = tiles.shape[0]
        sample_in = int(np.prod(self.tile_shape))
        sample_out = self.channels * int(np.prod(self.output_shape))
        result = np.empty((n, self.channels, *self.output_shape), dtype=np.float32)
        for slot in self._slots:  # what an earlier run that failed half-way left behind
            slot.stream.synchronize()
            slot.pending = None
        with cuda_step(f"running {self.name} on {n} tile(s)"):
            for i, start in enumerate(range(0, n, self.max_batch)):
                batch = min(self.max_batch, n - start)
                slot = self._slots[i % 2]
                self._collect(slot, result, sample_out)  # this slot's previous batch, if any
                slot.host_in[: batch * sample_in] = np.ascontiguousarray(tiles[start : start + batch],
                                                                         np.float32).ravel()
                cuda.memcpy_htod_async(slot.device_in, slot.host_in[: batch * sample_in], slot.stream)
                slot.copied_in.record(slot.stream)
                self._compute.wait_for_event(slot.copied_in)
                self.enqueue(int(slot.device_in), int(slot.device_out), batch, self._compute)
                slot.computed.record(self._compute)
                slot.stream.wait_for_event(slot.computed)
                cuda.memcpy_dtoh_async(slot.host_out[: batch * sample_out], slot.device_out, slot.stream)
                slot.copied_out.record(slot.stream)
                slot.pending = slice(start, start + batch)
            for slot in self._slots:
                self._collect(slot, result, sample_out)
        return result

    @staticmethod
    def _collect(slot: _Slot, result: np.ndarray, sample_out: int) -> None:
        if slot.pending is None:
            return
        slot.copied_out.synchronize()
        count = slot.pending.stop - slot.pending.start
        result[slot.pending] = slot.host_out[: count * sample_out].reshape(count, *result.shape[1:])
        slot.pending = None

    # ------------------------------------------------------------------------ GPU-resident
    def resident_pipeline(self) -> Any:
        """The GPU-resident pre/post-processing around this engine (node.infer.gpu.resident), made once; None
        when its kernels cannot be loaded here (then tiles go through host memory; said once)."""
        if self._resident is None and self._resident_error is None:
            from node.infer.gpu.resident import ResidentPipeline

            try:
                self._resident = ResidentPipeline(self)
            except InferenceError as exc:
                self._resident_error = str(exc)
                log.warning("%s: pre/post-processing stays on the CPU (the kernels cannot be loaded: %s)",
                            self.name, exc)
        return self._resident

    @property
    def device_memory_bytes(self) -> int:
        size = getattr(self._engine, "device_memory_size_v2", None)
        return int(size if size is not None else 0)

    def close(self) -> None:
        if self._resident is not None:
            self._resident.close()
            self._resident = None
        for slot in getattr(self, "_slots", []):
            slot.device_in.free()
            slot.device_out.free()
        self._slots = []
        self._exec = None
        self._engine = None
