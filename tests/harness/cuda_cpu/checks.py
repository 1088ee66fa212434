"""Each kernel of node/infer/gpu/kernels.cu, and the resident pipeline, against its numpy twin — written once,
run on the CPU emulation (tests/unit/test_gpu_kernels.py, bitwise) and on a GPU (tests/gpu, within the
stated tolerance, and bitwise where the design promises it).

A check takes :class:`node.infer.gpu.kernels.Kernels` and a :class:`Memory` (the CPU emulation's device, or
the GPU tests' pycuda wrapper), builds its inputs, launches, and compares with ``same``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from node.infer.block import image_probabilities, place_in_block
from node.infer.gpu.kernels import Kernels, Normalisation
from node.infer.gpu.resident import ResidentPipeline, tile_corners
from node.infer.segment import _sliding
from node.infer.transforms import labels_on_native_grid, model_grid_shape, normalise, resample_centred, resample_linear
from node.infer.window import gaussian_weights, sliding_window
from node.model.bundle import Preprocess, Window
from node.model.enums import Activation, WindowMode
from tests.harness.cuda_cpu.engines import NumpyEngine

F = np.float32
Shape = tuple[int, int, int]
PRE = Preprocess(spacing_mm=(3.0, 1.6, 1.7), clip=(-160.0, 240.3), scale=1 / 200.0, offset=-40.1)

#: Tolerances off the CPU emulation (on the GPU the results are expected bitwise as well; these say how
#: far they may be and still be right): float32 values rtol 1e-5 with atol 1e-5 × the largest magnitude
#: (a few float32 roundings of values up to ~10³); labels: at most 1 voxel in 10⁴ differing, which only a
#: near-tie decided by a rounding could explain.
RTOL = 1e-5
ATOL_RELATIVE = 1e-5
MAX_LABEL_MISMATCH = 1e-4


class Memory(Protocol):
    def alloc(self, nbytes: int) -> int: ...

    def put(self, array: np.ndarray) -> int: ...

    def get(self, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray: ...

    def new_stream(self) -> Any: ...

    def zero(self, ptr: int, nbytes: int, stream: Any) -> None: ...


def same(got: np.ndarray, expected: np.ndarray, exact: bool) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if exact:
        assert np.array_equal(got, expected, equal_nan=expected.dtype.kind == "f"), \
            f"{int(np.sum(got != expected))} of {expected.size} differ"
    elif expected.dtype.kind in "biu":
        differ = int(np.sum(got != expected))
        assert differ <= MAX_LABEL_MISMATCH * expected.size, f"{differ} of {expected.size} labels differ"
    else:
        finite = np.abs(expected[np.isfinite(expected)])
        scale = float(finite.max()) if finite.size else 1.0
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL_RELATIVE * max(scale, 1.0))


def smooth(shape: tuple[int, ...], seed: int, scale: float = 400.0) -> np.ndarray:
    """A smooth zero-mean random field (structure for labels to follow) plus a little noise, float64."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5, mode="wrap")
    field -= field.mean()
    field /= max(float(np.abs(field).max()), 1e-9)
    return field * scale + rng.normal(0, scale / 50, size=shape)


def ct(shape: Shape, dtype: Any, seed: int = 0) -> np.ndarray:
    """A CT-like volume: int16 HU or float32."""
    values = smooth(shape, seed, 600.0) - 100.0
    return np.round(values).astype(dtype) if dtype == np.int16 else values.astype(dtype)


# ------------------------------------------------------------------------------------ resampling
ALIGNED: list[tuple[Shape, Shape]] = [
    ((7, 9, 11), (13, 5, 11)),  # up, down, same size (numpy skips that axis)
    ((1, 6, 5), (3, 6, 8)),  # one input voxel: np.repeat
    ((5, 4, 3), (1, 1, 1)),  # one output voxel: weight 0 on voxel 0
    ((2, 2, 2), (5, 3, 2)),
    ((6, 7, 8), (6, 7, 8)),  # identity (to_model_grid without a target spacing)
    ((1, 1, 1), (1, 1, 1)),
    ((1, 1, 1), (2, 3, 1)),
    ((33, 20, 17), (16, 41, 9)),
]

