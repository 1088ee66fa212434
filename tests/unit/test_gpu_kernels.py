"""node/infer/gpu/kernels.cu without a GPU: each kernel, compiled with g++ through the CUDA shim
(tests/harness/cuda_cpu) and launched through node.infer.gpu.kernels.Kernels, against the numpy function it
mirrors; the GPU-resident pipeline (node.infer.gpu.resident) run on that emulation against segment._sliding
and block.py's single-block steps; and, when nvcc is installed, the CUDA build itself (clean, no FMA
contraction, no shared memory/atomics/barriers/local memory, the shipped PTX current).

Tolerance: none. The kernels do numpy's float32 (and float64 grid-coordinate) operations in numpy's
order with contraction disabled, so results are compared bitwise (NaN equal to NaN), labels included:
the 8-corner interpolation follows numpy's separable axis order, so no tie or rounding can come out
differently. tests/gpu runs the same checks (tests/harness/cuda_cpu/checks.py) on a GPU.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from node.errors import InferenceError
from node.infer.gpu.kernels import (
    BLOCK,
    KERNELS_CU,
    KERNELS_PTX,
    MAX_GRID,
    SIGNATURES,
    Kernels,
    Normalisation,
    axis_order,
    grid_for,
    load_module,
    struct_format,
)
from node.infer.gpu.resident import ResidentPipeline, tile_corners
from node.infer.transforms import labels_on_native_grid, normalise, resample_linear
from node.infer.window import gaussian_weights, sliding_window
from node.model.bundle import Preprocess, Window
from tests.harness.cuda_cpu import checks
from tests.harness.cuda_cpu.build import build, missing_reason
from tests.harness.cuda_cpu.checks import PRE, F, smooth
from tests.harness.cuda_cpu.device import CpuDevice
from tests.harness.cuda_cpu.engines import PointerEngine

Shape = tuple[int, int, int]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    started = time.perf_counter()
    result = build(tmp_path_factory.mktemp("cuda_cpu"))
    print(f"g++ build of the kernels: {time.perf_counter() - started:.2f} s")
    return result


@pytest.fixture
def device(built) -> CpuDevice:
    return CpuDevice(built.lib)


@pytest.fixture
def kernels(device: CpuDevice) -> Kernels:
    return Kernels(device)


def pointer_engine(tile: Shape, channels: int, max_batch: int, output_shape: Shape) -> PointerEngine:
    return PointerEngine(tile, channels, max_batch, output_shape)


def test_emulation_compiles_without_warnings(built) -> None:
    """g++ -Wall -Wextra is silent, and the static_asserts (kernels.cu's parameter types are exactly
    SIGNATURES, from which the pycuda launches are packed) held, or the build would have failed."""
    assert built.warnings == ""


# ------------------------------------------------------------------------------------ resampling
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("in_shape, out_shape", checks.ALIGNED)
@pytest.mark.parametrize("fused", [False, True])
def test_resample_aligned_is_resample_linear(kernels: Kernels, device: CpuDevice, dtype: type, in_shape: Shape,
                                            out_shape: Shape, fused: bool) -> None:
    """resample_aligned_{i16,f32} = transforms.resample_linear (then normalise when fused)."""
    checks.check_resample_aligned(kernels, device, dtype, in_shape, out_shape, fused, exact=True)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("in_shape, spacing, target, out_shape", checks.CENTRED)
@pytest.mark.parametrize("fused", [False, True])
def test_resample_centred_is_numpy(kernels: Kernels, device: CpuDevice, dtype: type, in_shape: Shape,
                                   spacing: tuple[float, float, float], target: tuple[float, float, float],
                                   out_shape: Shape | None, fused: bool) -> None:
    """resample_centred_{i16,f32} = transforms.resample_centred (then normalise when fused)."""
    checks.check_resample_centred(kernels, device, dtype, in_shape, spacing, target, out_shape, fused, exact=True)


def test_resample_takes_only_int16_or_float32(kernels: Kernels, device: CpuDevice) -> None:
    with pytest.raises(InferenceError, match="int16 or float32"):
        kernels.resample_aligned(device.alloc(8), np.dtype(np.uint8), (2, 2, 2), device.alloc(32), (2, 2, 2), None,
                                 device.new_stream())


def test_axis_order_is_numpys() -> None:
    assert axis_order((10, 10, 10), (5, 20, 10)) == (0, 2, 1)
    assert axis_order((4, 4, 4), (4, 4, 4)) == (0, 1, 2)  # stable, like sorted()


@pytest.mark.parametrize("clip", checks.CLIPS)
def test_normalise_in_place(kernels: Kernels, device: CpuDevice, clip: tuple[float, float]) -> None:
    """normalise = transforms.normalise, NaN and ±inf included."""
    checks.check_normalise(kernels, device, clip, exact=True)


# ------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("shape, patch, overlap, batch", checks.WINDOWS)
def test_extract_tiles_is_sliding_windows_gather(kernels: Kernels, device: CpuDevice, shape: Shape, patch: Shape,
                                                 overlap: float, batch: int) -> None:
    checks.check_extract_tiles(kernels, device, shape, patch, overlap, batch, exact=True)


def test_tile_corners_are_sliding_windows() -> None:
    """tile_corners lists exactly the tiles sliding_window runs, in its order."""
    image = smooth((19, 11, 14), 2).astype(F)
    seen: list[tuple[int, ...]] = []

    class Recorder:
        name = "recorder"

        def run(self, tiles: np.ndarray) -> np.ndarray:
            for tile in tiles:  # a tile's first voxel identifies its corner: the image's values are distinct
                seen.append(tuple(int(v) for v in np.argwhere(image == tile[0, 0, 0, 0])[0]))
            return np.zeros((len(tiles), 2, *tiles.shape[2:]), dtype=F)

    sliding_window(image, Recorder(), patch=(7, 5, 6), overlap=0.6, batch=4, pad_value=-99.0)
    assert seen == [tuple(c) for c in tile_corners((19, 11, 14), (7, 5, 6), 0.6)]


@pytest.mark.parametrize("shape, patch, overlap, batch", checks.WINDOWS)
@pytest.mark.parametrize("channels", [2, 3])
def test_accumulate_tile_is_sliding_windows_average(kernels: Kernels, device: CpuDevice, shape: Shape, patch: Shape,
                                                    overlap: float, batch: int, channels: int) -> None:
    """accumulate_tile per tile, then acc / norm = window.sliding_window's result."""
    checks.check_accumulate(kernels, device, shape, patch, overlap, batch, channels, exact=True)


