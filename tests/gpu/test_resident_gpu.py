"""The GPU-resident pipeline (node.infer.gpu.resident) on a real GPU against the CPU path: segment._sliding
and block.py's single-block steps, with the same network as a numpy Engine there and as a DeviceEngine
here: a CUDA kernel (compiled by pycuda, needs nvcc) or, without nvcc, numpy behind a device→host→device
round trip on the pipeline's stream. The network (tests/harness/cuda_cpu/engines.py) uses only float32
adds, multiplies and comparisons, written with __fadd_rn/__fmul_rn in the kernel, so both sides see
bitwise the same probabilities; tolerances as in test_kernels_gpu.py (labels ≤ 1 in 10⁴ differing),
plus one bitwise check of the design's promise.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest

from tests.harness.cuda_cpu import checks
from tests.harness.cuda_cpu.engines import hard_sigmoid_probabilities, ramp

pytestmark = pytest.mark.gpu
Shape = tuple[int, int, int]

ENGINE_CU = r"""
extern "C" __global__ void hard_sigmoid(const float* __restrict__ x, const float* __restrict__ ramp,
                                        float* __restrict__ out, int batch, int channels,
                                        int d, int h, int w, int od, int oh, int ow) {
    // out[b, c, z, y, x] for the output voxel (z, y, x) = tile voxel (z + md, y + mh, x + mw)
    const long long out_tile = (long long)od * oh * ow, tile = (long long)d * h * w;
    const int md = (d - od) / 2, mh = (h - oh) / 2, mw = (w - ow) / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < batch * out_tile;
         i += (long long)blockDim.x * gridDim.x) {
        const long long b = i / out_tile, r = i - b * out_tile;
        const int z = (int)(r / ((long long)oh * ow)), y = (int)(r / ow % oh), xx = (int)(r % ow);
        const long long v = ((long long)(z + md) * h + (y + mh)) * w + (xx + mw);
        const float xv = x[b * tile + v], rv = ramp[v];
        const float p1 = fminf(fmaxf(__fadd_rn(__fadd_rn(__fmul_rn(xv, 0.25f), 0.5f), rv), 0.0f), 1.0f);
        float* o = out + b * channels * out_tile + r;
        o[0] = __fsub_rn(1.0f, p1);
        o[out_tile] = p1;
        if (channels == 3)
            o[2 * out_tile] = fminf(fmaxf(__fadd_rn(__fadd_rn(__fmul_rn(xv, 0.25f), -0.25f), rv), 0.0f), 1.0f);
    }
}
"""


class _Engine:
    """DeviceEngine protocol attributes, and what it was given (checked by checks.check_resident_*)."""

    def __init__(self, tile: Shape, channels: int, max_batch: int, output_shape: Shape) -> None:
        self.name = f"hard-sigmoid-{channels}"
        self.tile_shape = tile
        self.output_shape = output_shape
        self.channels = channels
        self.max_batch = max_batch
        self.batches: list[int] = []
        self.streams: list[Any] = []


class KernelEngine(_Engine):
    """The test network as a CUDA kernel on the pipeline's stream."""

    _function: Any = None

    def __init__(self, tile: Shape, channels: int, max_batch: int, output_shape: Shape) -> None:
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        super().__init__(tile, channels, max_batch, output_shape)
        if KernelEngine._function is None:
            KernelEngine._function = SourceModule(ENGINE_CU, no_extern_c=True).get_function("hard_sigmoid")
            KernelEngine._function.prepare("PPPiiiiiiii")
        r = ramp(tile)
        self._ramp = cuda.mem_alloc(r.nbytes)
        cuda.memcpy_htod(self._ramp, r)

    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: object) -> None:
        assert 1 <= batch <= self.max_batch
        self.batches.append(batch)
        self.streams.append(stream)
        count = batch * int(np.prod(self.output_shape))
        self._function.prepared_async_call(((count + 255) // 256, 1), (256, 1, 1), stream, input_ptr, int(self._ramp),
                                           output_ptr, batch, self.channels, *self.tile_shape, *self.output_shape)


class RoundTripEngine(_Engine):
    """The test network in numpy, the tiles fetched from and the probabilities put back to the GPU."""

    def enqueue(self, input_ptr: int, output_ptr: int, batch: int, stream: Any) -> None:
        import pycuda.driver as cuda

        assert 1 <= batch <= self.max_batch
        self.batches.append(batch)
        self.streams.append(stream)
        tiles = np.empty((batch, 1, *self.tile_shape), dtype=np.float32)
        stream.synchronize()  # the tiles' extraction, queued before, has run
        cuda.memcpy_dtoh(tiles, input_ptr)
        probs = hard_sigmoid_probabilities(tiles, self.channels, ramp(self.tile_shape), self.output_shape)
        cuda.memcpy_htod(output_ptr, probs)  # synchronous: done before anything queued after this call


@pytest.fixture(params=["kernel", "round-trip"])
def make_engine(request: pytest.FixtureRequest, cuda_context: Any) -> Any:
    if request.param == "kernel":
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc is not on PATH: the test network's CUDA kernel cannot be compiled (round-trip runs)")
        return KernelEngine
    return RoundTripEngine


@pytest.mark.parametrize("case", checks.SLIDING, ids=lambda c: f"{c[0]}-{np.dtype(c[1]).name}-K{c[6]}-batch{c[7]}")
def test_resident_sliding_is_segment_sliding(cuda_device: Any, make_engine: Any, case: tuple) -> None:
    checks.check_resident_sliding(cuda_device, make_engine, case, exact=False)


def test_resident_sliding_is_bitwise_the_cpu_path(cuda_device: Any, make_engine: Any) -> None:
    for case in checks.SLIDING:
        checks.check_resident_sliding(cuda_device, make_engine, case, exact=True)


def test_resident_buffers_are_reused(cuda_device: Any, make_engine: Any) -> None:
    checks.check_resident_reuse(cuda_device, make_engine, exact=False)


@pytest.mark.parametrize("case", checks.SINGLE, ids=lambda c: f"{c[0]}-{np.dtype(c[1]).name}-{c[5]}-K{c[6]}")
def test_resident_single_block_is_block_py(cuda_device: Any, make_engine: Any, case: tuple) -> None:
    checks.check_resident_single_block(cuda_device, make_engine, case, exact=False)


def test_resident_pipeline_default_device(cuda_context: Any) -> None:
    """ResidentPipeline without a device loads the kernels itself (load_module) in the current context."""
    checks.check_resident_sliding(None, RoundTripEngine, checks.SLIDING[0], exact=False)
