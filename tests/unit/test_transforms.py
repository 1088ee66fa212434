"""Each fast transform against its straightforward scipy twin."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from node.infer.transforms import fill_holes_per_slice, labels_on_native_grid, resample_linear, resample_slices_at
from node.infer.window import sliding_window, tile_starts


@pytest.mark.parametrize("out_shape", [(7, 19, 23), (20, 40, 9), (11, 13, 17)])
def test_resample_linear_equals_scipy_affine(out_shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(11, 13, 17)).astype(np.float32)
    scale = [(i - 1) / (o - 1) for i, o in zip(image.shape, out_shape, strict=True)]
    expected = ndimage.affine_transform(image, np.array(scale), output_shape=out_shape, order=1, mode="nearest")
    assert np.allclose(resample_linear(image, out_shape), expected, atol=1e-5)


def test_resample_slices_at_uneven_positions_equals_numpy_interp() -> None:
    """An uneven stack (slices at 0, 4, 8, 9.08, 16.08 mm) to regular planes: per pixel, np.interp."""
    rng = np.random.default_rng(3)
    along = np.array([0.0, 4.0, 8.0, 9.08, 16.08])
    image = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    targets = np.linspace(0.0, 16.08, 12)
    out = resample_slices_at(image, along, targets)
    expected = np.apply_along_axis(lambda v: np.interp(targets, along, v), 0, image.astype(np.float64))
    assert out.dtype == np.float32 and np.allclose(out, expected, atol=1e-3)


def test_two_class_labels_equal_argmax_of_resampled_channels() -> None:
    rng = np.random.default_rng(1)
    p1 = rng.uniform(size=(5, 8, 8)).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    out_shape = (9, 15, 15)
    channels = np.stack([resample_linear(c, out_shape) for c in probs])
    assert np.array_equal(labels_on_native_grid(probs, out_shape), channels.argmax(axis=0).astype(np.uint8))


def test_fill_holes_per_slice_equals_binary_fill_holes() -> None:
    rng = np.random.default_rng(2)
    mask = ndimage.binary_opening(rng.uniform(size=(6, 40, 40)) > 0.35)
    expected = np.stack([ndimage.binary_fill_holes(m) for m in mask])
    assert np.array_equal(fill_holes_per_slice(mask), expected)


class _Identity:
    name = "identity"

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return np.concatenate([1 - tiles, tiles], axis=1)


def test_sliding_window_reassembles_the_image() -> None:
    rng = np.random.default_rng(3)
    image = rng.uniform(size=(10, 37, 29)).astype(np.float32)
    out = sliding_window(image, _Identity(), patch=(4, 16, 16), overlap=0.25, batch=3, pad_value=0.0)
    assert out.shape == (2, 10, 37, 29)
    assert np.allclose(out[1], image, atol=1e-5)
    assert tile_starts(37, 16, 12) == [0, 10, 21]  # 3 tiles spread evenly, as nnU-Net places them