# ------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("grid, native", checks.LABEL_GRIDS)
@pytest.mark.parametrize("channels", checks.CHANNELS)
@pytest.mark.parametrize("with_norm", [True, False])
def test_labels_native_argmax_is_labels_on_native_grid(kernels: Kernels, device: CpuDevice, grid: Shape, native: Shape,
                                                       channels: int, with_norm: bool) -> None:
    checks.check_labels(kernels, device, grid, native, channels, with_norm, exact=True)


@pytest.mark.parametrize("channels", [2, 3])
def test_labels_ties_go_to_the_lowest_channel(kernels: Kernels, device: CpuDevice, channels: int) -> None:
    checks.check_ties(kernels, device, channels)


def test_labels_divide_by_norm_before_interpolating(kernels: Kernels, device: CpuDevice) -> None:
    checks.check_norm_before_interpolation(kernels, device)


@pytest.mark.parametrize("threshold", checks.THRESHOLDS)
def test_threshold_sigmoid_is_numpys_comparison(kernels: Kernels, device: CpuDevice, threshold: float) -> None:
    checks.check_threshold(kernels, device, threshold)


@pytest.mark.parametrize("shape, block", checks.BLOCKS)
def test_place_in_block_is_numpys(kernels: Kernels, device: CpuDevice, shape: Shape, block: Shape) -> None:
    checks.check_place_in_block(kernels, device, shape, block)


# --------------------------------------------------------------------------- launches and indices
def test_any_grid_covers_every_element(built, device: CpuDevice) -> None:
    """The grid-stride loops: a grid far smaller than the element count (and blocks of odd size) still
    writes every element exactly once."""
    values = np.random.default_rng(4).normal(0, 300, 4099).astype(F)
    for grid, block in [(1, 1), (3, 7), (2, 256), (100, 256)]:
        ptr = device.put(values)
        built.lib.launch_normalise(grid, block, ptr, values.size, -100.0, 100.0, 1.0, 0.5)
        assert np.array_equal(device.view(ptr, values.shape, F), (np.clip(values, -100, 100) + 1) * F(0.5))
    image, native = smooth((4, 5, 6), 1).astype(F), (7, 9, 11)
    labels = device.alloc(int(np.prod(native)))
    acc = device.put(np.stack([image, -image]))
    built.lib.launch_labels_native_argmax(5, 3, acc, None, labels, 2, 4, 5, 6, *native, *axis_order((4, 5, 6), native))
    assert np.array_equal(device.view(labels, native, np.uint8),
                          labels_on_native_grid(np.stack([image, -image]), native))


def test_grid_and_block_of_a_launch() -> None:
    assert BLOCK == 256 and grid_for(1) == 1 and grid_for(256) == 1 and grid_for(257) == 2
    assert grid_for(2100 * 1024 * 1024) == MAX_GRID  # the kernels loop grid-stride over the rest
    assert struct_format("threshold_sigmoid") == "PPqfi"
    assert ctypes.sizeof(ctypes.c_longlong) == 8


