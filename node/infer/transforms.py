"""Pre- and post-processing in voxel space: resampling, intensity normalisation, label clean-up.

Resampling works on the volume's own (slice, row, column) axes with its spacing, so it needs no
knowledge of the patient orientation; the label volume comes back on exactly the source grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.model.bundle import Postprocess, Preprocess
from node.model.enums import IntensityScheme


def model_grid_shape(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     target: tuple[float, float, float]) -> tuple[int, int, int]:
    """Shape of the volume resampled from ``spacing`` to ``target`` mm, covering the same extent."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=False))  # type: ignore[return-value]


def _corner_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of linear interpolation that maps the end voxel centres onto each other."""
    if n_out == 1:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32)
    x = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    return lo, (x - lo).astype(np.float32)


def resample_linear(image: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling of a (D, H, W) volume to ``out_shape``, end voxel centres aligned.

    End voxel centres map onto each other (``align_corners``), so the label volume lands on exactly
    the source grid. Separable: per axis two gathers and a blend (:func:`_blend`), shrinking axes first.
    """
    if tuple(image.shape) == tuple(out_shape):
        return image.astype(np.float32, copy=False)
    out = np.asarray(image, dtype=np.float32)
    for axis in sorted(range(3), key=lambda a: out_shape[a] / out.shape[a]):
        n_in = out.shape[axis]
        if n_in == out_shape[axis]:
            continue
        if n_in == 1:
            out = np.repeat(out, out_shape[axis], axis=axis)
        else:
            out = _blend(out, axis, *_corner_weights(n_in, out_shape[axis]))
    return np.ascontiguousarray(out)


