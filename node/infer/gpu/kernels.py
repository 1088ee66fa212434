"""The CUDA kernels of the GPU-resident pipeline (kernels.cu): loading them, and typed launches.

:class:`Kernels` computes each launch's arguments exactly as the numpy function the kernel mirrors
would (grid shapes, numpy's axis order, float32 constants) and hands them to a :class:`Launcher`:
:class:`CudaDevice` on a GPU (pycuda), or the tests' CPU emulation of the same ``kernels.cu``
(tests/harness/cuda_cpu), which is how the launches are checked on machines without a GPU.

The kernels are compiled with pycuda's ``SourceModule`` when ``nvcc`` is on PATH (for the GPU at hand),
else loaded from the shipped ``kernels.ptx`` (PTX for compute_75, JIT-compiled by the driver). ``pycuda``
is imported only when a CUDA device is opened. Every CUDA failure becomes an
:class:`~node.errors.InferenceError` naming the step.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from node.errors import InferenceError

KERNELS_CU = Path(__file__).with_name("kernels.cu")
KERNELS_PTX = Path(__file__).with_name("kernels.ptx")
BLOCK = 256  # threads per block; the grid covers the element count (the kernels loop grid-stride beyond MAX_GRID)
MAX_GRID = 1 << 22

Shape = tuple[int, int, int]
Arg = int | float

#: Every kernel's C parameter types, in order: the pycuda launch format and the CPU emulation's ctypes
#: signatures are derived from this table, and the emulation's build asserts at compile time that
#: kernels.cu declares exactly these types.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "resample_aligned_i16": ("const short*", "float*", *("long long",) * 6, *("int",) * 4, *("float",) * 4),
    "resample_aligned_f32": ("const float*", "float*", *("long long",) * 6, *("int",) * 4, *("float",) * 4),
    "resample_centred_i16": ("const short*", "float*", *("long long",) * 6, *("double",) * 3, *("int",) * 4,
                             *("float",) * 4),
    "resample_centred_f32": ("const float*", "float*", *("long long",) * 6, *("double",) * 3, *("int",) * 4,
                             *("float",) * 4),
    "normalise": ("float*", "long long", "float", "float", "float", "float"),
    "extract_tiles": ("const float*", "float*", "const int*", "int", *("long long",) * 6, "float"),
    "accumulate_tile": ("float*", "float*", "const float*", "const float*", "int", *("long long",) * 9),
    "labels_native_argmax": ("const float*", "const float*", "unsigned char*", "int", *("long long",) * 6,
                             "int", "int", "int"),
    "threshold_sigmoid": ("const float*", "unsigned char*", "long long", "float", "int"),
    "place_in_block": ("const float*", "float*", *("long long",) * 6, "float"),
}

_FORMAT = {"long long": "q", "int": "i", "float": "f", "double": "d"}


def struct_format(kernel: str) -> str:
    """The ``struct`` format of ``kernel``'s parameters (pycuda's ``Function.prepare``): P for pointers."""
    return "".join("P" if t.endswith("*") else _FORMAT[t] for t in SIGNATURES[kernel])


def grid_for(count: int) -> int:
    """Blocks of :data:`BLOCK` threads for ``count`` elements (capped; the kernels loop over the rest)."""
    return max(1, min(MAX_GRID, -(-count // BLOCK)))


class Launcher(Protocol):
    """Runs a kernel of kernels.cu: ``grid`` blocks of ``block`` threads, queued on ``stream``."""

    def launch(self, kernel: str, grid: int, block: int, args: Sequence[Arg], stream: Any) -> None: ...


@dataclass(frozen=True)
class Normalisation:
    """transforms.normalise's x' = (clip(x, clip_lo, clip_hi) + offset) * scale."""

    clip_lo: float
    clip_hi: float
    offset: float
    scale: float

    @classmethod
    def of(cls, pre: Any) -> Normalisation:
        """From a bundle's :class:`node.model.bundle.Preprocess`."""
        return cls(float(pre.clip[0]), float(pre.clip[1]), float(pre.offset), float(pre.scale))

    def args(self) -> tuple[int, float, float, float, float]:
        return 1, self.clip_lo, self.clip_hi, self.offset, self.scale


_NO_NORMALISATION = (0, 0.0, 0.0, 0.0, 1.0)


def axis_order(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, int, int]:
    """The order in which numpy's separable resampling visits the axes (most shrinking first):
    the kernels interpolate in this order, which makes their results bitwise numpy's."""
    return tuple(sorted(range(3), key=lambda a: out_shape[a] / in_shape[a]))  # type: ignore[return-value]


def _source_suffix(dtype: np.dtype[Any]) -> str:
    if dtype == np.int16:
        return "i16"
    if dtype == np.float32:
        return "f32"
    raise InferenceError(f"the GPU resampling takes int16 or float32 voxels, not {dtype}")