CENTRED: list[tuple[Shape, tuple[float, float, float], tuple[float, float, float], Shape | None]] = [
    ((9, 14, 13), (2.5, 0.7, 0.8), (3.0, 1.5, 1.5), None),
    ((8, 10, 12), (1.5, 1.5, 1.5), (3.0, 3.0, 3.0), None),  # halving: pair averages
    ((4, 5, 6), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), None),  # same grid: every axis skipped
    ((6, 6, 6), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (8, 6, 4)),  # same spacing, another shape
    ((5, 7, 4), (3.0, 1.5, 1.5), (2.0, 0.75, 0.6), (7, 14, 10)),  # to a finer grid
    ((1, 7, 9), (5.0, 1.0, 1.0), (2.0, 2.0, 2.0), None),  # one slice: np.repeat
    ((2, 2, 2), (1.0, 1.0, 1.0), (0.4, 3.0, 1.0), None),
    ((3, 1, 2), (0.9, 1.0, 1.1), (0.3, 1.0, 1.1), (9, 1, 2)),
    ((5, 6, 7), (1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (5, 6, 7)),  # same shape, other spacing: interpolated
]


def check_resample_aligned(k: Kernels, mem: Memory, dtype: Any, in_shape: Shape, out_shape: Shape, fused: bool,
                           exact: bool) -> None:
    image = ct(in_shape, dtype, seed=sum(in_shape))
    dst = mem.alloc(4 * int(np.prod(out_shape)))
    k.resample_aligned(mem.put(image), image.dtype, in_shape, dst, out_shape, Normalisation.of(PRE) if fused else None,
                       mem.new_stream())
    expected = resample_linear(image, out_shape)
    if fused:
        expected = normalise(expected.copy(), PRE)
    same(mem.get(dst, out_shape, F), expected, exact)


def check_resample_centred(k: Kernels, mem: Memory, dtype: Any, in_shape: Shape,
                           spacing: tuple[float, float, float], target: tuple[float, float, float],
                           out_shape: Shape | None, fused: bool, exact: bool) -> None:
    image = ct(in_shape, dtype, seed=3 * sum(in_shape))
    expected = resample_centred(image, spacing, target, out_shape)
    if fused:
        expected = normalise(expected.copy(), PRE)
    shape: Shape = expected.shape
    dst = mem.alloc(4 * int(np.prod(shape)))
    k.resample_centred(mem.put(image), image.dtype, in_shape, spacing, target, dst, shape,
                       Normalisation.of(PRE) if fused else None, mem.new_stream())
    same(mem.get(dst, shape, F), expected, exact)


CLIPS = [(-160.0, 240.3), (0.1, 0.1), (5.0, -5.0)]  # ordinary; equal; lo > hi gives hi, as np.clip


def check_normalise(k: Kernels, mem: Memory, clip: tuple[float, float], exact: bool) -> None:
    values = np.random.default_rng(1).normal(0, 300, 1001).astype(F)
    values[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, clip[0]]
    pre = Preprocess(spacing_mm=None, clip=clip, scale=0.0123, offset=17.7)
    ptr = mem.put(values)
    k.normalise(ptr, values.size, Normalisation.of(pre), mem.new_stream())
    same(mem.get(ptr, values.shape, F), normalise(values.copy(), pre), exact)


# ------------------------------------------------------------------------------- sliding window
WINDOWS: list[tuple[Shape, Shape, float, int]] = [
    ((12, 15, 9), (8, 6, 10), 0.5, 2),  # padded along x (image narrower than the patch)
    ((5, 9, 7), (8, 4, 6), 0.25, 3),  # padded along z
    ((16, 16, 16), (16, 16, 16), 0.5, 1),  # one tile
    ((1, 2, 3), (2, 2, 2), 0.5, 4),
    ((19, 11, 14), (7, 5, 6), 0.6, 5),
]


def gather(image: np.ndarray, corners: np.ndarray, patch: Shape, pad: float) -> np.ndarray:
    """sliding_window's tiles: the image padded to at least the patch, cut at ``corners``."""
    padded = np.full(tuple(max(s, p) for s, p in zip(image.shape, patch, strict=True)), pad, dtype=F)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    return np.stack([padded[z:z + patch[0], y:y + patch[1], x:x + patch[2]] for z, y, x in corners])[:, None]


def check_extract_tiles(k: Kernels, mem: Memory, shape: Shape, patch: Shape, overlap: float, batch: int,
                        exact: bool) -> None:
    image = smooth(shape, 5).astype(F)
    corners = tile_corners(shape, patch, overlap)
    expected = gather(image, corners, patch, -2.5)
    volume, corners_ptr = mem.put(image), mem.put(corners)
    tiles = mem.alloc(4 * expected.size)
    stream = mem.new_stream()
    for first in range(0, len(corners), batch):  # in batches, at an offset into the corner array
        group = len(corners[first:first + batch])
        k.extract_tiles(volume, shape, tiles + 4 * first * int(np.prod(patch)), corners_ptr + 12 * first, group,
                        patch, -2.5, stream)
    same(mem.get(tiles, expected.shape, F), expected, exact)


