"""Pre- and post-processing in voxel space: resampling, intensity normalisation, label clean-up.

Resampling works on the volume's own (slice, row, column) axes with its spacing, so it needs no
knowledge of the patient orientation; the label volume comes back on exactly the source grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.infer.bundle import Postprocess, Preprocess


def model_grid_shape(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     target: tuple[float, float, float]) -> tuple[int, int, int]:
    """Shape of the volume resampled from ``spacing`` to ``target`` mm, covering the same extent."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def _resample(image: np.ndarray, out_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Linear/nearest resampling that maps voxel centres at the volume's ends onto each other."""
    if tuple(image.shape) == tuple(out_shape):
        return image
    scale = [(n_in - 1) / (n_out - 1) if n_out > 1 else 0.0 for n_in, n_out in zip(image.shape, out_shape)]
    return ndimage.affine_transform(
        image, np.array(scale), output_shape=out_shape, order=order, mode="nearest", prefilter=False
    )


def normalise(voxels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """x' = (clip(x, lo, hi) + offset) * scale, as float32."""
    out = np.clip(voxels, pre.clip[0], pre.clip[1]).astype(np.float32, copy=False)
    out += np.float32(pre.offset)
    out *= np.float32(pre.scale)
    return out


def to_model_grid(voxels: np.ndarray, spacing: tuple[float, float, float], pre: Preprocess) -> np.ndarray:
    """Normalise and resample a native volume to the bundle's spacing."""
    image = normalise(voxels, pre)
    if pre.spacing_mm is None:
        return image
    return _resample(image, model_grid_shape(image.shape, spacing, pre.spacing_mm), order=1)  # type: ignore[arg-type]


def labels_on_native_grid(probabilities: np.ndarray, native_shape: tuple[int, int, int]) -> np.ndarray:
    """(K, d, h, w) class probabilities → (D, H, W) uint8 argmax on the native grid.

    Probabilities are interpolated linearly before the argmax (smoother than upsampling labels),
    one channel at a time so memory stays at two native-sized float arrays.
    """
    best = np.full(native_shape, -np.inf, dtype=np.float32)
    labels = np.zeros(native_shape, dtype=np.uint8)
    for k in range(probabilities.shape[0]):
        channel = _resample(np.ascontiguousarray(probabilities[k]), native_shape, order=1)
        better = channel > best
        labels[better] = k
        np.maximum(best, channel, out=best)
    return labels


def postprocess(labels: np.ndarray, post: Postprocess, values: list[int], voxel_ml: float) -> np.ndarray:
    """Per label: keep the largest 3D component, fill holes slice by slice, drop tiny results."""
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        if post.largest_component:
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                keep = components == int(np.argmax(sizes))
                labels[mask & ~keep] = 0
                mask = keep
        if post.fill_holes_2d:
            for k in range(mask.shape[0]):
                if mask[k].any():
                    filled = ndimage.binary_fill_holes(mask[k])
                    labels[k][filled & (labels[k] == 0)] = value
            mask = labels == value
        if post.min_volume_ml > 0 and mask.sum() * voxel_ml < post.min_volume_ml:
            labels[mask] = 0
    return labels