class Kernels:
    """Typed launches of kernels.cu. Pointers are device addresses (ints); shapes are (z, y, x)."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def _launch(self, kernel: str, count: int, args: Sequence[Arg], stream: Any) -> None:
        if count <= 0:
            return
        if len(args) != len(SIGNATURES[kernel]):  # a programming error, caught by the tests
            raise InferenceError(f"kernel {kernel} takes {len(SIGNATURES[kernel])} arguments, got {len(args)}")
        self.launcher.launch(kernel, grid_for(count), BLOCK, args, stream)

    def resample_aligned(self, src: int, dtype: np.dtype[Any], in_shape: Shape, dst: int, out_shape: Shape,
                         norm: Normalisation | None, stream: Any) -> None:
        """transforms.resample_linear of an int16/float32 (D, H, W) volume into float32 ``out_shape``,
        then transforms.normalise when ``norm`` is given."""
        kernel = f"resample_aligned_{_source_suffix(np.dtype(dtype))}"
        args = (src, dst, *in_shape, *out_shape, *axis_order(in_shape, out_shape),
                *(norm.args() if norm else _NO_NORMALISATION))
        self._launch(kernel, math.prod(out_shape), args, stream)

    def resample_centred(self, src: int, dtype: np.dtype[Any], in_shape: Shape, spacing: Sequence[float],
                         target: Sequence[float], dst: int, out_shape: Shape, norm: Normalisation | None,
                         stream: Any) -> None:
        """transforms.resample_centred from ``spacing`` to ``target`` mm into float32 ``out_shape``, then
        transforms.normalise when ``norm`` is given."""
        kernel = f"resample_centred_{_source_suffix(np.dtype(dtype))}"
        ratios = [float(t) / float(s) for s, t in zip(spacing, target, strict=False)]
        args = (src, dst, *in_shape, *out_shape, *ratios, *axis_order(in_shape, out_shape),
                *(norm.args() if norm else _NO_NORMALISATION))
        self._launch(kernel, math.prod(out_shape), args, stream)

    def normalise(self, ptr: int, count: int, norm: Normalisation, stream: Any) -> None:
        """transforms.normalise in place on ``count`` float32 values."""
        self._launch("normalise", count, (ptr, count, *norm.args()[1:]), stream)

    def extract_tiles(self, volume: int, shape: Shape, tiles: int, corners: int, batch: int, tile: Shape,
                      pad_value: float, stream: Any) -> None:
        """(batch, 1, *tile) tiles at the int32 (z, y, x) ``corners`` (device array) of the volume; outside
        it, ``pad_value``."""
        self._launch("extract_tiles", batch * math.prod(tile),
                     (volume, tiles, corners, batch, *shape, *tile, pad_value), stream)

    def accumulate_tile(self, acc: int, norm: int, shape: Shape, probs: int, weights: int, channels: int,
                        tile: Shape, corner: Sequence[int], stream: Any) -> None:
        """acc[:, tile at corner] += probs * weights; norm[tile at corner] += weights, inside ``shape``."""
        self._launch("accumulate_tile", math.prod(tile),
                     (acc, norm, probs, weights, channels, *shape, *tile, *corner), stream)

    def labels_native_argmax(self, acc: int, norm: int, channels: int, grid_shape: Shape, labels: int,
                             native_shape: Shape, stream: Any) -> None:
        """transforms.labels_on_native_grid of acc / norm (``norm`` 0: acc is already averaged) into
        uint8 ``labels`` of ``native_shape``."""
        self._launch("labels_native_argmax", math.prod(native_shape),
                     (acc, norm, labels, channels, *grid_shape, *native_shape,
                      *axis_order(grid_shape, native_shape)), stream)

    def threshold_sigmoid(self, probs: int, labels: int, count: int, threshold: float, value: int,
                          stream: Any) -> None:
        """labels = value where probs > threshold (compared in float32, as numpy does), else 0."""
        if not 0 <= value <= 255:
            raise InferenceError(f"label value {value} does not fit a uint8 label volume")
        self._launch("threshold_sigmoid", count, (probs, labels, count, threshold, value), stream)

    def place_in_block(self, image: int, shape: Shape, block_ptr: int, block: Shape, pad_value: float,
                       stream: Any) -> None:
        """block.place_in_block: the image centred in a ``block`` array filled with ``pad_value``."""
        self._launch("place_in_block", math.prod(block), (image, block_ptr, *shape, *block, pad_value), stream)


# ------------------------------------------------------------------------------------------ pycuda
@contextmanager
def cuda_step(what: str) -> Iterator[None]:
    """Turn a failure of the CUDA (or TensorRT) calls inside into an InferenceError that says what was
    being done."""
    try:
        yield
    except InferenceError:
        raise
    except Exception as exc:  # pycuda.driver.Error and subclasses, TensorRT's RuntimeError,
        # MemoryError of pinned memory
        raise InferenceError(f"CUDA failed while {what}: {exc}") from exc


def ptx_isa_version(ptx: str) -> str:
    """The PTX ISA version a PTX file declares (``.version 9.0``): the driver must support it."""
    found = re.search(r"^\.version\s+(\S+)", ptx, re.MULTILINE)
    return found.group(1) if found else "unknown"


def load_module() -> Any:
    """The kernels as a ``pycuda.driver.Module``, in the current CUDA context.

    nvcc on PATH: compiled from kernels.cu for this GPU; otherwise (or if that fails) the shipped
    kernels.ptx, JIT-compiled by the driver. Raises InferenceError naming what failed.
    """
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise InferenceError(f"the GPU kernels need pycuda, which is not installed "
                             f"(pip install 'dicom-seg-node[gpu]'): {exc}") from exc
    failures = []
    if shutil.which("nvcc"):
        try:
            from pycuda.compiler import SourceModule

            return SourceModule(KERNELS_CU.read_text(), no_extern_c=True)
        except Exception as exc:  # pycuda.driver.CompileError, LogicError of a failed load
            failures.append(f"compiling {KERNELS_CU.name} with nvcc failed: {exc}")
    else:
        failures.append("nvcc is not on PATH")
    try:
        ptx = KERNELS_PTX.read_bytes()
    except OSError as exc:
        failures.append(f"cannot read {KERNELS_PTX}: {exc}")
        raise InferenceError("cannot load the GPU kernels: " + "; ".join(failures)) from exc
    try:
        return cuda.module_from_buffer(ptx + b"\0")
    except Exception as exc:
        isa = ptx_isa_version(ptx.decode("ascii", "replace"))
        failures.append(f"the driver could not load {KERNELS_PTX.name} (PTX ISA {isa}, compute_75; an older "
                        f"driver than the CUDA toolkit that wrote it cannot): {exc}")
        raise InferenceError("cannot load the GPU kernels: " + "; ".join(failures)) from exc


class CudaDevice:
    """Device memory, page-locked host memory, streams and kernel launches with pycuda, in the CUDA
    context current when it is created (node.infer.gpu.trt_engine.CudaContext's, for TensorRT)."""

    def __init__(self, module: Any | None = None) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        self.module = module if module is not None else load_module()
        self._functions: dict[str, Any] = {}
        self._allocations: dict[int, Any] = {}
        with cuda_step("looking up the kernels in the loaded module"):
            for name in SIGNATURES:
                function = self.module.get_function(name)
                function.prepare(struct_format(name))
                self._functions[name] = function

    def launch(self, kernel: str, grid: int, block: int, args: Sequence[Arg], stream: Any) -> None:
        with cuda_step(f"launching kernel {kernel} ({grid} blocks of {block} threads)"):
            self._functions[kernel].prepared_async_call((grid, 1), (block, 1, 1), stream, *args)

    def new_stream(self) -> Any:
        with cuda_step("creating a CUDA stream"):
            return self._cuda.Stream()

    def alloc(self, nbytes: int) -> int:
        with cuda_step(f"allocating {nbytes:,} bytes of GPU memory"):
            allocation = self._cuda.mem_alloc(max(1, nbytes))
        ptr = int(allocation)
        self._allocations[ptr] = allocation
        return ptr

    def free(self, ptr: int) -> None:
        allocation = self._allocations.pop(ptr, None)
        if allocation is not None:
            with cuda_step("freeing GPU memory"):
                allocation.free()

    def host_array(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A page-locked host array (asynchronous copies need one)."""
        with cuda_step(f"allocating page-locked host memory {tuple(shape)} {np.dtype(dtype)}"):
            array: np.ndarray = self._cuda.pagelocked_empty(tuple(shape), dtype)
        return array

    def upload(self, dst: int, src: np.ndarray, stream: Any) -> None:
        with cuda_step(f"copying {src.nbytes:,} bytes to the GPU"):
            self._cuda.memcpy_htod_async(dst, src, stream)

    def download(self, dst: np.ndarray, src: int, stream: Any) -> None:
        with cuda_step(f"copying {dst.nbytes:,} bytes from the GPU"):
            self._cuda.memcpy_dtoh_async(dst, src, stream)

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None:
        # pycuda's memset_d8_async takes an unsigned int count: zero large buffers in chunks.
        chunk = 1 << 31
        with cuda_step(f"zeroing {nbytes:,} bytes of GPU memory"):
            for start in range(0, nbytes, chunk):
                self._cuda.memset_d8_async(ptr + start, 0, min(chunk, nbytes - start), stream)

    def synchronize(self, stream: Any) -> None:
        with cuda_step("waiting for the GPU to finish the queued kernels and copies"):
            stream.synchronize()
