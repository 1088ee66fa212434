"""``resampling = "nnunet"``: the node's scipy reimplementation against nnU-Net v2's own functions.

nnunetv2 is imported only here (the ``[import]`` extra); the node never needs it at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.infer.resample_nnunet import (
    compute_new_shape,
    native_labels,
    nonzero_box,
    resample_to_shape,
    separate_axis,
    to_network_grid,
)
from node.infer.transforms import zscore
from node.model.bundle import NnunetResampling, Preprocess
from node.model.enums import Resampling


def _nnunet() -> Any:
    """nnU-Net's resampling module; the test is skipped where nnunetv2 is not installed."""
    return pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling",
                               reason="nnunetv2 (the [import] extra) not installed")


def _theirs(image: np.ndarray, shape: tuple[int, int, int], current: tuple[float, float, float],
            new: tuple[float, float, float], order: int, order_z: int) -> np.ndarray:
    out = _nnunet().resample_data_or_seg_to_shape(image[None], shape, current, new, is_seg=False, order=order,
                                                  order_z=order_z, force_separate_z=None)
    return np.asarray(out[0])


def _smooth_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Blobs with sharp edges and noise: spline overshoot (clipped) and edges both occur."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 30.0, size=shape)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    image += 400.0 * (((z - shape[0] / 2) ** 2 / 9 + (y - shape[1] / 3) ** 2 / 40 + (x - shape[2] / 2) ** 2 / 60) < 4)
    return image.astype(np.float32)


@pytest.mark.parametrize(("shape", "current", "new", "order", "order_z"), [
    ((20, 50, 47), (2.0, 0.98, 0.98), (2.0, 1.5, 1.5), 3, 0),   # in-plane only, one 3D spline
    ((20, 50, 47), (2.0, 0.98, 0.98), (1.5, 1.5, 1.5), 3, 0),   # all axes, isotropic-ish
    ((9, 48, 40), (5.0, 0.8, 0.8), (1.5, 1.5, 1.5), 3, 0),      # anisotropy 6.25: separate z, order 0 along it
    ((9, 48, 40), (5.0, 0.8, 0.8), (1.5, 1.5, 1.5), 3, 1),      # order_z 1
    ((12, 33, 31), (1.5, 1.5, 1.5), (2.0, 0.98, 0.98), 1, 0),   # probabilities back: order 1
    ((30, 21, 24), (1.5, 3.0, 3.0), (5.0, 0.7, 0.7), 1, 0),     # back to an anisotropic grid: separate axis 0
    ((14, 20, 20), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), 0, 0),     # nearest
])
def test_resampling_equals_nnunets_resample_data_or_seg_to_shape(
        shape: tuple[int, int, int], current: tuple[float, float, float], new: tuple[float, float, float],
        order: int, order_z: int) -> None:
    image = _smooth_volume(shape, seed=order * 10 + order_z)
    target = compute_new_shape(shape, current, new)
    assert target == tuple(_nnunet().compute_new_shape(shape, current, new))
    ours = resample_to_shape(image, target, current, new, order, order_z, NnunetResampling())
    theirs = _theirs(image, target, current, new, order, order_z)
    assert ours.shape == theirs.shape == target and ours.dtype == np.float32
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * scale, float(np.abs(ours - theirs).max())


def test_the_separate_axis_is_nnunets() -> None:
    cases = [((5.0, 0.8, 0.8), (1.5, 1.5, 1.5)), ((1.0, 1.0, 1.0), (1.0, 4.0, 1.0)),
             ((2.0, 0.98, 0.98), (2.0, 1.5, 1.5)), ((0.24, 1.25, 1.25), (3.5, 1.0, 1.0)),
             ((4.0, 4.0, 1.0), (4.0, 4.0, 1.0))]
    for current, new in cases:
        do, axis = _nnunet().determine_do_sep_z_and_axis(None, current, new)
        assert separate_axis(current, new, NnunetResampling()) == (axis if do else None), (current, new)
    forced = NnunetResampling(force_separate_z=True)
    assert separate_axis((3.0, 1.0, 1.0), (1.0, 1.0, 1.0), forced) == 0


def test_nonzero_box_and_zscore_equal_nnunets() -> None:
    _nnunet()
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    image = np.zeros((10, 30, 28), np.float32)
    image[2:9, 4:25, 3:20] = _smooth_volume((7, 21, 17), seed=3) + 100.0
    image[5, 10, 10] = 0.0  # a hole inside the mask: filled, so normalised
    data, seg, bbox = crop_to_nonzero(image[None])
    box = nonzero_box(image)
    assert [(s.start, s.stop) for s in box] == [tuple(b) for b in bbox]
    for nonzero_mask in (False, True):
        theirs = ZScoreNormalization(use_mask_for_norm=nonzero_mask, intensityproperties={}).run(data[0].copy(), seg[0])
        ours = zscore(image[box].copy(), nonzero_mask)
        assert np.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_the_network_grid_maps_back_onto_the_native_voxels(transpose: tuple[int, int, int]) -> None:
    """Crop to nonzero, transpose, centred padding to the patch, and back: a "network" that thresholds its input
    must give, on the native grid, the threshold of the native voxels (0 outside the nonzero box)."""
    voxels = np.zeros((12, 40, 36), np.int16)
    voxels[1:11, 5:30, 2:33] = (_smooth_volume((10, 25, 31), seed=5) - 50).astype(np.int16)
    pre = Preprocess(spacing_mm=None, clip=(-1000.0, 1000.0), scale=1.0, offset=0.0, resampling=Resampling.NNUNET,
                     transpose=transpose)
    grid = to_network_grid(voxels, (2.0, 1.0, 1.0), pre, patch=(32, 32, 32), pad_value=0.0)
    assert all(n >= 32 for n in grid.image.shape)
    above = (grid.image > 100).astype(np.float32)
    labels = native_labels(np.stack([1.0 - above, above]), grid, pre)
    assert np.array_equal(labels, (voxels > 100).astype(np.uint8))