def check_accumulate(k: Kernels, mem: Memory, shape: Shape, patch: Shape, overlap: float, batch: int, channels: int,
                     exact: bool) -> None:
    """Tiles added one launch each into an unpadded accumulator: acc / norm is sliding_window's result."""
    image = smooth(shape, 6, 3.0).astype(F)
    engine = NumpyEngine(patch, channels)
    expected = sliding_window(image, engine, patch=patch, overlap=overlap, batch=batch, pad_value=-1.5)
    corners = tile_corners(shape, patch, overlap)
    probs = engine.run(gather(image, corners, patch, -1.5))
    n = int(np.prod(shape))
    acc, norm = mem.alloc(4 * channels * n), mem.alloc(4 * n)
    stream = mem.new_stream()
    mem.zero(acc, 4 * channels * n, stream)
    mem.zero(norm, 4 * n, stream)
    probs_ptr, weights = mem.put(probs), mem.put(gaussian_weights(patch))
    for j, corner in enumerate(corners):
        k.accumulate_tile(acc, norm, shape, probs_ptr + 4 * j * probs[0].size, weights, channels, patch,
                          [int(c) for c in corner], stream)
    same(mem.get(acc, (channels, *shape), F) / mem.get(norm, shape, F), expected, exact)


# ------------------------------------------------------------------------------------ labels
LABEL_GRIDS: list[tuple[Shape, Shape]] = [
    ((6, 7, 5), (13, 20, 11)),  # up
    ((12, 9, 10), (5, 9, 4)),  # down and same
    ((8, 8, 8), (8, 8, 8)),  # identity: a per-voxel argmax
    ((1, 6, 7), (4, 11, 7)),  # one slice
    ((5, 4, 6), (1, 9, 1)),
    ((3, 2, 2), (17, 3, 2)),
]
CHANNELS = [1, 2, 3, 5]


def check_labels(k: Kernels, mem: Memory, grid: Shape, native: Shape, channels: int, with_norm: bool,
                 exact: bool) -> None:
    acc = np.stack([smooth(grid, 10 + c, 1.0) + 1.0 for c in range(channels)]).astype(F)
    norm = (smooth(grid, 99, 0.9) + 1.0).astype(F) if with_norm else np.ones(grid, dtype=F)
    expected = labels_on_native_grid(acc / norm, native)
    labels = mem.alloc(int(np.prod(native)))
    k.labels_native_argmax(mem.put(acc), mem.put(norm) if with_norm else 0, channels, grid, labels, native,
                           mem.new_stream())
    same(mem.get(labels, native, np.uint8), expected, exact)
    if channels > 1 and np.prod(native) > 50:
        assert len(np.unique(expected)) > 1  # the case has a boundary to place


def check_ties(k: Kernels, mem: Memory, channels: int) -> None:
    """Exact ties go to the lowest channel (numpy's strict >), and for two classes p1 − p0 = 0 is 0."""
    grid, native = (3, 4, 5), (5, 7, 9)
    acc = np.full((channels, *grid), 0.25, dtype=F)
    acc[:, 0] = 0.0  # ties everywhere but in the last slice
    acc[1:, 2] = 0.5
    labels = mem.alloc(int(np.prod(native)))
    k.labels_native_argmax(mem.put(acc), 0, channels, grid, labels, native, mem.new_stream())
    got = mem.get(labels, native, np.uint8)
    same(got, labels_on_native_grid(acc, native), True)
    assert (got[0] == 0).all() and (got[-1] == 1).all()


def check_norm_before_interpolation(k: Kernels, mem: Memory) -> None:
    """Why the kernel divides each corner by its norm: a positive factor per voxel keeps that voxel's own
    label, but interpolation mixes voxels whose weight sums differ (tile overlaps), so interpolating acc
    instead of acc / norm moves the boundary."""
    acc = np.array([[[[0.45, 0.08]]], [[[0.55, 0.02]]]], dtype=F)  # (K=2, 1, 1, 2)
    norm = np.array([[[1.0, 0.1]]], dtype=F)  # p: voxel 0 (0.45, 0.55), p1 − p0 = +0.1; voxel 1 (0.8, 0.2), −0.6
    native = (1, 1, 3)  # the middle voxel: (0.1 − 0.6) / 2 < 0 normalised, (0.1 − 0.06) / 2 > 0 from acc alone
    stream = mem.new_stream()
    with_norm, without = mem.alloc(3), mem.alloc(3)
    acc_ptr = mem.put(acc)
    k.labels_native_argmax(acc_ptr, mem.put(norm), 2, (1, 1, 2), with_norm, native, stream)
    k.labels_native_argmax(acc_ptr, 0, 2, (1, 1, 2), without, native, stream)
    got = mem.get(with_norm, native, np.uint8)
    same(got, labels_on_native_grid(acc / norm, native), True)
    assert got.tolist() == [[[1, 0, 0]]]
    assert mem.get(without, native, np.uint8).tolist() == [[[1, 1, 0]]]


