"""nnU-Net v2's own preprocessing and export, without torch or nnunetv2: ``[preprocess] resampling = "nnunet"``.

What ``nnUNetPredictor.predict_single_npy_array`` does to a volume (DefaultPreprocessor.run_case_npy and
export_prediction.convert_predicted_logits_to_segmentation_with_correct_shape), step by step:

1. transpose the array by ``transpose_forward``;
2. crop to the bounding box of the nonzero voxels (``crop_to_nonzero``; the box of the filled nonzero mask
   is the box of the nonzero voxels); labels outside it are 0;
3. normalise (CT: clip, then (x − mean) / std; z-score: per image, optionally inside the filled nonzero
   mask) — before resampling, as nnU-Net does;
4. resample to ``compute_new_shape`` with ``resample_data_or_seg_to_shape``: a spline of order 3 (skimage
   ``resize``: scipy ``zoom`` with ``grid_mode=True``, edges replicated, the result clipped to the input's
   range), or, when the spacing's anisotropy exceeds 3, order 3 in-plane slice by slice and order 0 along
   the low-resolution axis;
5. pad centred to at least the patch (``pad_nd_image``), sliding window;
6. the logits back to the cropped native shape with order 1 (order 0 along a separate axis), argmax.

The splines are computed axis by axis (a tensor-product B-spline is separable: the same values as scipy's
N-D ``zoom`` up to rounding, at a fraction of its 4³ taps per voxel). Step 6 interpolates the log of the
node's probabilities: they differ from the logits by one value per voxel, which linear interpolation
carries to every class alike, so the argmax is the logits' argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.infer.transforms import normalise, zscore
from node.model.bundle import NnunetResampling, Preprocess
from node.model.enums import IntensityScheme

Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]
#: Edge padding before the spline prefilter, as scipy pads for mode "nearest" (``_prepad_for_spline_filter``).
SPLINE_PAD = 12
TINY = float(np.finfo(np.float32).tiny)  # probabilities below this are 0 in float32: log(0) would be -inf


def compute_new_shape(shape: Shape, spacing: Spacing, target: Spacing) -> Shape:
    """nnU-Net's ``compute_new_shape``: round(spacing / target · n) per axis."""
    return tuple(int(round(s / t * n)) for n, s, t in zip(shape, spacing, target, strict=True))  # type: ignore[return-value]


def _anisotropic(spacing: Spacing, threshold: float) -> bool:
    return bool(max(spacing) / min(spacing) > threshold)


def _lowres_axis(spacing: Spacing) -> int | None:
    axes = [a for a in range(3) if max(spacing) / spacing[a] == 1]
    return axes[0] if len(axes) == 1 else None  # two or three equal coarsest axes: no separate axis


def separate_axis(current: Spacing, new: Spacing, settings: NnunetResampling) -> int | None:
    """The axis resampled separately (order_z), or None: nnU-Net's ``determine_do_sep_z_and_axis``."""
    if settings.force_separate_z is not None:
        return _lowres_axis(current) if settings.force_separate_z else None
    if _anisotropic(current, settings.anisotropy_threshold):
        return _lowres_axis(current)
    if _anisotropic(new, settings.anisotropy_threshold):
        return _lowres_axis(new)
    return None


def _coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of each output voxel, grids sharing their outer edges (``grid_mode=True``)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1.0, 2.0 / 3.0 - t * t + t * t * t / 2.0, np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))