def normalise(voxels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """x' = (clip(x, lo, hi) + offset) * scale, as float32 (in place when given float32)."""
    out = voxels if voxels.dtype == np.float32 else voxels.astype(np.float32)
    np.clip(out, pre.clip[0], pre.clip[1], out=out)
    out += np.float32(pre.offset)
    out *= np.float32(pre.scale)
    return out


def zscore(image: np.ndarray, nonzero_mask: bool) -> np.ndarray:
    """nnU-Net's ZScoreNormalization of a float32 image, in place: over the whole image, or (use_mask_for_norm)
    over the filled nonzero mask, leaving the rest as it is (0)."""
    if not nonzero_mask:
        mean, std = image.mean(), image.std()
        image -= mean
        image /= max(std, 1e-8)
        return image
    mask = ndimage.binary_fill_holes(image != 0)
    inside = image[mask]
    image[mask] = (inside - inside.mean()) / max(inside.std(), 1e-8)
    return image


def to_model_grid(voxels: np.ndarray, spacing: tuple[float, float, float], pre: Preprocess) -> np.ndarray:
    """Resample a native volume to the bundle's spacing, then normalise (on the smaller grid); a z-score
    normalises first, with the native image's mean and standard deviation."""
    if pre.normalisation is not IntensityScheme.FIXED:
        image = zscore(voxels.astype(np.float32, copy=True), pre.normalisation is IntensityScheme.ZSCORE_NONZERO)
        if pre.spacing_mm is None:
            return image
        return resample_linear(image, model_grid_shape(voxels.shape, spacing, pre.spacing_mm))
    if pre.spacing_mm is None:
        return normalise(voxels.astype(np.float32, copy=True), pre)
    image = resample_linear(voxels, model_grid_shape(voxels.shape, spacing, pre.spacing_mm))
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


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (6-connected unless ``structure`` says otherwise);
    an empty mask comes back as it is."""
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def postprocess(labels: np.ndarray, post: Postprocess, values: list[int], voxel_ml: float) -> np.ndarray:
    """Per label: keep the largest 3D component, fill holes slice by slice, drop tiny results."""
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        if post.largest_component:
            keep = largest_component(mask)
            labels[mask & ~keep] = 0
            mask = keep
        if post.fill_holes_2d:
            labels[fill_holes_per_slice(mask) & (labels == 0)] = value
            mask = labels == value
        if post.min_volume_ml > 0 and mask.sum() * voxel_ml < post.min_volume_ml:
            labels[mask] = 0
    return labels


def _centred_weights(n_in: int, n_out: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and its weight's complement for linear interpolation between two grids whose
    first voxels share an edge: output voxel i sits at input coordinate (i + 0.5)·ratio − 0.5
    (ratio = output / input spacing), clamped to the input's end voxels. Halving a grid (ratio 2)
    averages voxel pairs exactly."""
    x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * ratio - 0.5, 0.0, n_in - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
    return lo, (x - lo).astype(np.float32)


def _lerp_axis(image: np.ndarray, axis: int, n_out: int, ratio: float) -> np.ndarray:
    n_in = image.shape[axis]
    if n_in == 1:
        return np.repeat(image, n_out, axis=axis)
    lo, w = _centred_weights(n_in, n_out, ratio)
    return _blend(image, axis, lo, w)


def _blend(image: np.ndarray, axis: int, lo: np.ndarray, w: np.ndarray) -> np.ndarray:
    """image[lo]·(1 − w) + image[lo + 1]·w along ``axis``."""
    n_out = len(lo)
    shape = [1, 1, 1]
    shape[axis] = n_out
    w = w.reshape(shape)
    low = np.take(image, lo, axis=axis)
    high = np.take(image, lo + 1, axis=axis)
    high -= low
    high *= w
    low += high
    return low


def resample_centred(image: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float],
                     out_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Linear resampling of a (D, H, W) volume from ``spacing`` to ``target`` mm, grids edge-aligned.

    Unlike :func:`resample_linear` (end voxel centres aligned), the grids share the outer edge of
    their first voxel, so going 1.5 mm → 3 mm averages voxel pairs and going back with
    ``out_shape`` = the original shape lands every voxel where it came from. The default output
    shape covers the same extent: round(n · spacing / target). Each axis is two gathers and a
    blend (memory-bound, O(output)), shrinking axes first so the large arrays are made last.
    """
    if out_shape is None:
        out_shape = model_grid_shape(image.shape, spacing, target)
    out = np.asarray(image, dtype=np.float32)
    order = sorted(range(3), key=lambda a: out_shape[a] / out.shape[a])  # most shrinking first
    for axis in order:
        if out.shape[axis] != out_shape[axis] or spacing[axis] != target[axis]:
            out = _lerp_axis(out, axis, out_shape[axis], target[axis] / spacing[axis])
    return np.ascontiguousarray(out)


def mask_to_grid(mask: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float],
                 out_shape: tuple[int, int, int]) -> np.ndarray:
    """A boolean mask on an edge-aligned coarser grid → boolean mask on the ``target`` grid of
    ``out_shape`` (linear interpolation, > 0.5), computed only over the mask's bounding box: an organ
    fills a small part of a CT, and upsampling the whole grid would make hundreds of MB of zeros."""
    out = np.zeros(out_shape, dtype=bool)
    if not mask.any():
        return out
    image = mask.astype(np.float32)
    region = []
    for axis in range(3):
        n_in, n_out = mask.shape[axis], out_shape[axis]
        lo, w = _centred_weights(n_in, n_out, target[axis] / spacing[axis])
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        first, last = int(hits[0]), int(hits[-1])
        # Output voxels that can see a mask voxel: their lower neighbour is within [first − 1, last].
        keep = np.flatnonzero((lo >= first - 1) & (lo <= last))
        start, stop = int(keep[0]), int(keep[-1]) + 1
        base = max(0, first - 1)
        end = min(n_in, last + 2)
        sub_lo = np.clip(lo[start:stop] - base, 0, max(end - base - 2, 0))
        sub_w = np.where(lo[start:stop] - base == sub_lo, w[start:stop], np.where(lo[start:stop] < base, 0.0, 1.0))
        image = np.take(image, np.arange(base, end), axis=axis)
        if end - base == 1:
            image = np.repeat(image, stop - start, axis=axis)
        else:
            image = _blend(image, axis, sub_lo, sub_w.astype(np.float32))
        region.append(slice(start, stop))
    out[tuple(region)] = image > 0.5
    return out


def resample_slices_at(image: np.ndarray, along: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 0 of a (D, H, W) stack whose slices lie at ``along`` mm
    (increasing, possibly uneven) to slices at ``targets`` mm, as float32; targets beyond the ends
    take the end slice."""
    along = np.asarray(along, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if len(along) == 1:
        return np.repeat(np.asarray(image[:1], dtype=np.float32), len(targets), axis=0)
    lo = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, len(along) - 2)
    w = np.clip((targets - along[lo]) / (along[lo + 1] - along[lo]), 0.0, 1.0).astype(np.float32)
    out = np.take(image, lo, axis=0).astype(np.float32, copy=False)
    high = np.take(image, lo + 1, axis=0).astype(np.float32, copy=False)
    high -= out
    high *= w[:, None, None]
    out += high
    return out