def test_empty_launches_are_skipped(kernels: Kernels, device: CpuDevice) -> None:
    stream = device.new_stream()
    kernels.normalise(device.alloc(4), 0, Normalisation.of(PRE), stream)
    kernels.extract_tiles(device.alloc(4), (1, 1, 1), device.alloc(4), device.alloc(12), 0, (1, 1, 1), 0.0, stream)
    assert stream.launches == []
    with pytest.raises(InferenceError, match="does not fit a uint8"):
        kernels.threshold_sigmoid(device.alloc(4), device.alloc(1), 1, 0.5, 256, stream)


def test_pycuda_is_imported_only_to_open_a_device() -> None:
    """Importing the GPU modules on a CPU-only node loads no pycuda; asking for a device without it is
    an InferenceError that says what to install."""
    code = ("import sys, node.infer.gpu.kernels, node.infer.gpu.resident; "
            "assert not any(m.startswith('pycuda') for m in sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        import pycuda  # noqa: F401
    except ImportError:
        with pytest.raises(InferenceError, match=r"need pycuda, which is not installed \(pip install"):
            load_module()


def _huge(device: CpuDevice, shape: tuple[int, ...], dtype: type) -> tuple[np.ndarray, int]:
    """A lazily zeroed array of more than 2^31 elements registered as device memory (pages are only
    backed where touched)."""
    try:
        array: np.ndarray = np.zeros(shape, dtype=dtype)
    except MemoryError:
        pytest.skip(f"cannot reserve {np.prod(shape) * np.dtype(dtype).itemsize / 2**30:.1f} GiB of address space")
    ptr = array.ctypes.data
    device.allocations[ptr] = array.reshape(-1).view(np.uint8)
    return array, ptr


def test_indices_are_64_bit(kernels: Kernels, device: CpuDevice) -> None:
    """A 2100 × 1024 × 1024 volume (2.25·10⁹ voxels > 2³¹): reads and writes past 2³¹ land where numpy's do."""
    shape = (2100, 1024, 1024)
    assert np.prod(shape) > 2**31
    stream = device.new_stream()
    rng = np.random.default_rng(5)

    # resampling reads the far corners of an int16 volume
    volume, src = _huge(device, shape, np.int16)
    picks = [np.array([0, 1, n - 2, n - 1]) for n in shape]
    volume[np.ix_(*picks)] = rng.integers(-1000, 1000, (4, 4, 4))
    out = device.alloc(4 * 8)
    kernels.resample_aligned(src, volume.dtype, shape, out, (2, 2, 2), Normalisation.of(PRE), stream)
    corners = np.ascontiguousarray(volume[np.ix_(*picks)])  # the 4³ voxels the 2³ output reads, same weights
    assert np.array_equal(device.view(out, (2, 2, 2), F), normalise(resample_linear(corners, (2, 2, 2)), PRE))
    del device.allocations[src], volume

    # a tile at the far end of a float32 volume, and one accumulated there
    image, image_ptr = _huge(device, shape, F)
    image[-3:, -5:, -6:] = rng.normal(size=(3, 5, 6))
    corner = np.array([[shape[0] - 2, shape[1] - 4, shape[2] - 5]], dtype=np.int32)  # sticks out: padding
    tile = (3, 5, 6)
    tiles = device.alloc(4 * 90)
    kernels.extract_tiles(image_ptr, shape, tiles, device.put(corner), 1, tile, 9.0, stream)
    expected = np.full(tile, 9.0, dtype=F)
    expected[:2, :4, :5] = image[-2:, -4:, -5:]
    assert np.array_equal(device.view(tiles, tile, F), expected)

    norm, norm_ptr = image, image_ptr  # the image's memory serves as the weight sum (a third 8 GiB is too many)
    norm[-2:, -4:, -5:] = 0.0
    acc, acc_ptr = _huge(device, shape, F)
    probs = rng.random((1, *tile)).astype(F)
    weights = gaussian_weights(tile)
    kernels.accumulate_tile(acc_ptr, norm_ptr, shape, device.put(probs), device.put(weights), 1, tile,
                            [int(c) for c in corner[0]], stream)
    assert np.array_equal(acc[-2:, -4:, -5:], (probs[0] * weights)[:2, :4, :5])
    assert np.array_equal(norm[-2:, -4:, -5:], weights[:2, :4, :5])
    del device.allocations[acc_ptr], device.allocations[image_ptr]


# ---------------------------------------------------------------------------- resident pipeline
@pytest.mark.parametrize("case", checks.SLIDING, ids=lambda c: f"{c[0]}-{np.dtype(c[1]).name}-K{c[6]}-batch{c[7]}")
def test_resident_sliding_is_segment_sliding(device: CpuDevice, case: tuple) -> None:
    """ResidentPipeline.sliding_labels = segment._sliding (same network in numpy), batches of max_batch,
    every launch and the engine on the pipeline's one stream, every copy inside an allocation."""
    checks.check_resident_sliding(device, pointer_engine, case, exact=True)
    assert len(device.streams) == 1


def test_resident_buffers_are_reused(device: CpuDevice) -> None:
    first, last = checks.check_resident_reuse(device, pointer_engine, exact=True)
    assert device.freed > first  # grown buffers freed, then close() freed the rest
    assert device.allocations == {}


def test_resident_refuses_an_engine_of_another_tile(device: CpuDevice) -> None:
    pre = Preprocess(spacing_mm=None, clip=(-200.0, 300.0), scale=1.0, offset=0.0)
    pipeline = ResidentPipeline(PointerEngine((6, 6, 6)), device)
    with pytest.raises(InferenceError, match=r"takes tiles of \(6, 6, 6\)"):
        pipeline.sliding_labels(np.zeros((8, 8, 8), np.int16), (1.0, 1.0, 1.0), pre, Window((8, 8, 8), 0.5, 1))
    pipeline = ResidentPipeline(PointerEngine((6, 6, 6), output_shape=(4, 4, 4)), device)
    with pytest.raises(InferenceError, match="the sliding window needs"):
        pipeline.sliding_labels(np.zeros((8, 8, 8), np.int16), (1.0, 1.0, 1.0), pre, Window((6, 6, 6), 0.5, 1))


@pytest.mark.parametrize("case", checks.SINGLE, ids=lambda c: f"{c[0]}-{np.dtype(c[1]).name}-{c[5]}-K{c[6]}")
def test_resident_single_block_is_block_py(device: CpuDevice, case: tuple) -> None:
    checks.check_resident_single_block(device, pointer_engine, case, exact=True)


# ------------------------------------------------------------------------------------------ nvcc
def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA build of kernels.cu is checked where the CUDA toolkit is installed")
    return nvcc


@pytest.fixture(scope="module")
def nvcc_ptx(tmp_path_factory: pytest.TempPathFactory) -> str:
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("nvcc") / "kernels.ptx"
    proc = subprocess.run([nvcc, "--ptx", "-arch=compute_75", "-o", str(out), str(KERNELS_CU)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", f"nvcc warned:\n{proc.stdout}{proc.stderr}"
    return out.read_text()


def _entries(ptx: str) -> dict[str, list[str]]:
    """Kernel name → its parameters' PTX types."""
    entries = {}
    for name, params in re.findall(r"\.visible \.entry (\w+)\(\s*(.*?)\)", ptx, re.DOTALL):
        entries[name] = re.findall(r"\.param \.(\w+)", params)
    return entries


_PTX_TYPE = {"P": "u64", "q": "u64", "i": "u32", "f": "f32", "d": "f64"}


@pytest.mark.parametrize("which", ["shipped", "nvcc"])
def test_ptx_follows_the_rules(which: str, request: pytest.FixtureRequest) -> None:
    """Every kernel of SIGNATURES, with parameters of the PTX types its launch packs; no FMA (the
    *_rn arithmetic held), no local memory (nothing spilled or indexed dynamically), and none of what
    the CPU emulation could not reproduce: shared memory, barriers, atomics, warp shuffles/votes."""
    ptx = KERNELS_PTX.read_text() if which == "shipped" else request.getfixturevalue("nvcc_ptx")
    entries = _entries(ptx)
    assert set(entries) == set(SIGNATURES)
    for name, params in entries.items():
        assert params == [_PTX_TYPE[c] for c in struct_format(name)], name
    code = "\n".join(line.split("//")[0] for line in ptx.splitlines())  # comments dropped
    for forbidden in [r"\bfma\.", r"\.local\b", r"\.shared\b", r"\bbar\.", r"\bbarrier\.", r"\batom\.", r"\bred\.",
                      r"\bshfl\.", r"\bvote\.", r"\bmatch\."]:
        assert not re.search(forbidden, code), forbidden
    assert re.search(r"\badd\.rn\.f32", code) and re.search(r"\bdiv\.rn\.f64", code)  # the pattern is live
    assert ".target sm_75" in ptx


def _toolkit(text: str) -> str | None:
    found = re.search(r"Cuda compilation tools, release [\d.]+, V[\d.]+", text)
    return found.group(0) if found else None


def test_shipped_ptx_is_current(nvcc_ptx: str) -> None:
    """The shipped kernels.ptx is what this nvcc makes of kernels.cu (regenerate: see kernels.cu's top)."""
    shipped = KERNELS_PTX.read_text()
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    if _toolkit(shipped) != _toolkit(version):
        pytest.skip(f"kernels.ptx was written by {_toolkit(shipped)}, the local nvcc is {_toolkit(version)}: "
                    "their PTX differs in detail")
    assert shipped == nvcc_ptx, "kernels.ptx is stale: regenerate it with the command at the top of kernels.cu"