def _zoom_axis(image: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """scipy ``zoom(..., order, mode="nearest", grid_mode=True)`` along one axis, float32."""
    n_in = image.shape[axis]
    u = _coordinates(n_in, n_out)
    shape = [1, 1, 1]
    shape[axis] = n_out
    if order == 0:
        index = np.clip(np.floor(u + 0.5).astype(np.int64), 0, n_in - 1)
        return np.take(image, index, axis=axis)
    if order == 1:
        x = np.clip(u, 0.0, n_in - 1)
        lo = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
        hi = np.minimum(lo + 1, n_in - 1)
        w = (x - lo).astype(np.float32).reshape(shape)
        low = np.take(image, lo, axis=axis)
        high = np.take(image, hi, axis=axis)
        high -= low
        high *= w
        low += high
        return low
    pad = [(0, 0)] * 3
    pad[axis] = (SPLINE_PAD, SPLINE_PAD)
    coefficients = ndimage.spline_filter1d(np.pad(image, pad, mode="edge"), order=3, axis=axis, mode="mirror",
                                           output=np.float32)
    first = np.floor(u).astype(np.int64)
    out: np.ndarray | None = None
    for k in (-1, 0, 1, 2):
        tap = np.take(coefficients, first + k + SPLINE_PAD, axis=axis)
        tap *= _bspline3(u - (first + k)).astype(np.float32).reshape(shape)
        out = tap if out is None else np.add(out, tap, out=out)
    assert out is not None
    return out


def _zoom(image: np.ndarray, new_shape: Shape, order: int, axes: tuple[int, ...]) -> np.ndarray:
    """Resample ``axes`` of a float32 volume to ``new_shape`` (the others keep their size), shrinking first."""
    out = image
    for axis in sorted(axes, key=lambda a: new_shape[a] / image.shape[a]):
        if out.shape[axis] != new_shape[axis]:
            out = _zoom_axis(out, axis, new_shape[axis], order)
    return out


def resample_to_shape(image: np.ndarray, new_shape: Shape, current: Spacing, new: Spacing, order: int,
                      order_z: int, settings: NnunetResampling) -> np.ndarray:
    """One channel through nnU-Net's ``resample_data_or_seg_to_shape`` (``is_seg=False``), as float32."""
    image = np.asarray(image, dtype=np.float32)
    if tuple(image.shape) == tuple(new_shape):
        return image
    axis = separate_axis(current, new, settings)
    if axis is None:
        out = _zoom(image, new_shape, order, (0, 1, 2))
        if order > 1:  # skimage resize clips a spline's overshoot to the input's range
            np.clip(out, image.min(), image.max(), out=out)
        return np.ascontiguousarray(out)
    in_plane = tuple(a for a in range(3) if a != axis)
    out = _zoom(image, new_shape, order, in_plane)
    if order > 1:  # resized slice by slice, each clipped to its own range
        reduce = in_plane
        np.clip(out, image.min(axis=reduce, keepdims=True), image.max(axis=reduce, keepdims=True), out=out)
    if out.shape[axis] != new_shape[axis]:
        out = _zoom_axis(out, axis, new_shape[axis], order_z)
    return np.ascontiguousarray(out)


def nonzero_box(voxels: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the nonzero voxels (nnU-Net's ``crop_to_nonzero``); the whole array if none are."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(np.any(voxels != 0, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if len(hits) else slice(0, voxels.shape[axis]))
    return box[0], box[1], box[2]


@dataclass(frozen=True)
class NetworkGrid:
    """A volume on the network's grid, and how its probabilities go back."""

    image: np.ndarray  # (transposed, cropped, normalised, resampled, padded) float32, network axis order
    native_shape: Shape
    box: tuple[slice, slice, slice]  # the nonzero box, native axes
    cropped_shape: Shape  # the box's shape, network axes
    cropped_spacing: Spacing  # network axes
    model_spacing: Spacing | None  # network axes; None: no resampling
    inside: tuple[slice, slice, slice]  # the image's voxels inside the centred padding


def to_network_grid(voxels: np.ndarray, spacing: Spacing, pre: Preprocess, patch: Shape,
                    pad_value: float) -> NetworkGrid:
    """nnU-Net's preprocessing of ``voxels`` (steps 1-5 of the module's docstring)."""
    forward = pre.transpose
    box = nonzero_box(voxels)
    image = np.ascontiguousarray(voxels[box].transpose(forward), dtype=np.float32)
    if image is voxels or np.shares_memory(image, voxels):
        image = image.copy()
    cropped: Shape = image.shape
    current: Spacing = (spacing[forward[0]], spacing[forward[1]], spacing[forward[2]])
    if pre.normalisation is IntensityScheme.FIXED:
        image = normalise(image, pre)
    else:
        image = zscore(image, pre.normalisation is IntensityScheme.ZSCORE_NONZERO)
    target: Spacing | None = None
    if pre.spacing_mm is not None:
        target = (pre.spacing_mm[forward[0]], pre.spacing_mm[forward[1]], pre.spacing_mm[forward[2]])
        s = pre.nnunet
        image = resample_to_shape(image, compute_new_shape(cropped, current, target), current, target, s.order,
                                  s.order_z, s)
    below = [max(p - n, 0) // 2 for n, p in zip(image.shape, patch, strict=True)]
    inside = tuple(slice(b, b + n) for b, n in zip(below, image.shape, strict=True))
    if any(max(p - n, 0) for n, p in zip(image.shape, patch, strict=True)):  # pad_nd_image: centred
        padded = np.full(tuple(max(n, p) for n, p in zip(image.shape, patch, strict=True)), pad_value, np.float32)
        padded[inside] = image
        image = padded
    return NetworkGrid(image=image, native_shape=voxels.shape, box=box, cropped_shape=cropped,
                       cropped_spacing=current, model_spacing=target, inside=inside)  # type: ignore[arg-type]


def _back(channel: np.ndarray, grid: NetworkGrid, settings: NnunetResampling) -> np.ndarray:
    if grid.model_spacing is None:
        return channel
    return resample_to_shape(channel, grid.cropped_shape, grid.model_spacing, grid.cropped_spacing,
                             settings.probabilities_order, settings.probabilities_order_z, settings)


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probabilities, TINY))


def native_labels(probabilities: np.ndarray, grid: NetworkGrid, pre: Preprocess) -> np.ndarray:
    """(K, …) probabilities on the network grid → uint8 argmax on the native grid (step 6, then the crop and
    the transpose undone)."""
    probabilities = probabilities[(slice(None), *grid.inside)]
    settings = pre.nnunet
    if probabilities.shape[0] == 2:  # one resampling: the sign of the difference of the two log-probabilities
        labels = (_back(_log(probabilities[1]) - _log(probabilities[0]), grid, settings) > 0).astype(np.uint8)
    else:
        best: np.ndarray | None = None
        labels = np.zeros(grid.cropped_shape, dtype=np.uint8)
        for k in range(probabilities.shape[0]):
            channel = _back(_log(np.ascontiguousarray(probabilities[k])), grid, settings)
            if best is None:
                best = channel.copy()
                continue
            better = channel > best
            labels[better] = k
            np.maximum(best, channel, out=best)
    backward = tuple(int(a) for a in np.argsort(pre.transpose))
    out = np.zeros(grid.native_shape, dtype=np.uint8)
    out[grid.box] = labels.transpose(backward)
    return out
