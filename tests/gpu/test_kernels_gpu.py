"""Each kernel of node/infer/gpu/kernels.cu on a real GPU, loaded both ways the node loads it (SourceModule
from kernels.cu when nvcc is installed, the shipped kernels.ptx otherwise), against the numpy function
it mirrors: the same checks the CPU emulation passes bitwise (tests/harness/cuda_cpu/checks.py).

Tolerances (checks.RTOL etc.): float32 values rtol 1e-5, atol 1e-5 × the largest magnitude; labels at
most 1 in 10⁴ differing (a near-tie decided by a rounding). The design promises bitwise equality on
the GPU too (__fadd_rn & co., float64 coordinates, numpy's axis order);
test_results_are_bitwise_numpy checks that promise separately, so a failure there alone says the
kernels are right within tolerance but the no-contraction reasoning missed something.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.errors import InferenceError
from tests.harness.cuda_cpu import checks

pytestmark = pytest.mark.gpu
Shape = tuple[int, int, int]


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("in_shape, out_shape", checks.ALIGNED)
@pytest.mark.parametrize("fused", [False, True])
def test_resample_aligned(kernels: Any, memory: Any, dtype: type, in_shape: Shape, out_shape: Shape,
                          fused: bool) -> None:
    checks.check_resample_aligned(kernels, memory, dtype, in_shape, out_shape, fused, exact=False)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("in_shape, spacing, target, out_shape", checks.CENTRED)
@pytest.mark.parametrize("fused", [False, True])
def test_resample_centred(kernels: Any, memory: Any, dtype: type, in_shape: Shape, spacing: tuple[float, float, float],
                          target: tuple[float, float, float], out_shape: Shape | None, fused: bool) -> None:
    checks.check_resample_centred(kernels, memory, dtype, in_shape, spacing, target, out_shape, fused, exact=False)


@pytest.mark.parametrize("clip", checks.CLIPS)
def test_normalise(kernels: Any, memory: Any, clip: tuple[float, float]) -> None:
    checks.check_normalise(kernels, memory, clip, exact=False)


@pytest.mark.parametrize("shape, patch, overlap, batch", checks.WINDOWS)
def test_extract_tiles(kernels: Any, memory: Any, shape: Shape, patch: Shape, overlap: float, batch: int) -> None:
    checks.check_extract_tiles(kernels, memory, shape, patch, overlap, batch, exact=True)  # copies: exact


@pytest.mark.parametrize("shape, patch, overlap, batch", checks.WINDOWS)
@pytest.mark.parametrize("channels", [2, 3])
def test_accumulate_tile(kernels: Any, memory: Any, shape: Shape, patch: Shape, overlap: float, batch: int,
                         channels: int) -> None:
    checks.check_accumulate(kernels, memory, shape, patch, overlap, batch, channels, exact=False)


@pytest.mark.parametrize("grid, native", checks.LABEL_GRIDS)
@pytest.mark.parametrize("channels", checks.CHANNELS)
@pytest.mark.parametrize("with_norm", [True, False])
def test_labels_native_argmax(kernels: Any, memory: Any, grid: Shape, native: Shape, channels: int,
                              with_norm: bool) -> None:
    checks.check_labels(kernels, memory, grid, native, channels, with_norm, exact=False)


@pytest.mark.parametrize("channels", [2, 3])
def test_label_ties(kernels: Any, memory: Any, channels: int) -> None:
    checks.check_ties(kernels, memory, channels)


def test_labels_divide_by_norm_before_interpolating(kernels: Any, memory: Any) -> None:
    checks.check_norm_before_interpolation(kernels, memory)


@pytest.mark.parametrize("threshold", checks.THRESHOLDS)
def test_threshold_sigmoid(kernels: Any, memory: Any, threshold: float) -> None:
    checks.check_threshold(kernels, memory, threshold)


@pytest.mark.parametrize("shape, block", checks.BLOCKS)
def test_place_in_block(kernels: Any, memory: Any, shape: Shape, block: Shape) -> None:
    checks.check_place_in_block(kernels, memory, shape, block)


def test_results_are_bitwise_numpy(kernels: Any, memory: Any) -> None:
    """The design's promise, on a representative case of each arithmetic kernel."""
    checks.check_resample_aligned(kernels, memory, np.int16, (33, 20, 17), (16, 41, 9), True, exact=True)
    checks.check_resample_centred(kernels, memory, np.float32, (9, 14, 13), (2.5, 0.7, 0.8), (3.0, 1.5, 1.5), None,
                                  True, exact=True)
    checks.check_normalise(kernels, memory, checks.CLIPS[0], exact=True)
    checks.check_accumulate(kernels, memory, (19, 11, 14), (7, 5, 6), 0.6, 5, 3, exact=True)
    for channels in (2, 3):
        checks.check_labels(kernels, memory, (6, 7, 5), (13, 20, 11), channels, True, exact=True)


def test_large_grid_launch(kernels: Any, memory: Any) -> None:
    """A launch of many blocks (a volume of 2²⁴ + 3 voxels) covers every element."""
    from node.infer.gpu.kernels import Normalisation
    from node.model.bundle import Preprocess

    values = np.random.default_rng(0).normal(0, 300, (1 << 24) + 3).astype(np.float32)
    pre = Preprocess(spacing_mm=None, clip=(-100.0, 100.0), scale=0.5, offset=1.0)
    ptr = memory.put(values)
    kernels.normalise(ptr, values.size, Normalisation.of(pre), memory.new_stream())
    expected = (np.clip(values, np.float32(-100), np.float32(100)) + np.float32(1)) * np.float32(0.5)
    assert np.array_equal(memory.get(ptr, values.shape, np.float32), expected)


def test_loader_picks_a_working_module(cuda_context: Any) -> None:
    """load_module (nvcc if on PATH, else the PTX) gives a module with every kernel."""
    from node.infer.gpu.kernels import SIGNATURES, CudaDevice, load_module

    device = CudaDevice(load_module())
    assert set(device._functions) == set(SIGNATURES)


def test_a_broken_ptx_is_a_clear_error(cuda_context: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.infer.gpu.kernels as module

    bad = tmp_path / "kernels.ptx"
    bad.write_text(".version 99.9\n.target sm_75\nnot ptx\n")
    monkeypatch.setattr(module, "KERNELS_PTX", bad)
    monkeypatch.setattr(module.shutil, "which", lambda name: None)  # as if nvcc were not installed
    with pytest.raises(InferenceError,
                       match=r"nvcc is not on PATH; the driver could not load kernels.ptx \(PTX ISA 99.9"):
        module.load_module()
