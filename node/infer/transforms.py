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


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation that maps the end voxel centres onto each other."""
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1 or n_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    x = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), n_in - 2)
    w = (x - lo).astype(np.float32)
    rows = np.arange(n_out)
    matrix[rows, lo] = 1.0 - w
    matrix[rows, lo + 1] += w
    return matrix


def resample_linear(image: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling of a (D, H, W) volume to ``out_shape`` as three matrix products.

    Separable linear interpolation is a product with one small interpolation matrix per axis; BLAS
    does that several times faster than ``scipy.ndimage.zoom`` on a 512×512×300 CT and uses all
    cores. End voxel centres map onto each other (``align_corners``), so the label volume lands on
    exactly the source grid.
    """
    if tuple(image.shape) == tuple(out_shape):
        return image.astype(np.float32, copy=False)
    d, h, w = image.shape
    out = np.asarray(image, dtype=np.float32)
    if w != out_shape[2]:
        out = out @ _interpolation_matrix(w, out_shape[2]).T
    if h != out_shape[1]:
        out = np.matmul(_interpolation_matrix(h, out_shape[1]), out)
    if d != out_shape[0]:
        flat = out.reshape(d, -1)
        out = (_interpolation_matrix(d, out_shape[0]) @ flat).reshape(out_shape[0], *out.shape[1:])
    return np.ascontiguousarray(out)


def normalise(voxels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """x' = (clip(x, lo, hi) + offset) * scale, as float32 (in place when given float32)."""
    out = voxels if voxels.dtype == np.float32 else voxels.astype(np.float32)
    np.clip(out, pre.clip[0], pre.clip[1], out=out)
    out += np.float32(pre.offset)
    out *= np.float32(pre.scale)
    return out


def to_model_grid(voxels: np.ndarray, spacing: tuple[float, float, float], pre: Preprocess) -> np.ndarray:
    """Resample a native volume to the bundle's spacing, then normalise (on the smaller grid)."""
    if pre.spacing_mm is None:
        return normalise(voxels.astype(np.float32, copy=True), pre)
    image = resample_linear(voxels, model_grid_shape(voxels.shape, spacing, pre.spacing_mm))  # type: ignore[arg-type]
    if image is voxels:
        image = image.copy()
    return normalise(image, pre)


def labels_on_native_grid(probabilities: np.ndarray, native_shape: tuple[int, int, int]) -> np.ndarray:
    """(K, d, h, w) class probabilities → (D, H, W) uint8 argmax on the native grid.

    Probabilities are interpolated linearly before the argmax (smoother than upsampling labels).
    Interpolation is linear, so for two classes comparing the interpolated channels equals the sign
    of the interpolated difference: one resampling instead of two.
    """
    if probabilities.shape[0] == 2:
        difference = resample_linear(probabilities[1] - probabilities[0], native_shape)
        return (difference > 0).astype(np.uint8)
    best = np.full(native_shape, -np.inf, dtype=np.float32)
    labels = np.zeros(native_shape, dtype=np.uint8)
    for k in range(probabilities.shape[0]):
        channel = resample_linear(np.ascontiguousarray(probabilities[k]), native_shape)
        better = channel > best
        labels[better] = k
        np.maximum(best, channel, out=best)
    return labels


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill, in every slice, the background regions not connected to that slice's border.

    One 3D labelling with in-plane connectivity only, instead of a fill per slice.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, n = ndimage.label(~mask, structure=in_plane)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[np.unique(edge)] = True
    outside[0] = False
    return ~outside[background]


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
            labels[fill_holes_per_slice(mask) & (labels == 0)] = value
            mask = labels == value
        if post.min_volume_ml > 0 and mask.sum() * voxel_ml < post.min_volume_ml:
            labels[mask] = 0
    return labels


def _centred_matrix(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights between two grids whose first voxels share an edge.

    Output voxel i sits at input coordinate (i + 0.5)·ratio − 0.5 (ratio = output / input spacing),
    clamped to the input's end voxels. Halving a grid (ratio 2) averages voxel pairs exactly.
    """
    x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * ratio - 0.5, 0.0, n_in - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    w = (x - lo).astype(np.float32)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    if n_in == 1:
        matrix[:, 0] = 1.0
        return matrix
    matrix[rows, lo] = 1.0 - w
    matrix[rows, lo + 1] += w
    return matrix


def resample_centred(image: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float],
                     out_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Linear resampling of a (D, H, W) volume from ``spacing`` to ``target`` mm, grids edge-aligned.

    Unlike :func:`resample_linear` (end voxel centres aligned), the grids share the outer edge of
    their first voxel, so going 1.5 mm → 3 mm averages voxel pairs and going back with
    ``out_shape`` = the original shape lands every voxel where it came from. The default output
    shape covers the same extent: round(n · spacing / target).
    """
    if out_shape is None:
        out_shape = model_grid_shape(image.shape, spacing, target)  # type: ignore[arg-type]
    out = np.asarray(image, dtype=np.float32)
    d, h, w = out.shape
    if w != out_shape[2] or spacing[2] != target[2]:
        out = out @ _centred_matrix(w, out_shape[2], target[2] / spacing[2]).T
    if h != out_shape[1] or spacing[1] != target[1]:
        out = np.matmul(_centred_matrix(h, out_shape[1], target[1] / spacing[1]), out)
    if d != out_shape[0] or spacing[0] != target[0]:
        flat = out.reshape(d, -1)
        out = (_centred_matrix(d, out_shape[0], target[0] / spacing[0]) @ flat).reshape(out_shape[0], *out.shape[1:])
    return np.ascontiguousarray(out)