THRESHOLDS = [0.5, 0.1, 0.7300000001]


def check_threshold(k: Kernels, mem: Memory, threshold: float) -> None:
    """Compared in float32 as numpy compares a float32 array with a Python float (labels exact)."""
    t = F(threshold)
    probs = np.random.default_rng(3).random(999).astype(F)
    probs[:3] = [t, np.nextafter(t, F(1)), np.nextafter(t, F(0))]
    labels = mem.alloc(probs.size)
    k.threshold_sigmoid(mem.put(probs), labels, probs.size, threshold, 7, mem.new_stream())
    expected = np.where(probs > threshold, 7, 0).astype(np.uint8)
    same(mem.get(labels, probs.shape, np.uint8), expected, True)
    assert expected[:3].tolist() == [0, 7, 0]


# ----------------------------------------------------------------------------------- single block
BLOCKS: list[tuple[Shape, Shape]] = [
    ((5, 6, 7), (8, 8, 8)),  # smaller, odd in an even block
    ((9, 4, 3), (6, 6, 5)),  # larger along z: keeps its centre
    ((11, 13, 2), (4, 5, 7)),
    ((1, 1, 1), (3, 2, 1)),
    ((4, 4, 4), (4, 4, 4)),
]


def check_place_in_block(k: Kernels, mem: Memory, shape: Shape, block: Shape) -> None:
    image = smooth(shape, 8).astype(F)
    out = mem.alloc(4 * int(np.prod(block)))
    k.place_in_block(mem.put(image), shape, out, block, -0.75, mem.new_stream())
    same(mem.get(out, block, F), place_in_block(image, block, -0.75)[0, 0], True)  # copies: exact


# ---------------------------------------------------------------------------- resident pipeline
#: A DeviceEngine factory: (tile, channels, max_batch, output_shape) → engine on the Memory's pointers.
EngineFactory = Callable[[Shape, int, int, Shape], Any]


def bundle_like(pre: Preprocess, window: Window) -> types.SimpleNamespace:
    """What segment._sliding reads of a Bundle."""
    return types.SimpleNamespace(preprocess=pre, window=window)


def volume_like(voxels: np.ndarray, spacing: tuple[float, float, float]) -> types.SimpleNamespace:
    """What segment._sliding reads of a Volume."""
    return types.SimpleNamespace(voxels=voxels, geometry=types.SimpleNamespace(spacing=spacing, shape=voxels.shape))


SLIDING = [
    # native shape, dtype, spacing, target spacing, patch, overlap, channels, max_batch
    ((23, 40, 37), np.int16, (2.5, 0.8, 0.9), (3.0, 1.5, 1.7), (8, 12, 16), 0.5, 2, 3),
    ((23, 40, 37), np.float32, (2.5, 0.8, 0.9), (3.0, 1.5, 1.7), (8, 12, 16), 0.5, 3, 4),
    ((9, 30, 31), np.int16, (5.0, 0.7, 0.7), None, (8, 8, 8), 0.25, 2, 1),  # spacing None: normalise only
    ((4, 17, 15), np.int16, (1.0, 1.0, 1.0), (0.5, 2.0, 1.0), (6, 6, 6), 0.5, 3, 7),
]
SLIDING_PRE = dict(clip=(-200.0, 300.0), scale=1 / 250.0, offset=-50.0)


def check_resident_sliding(device: Any, make_engine: EngineFactory, case: tuple[Any, ...], exact: bool) -> Any:
    """ResidentPipeline.sliding_labels against segment._sliding with the same network in numpy; returns
    the engine (for the caller's checks of what it was given)."""
    shape, dtype, spacing, target, patch, overlap, channels, max_batch = case
    pre = Preprocess(spacing_mm=target, **SLIDING_PRE)  # type: ignore[arg-type]
    window = Window(patch=patch, overlap=overlap, batch=2)
    voxels = ct(shape, dtype, seed=shape[1])
    expected = _sliding(volume_like(voxels, spacing), bundle_like(pre, window), NumpyEngine(patch, channels))  # type: ignore[arg-type]
    assert len(np.unique(expected)) > 1
    engine = make_engine(patch, channels, max_batch, patch)
    pipeline = ResidentPipeline(engine, device)
    got = pipeline.sliding_labels(voxels, spacing, pre, window)
    assert got.dtype == np.uint8
    same(got, expected, exact)
    model = shape if target is None else model_grid_shape(shape, spacing, target)
    n_tiles = len(tile_corners(model, patch, overlap))
    assert engine.batches == [min(max_batch, n_tiles - b) for b in range(0, n_tiles, max_batch)]
    assert all(s is pipeline.stream for s in engine.streams)
    pipeline.close()
    return engine


def check_resident_reuse(device: Any, make_engine: EngineFactory, exact: bool) -> tuple[int, int]:
    """One pipeline, several volumes (big, smaller, big, bigger): every result right. Returns the number
    of device allocations after the first volume and after the last (equal until the bigger one)."""
    pre = Preprocess(spacing_mm=(2.0, 2.0, 2.0), **SLIDING_PRE)  # type: ignore[arg-type]
    window = Window(patch=(6, 6, 6), overlap=0.5, batch=2)
    pipeline = ResidentPipeline(make_engine((6, 6, 6), 2, 2, (6, 6, 6)), device)
    spacing = (1.0, 1.0, 1.0)
    held = []
    for shape, seed in [((20, 22, 18), 1), ((15, 21, 16), 2), ((20, 22, 18), 3), ((26, 22, 18), 4)]:
        voxels = ct(shape, np.int16, seed)
        expected = _sliding(volume_like(voxels, spacing), bundle_like(pre, window), NumpyEngine((6, 6, 6)))  # type: ignore[arg-type]
        same(pipeline.sliding_labels(voxels, spacing, pre, window), expected, exact)
        held.append(dict(pipeline._buffers))
    assert held[0] == held[1] == held[2], "buffers were reallocated for volumes that fit"
    assert held[3] != held[2]  # the bigger volume needed bigger ones
    pipeline.close()
    return len(held[0]), len(held[3])


SINGLE = [
    # image shape, dtype, spacing, block, output margin, activation, channels
    ((13, 22, 19), np.int16, (2.0, 1.0, 1.0), (8, 12, 12), 0, "sigmoid", 2),
    ((13, 22, 19), np.float32, (2.0, 1.0, 1.0), (8, 16, 12), 2, "softmax", 3),
    ((5, 9, 30), np.int16, (1.5, 1.5, 0.8), (6, 10, 8), 1, "softmax", 2),
    ((5, 9, 30), np.float32, (1.5, 1.5, 0.8), (6, 10, 8), 1, "sigmoid", 3),
]


def check_resident_single_block(device: Any, make_engine: EngineFactory, case: tuple[Any, ...], exact: bool) -> None:
    """ResidentPipeline.single_block_channels against block.py's steps from the resampling on (after the
    median): resample_centred → normalise → place_in_block → run → image_probabilities → threshold/argmax."""
    shape, dtype, spacing, block, margin, activation, channels = case
    pre = Preprocess(spacing_mm=(2.5, 1.7, 1.9), clip=(-100.0, 200.0), scale=1 / 150.0, offset=-50.0)
    window = Window(patch=block, overlap=0.0, batch=1, mode=WindowMode.SINGLE_BLOCK, block=block, output_margin=margin,
                    pad_value=-0.4 if margin else None)
    out_shape = tuple(b - 2 * margin for b in block)
    image = ct(shape, dtype, seed=shape[2])
    values = list(range(1, channels + 1)) if activation == "sigmoid" else list(range(1, channels))
    threshold = 0.45

    model_image = normalise(resample_centred(image, spacing, pre.spacing_mm), pre)  # type: ignore[arg-type]
    pad = window.pad_value if window.pad_value is not None else (pre.clip[0] + pre.offset) * pre.scale
    output = NumpyEngine(block, channels, out_shape).run(place_in_block(model_image, block, pad))
    probabilities = image_probabilities(output[0], model_image.shape, block, margin)
    if activation == "sigmoid":
        expected = [(v, probabilities[i] > threshold) for i, v in enumerate(values)]
    else:
        best = np.argmax(probabilities, axis=0)
        expected = [(v, best == v) for v in values]
    assert any(e.any() and not e.all() for _, e in expected)

    pipeline = ResidentPipeline(make_engine(block, channels, 1, out_shape), device)
    got, model = pipeline.single_block_channels(image, spacing, pre, window, Activation(activation), threshold, values)
    pipeline.close()
    assert model == model_image.shape
    assert [v for v, _ in got] == values
    for (_, g), (_, e) in zip(got, expected, strict=True):
        assert g.dtype == bool
        same(g.astype(np.uint8), e.astype(np.uint8), exact)

