"""TotalSegmentator's own resampling, without TotalSegmentator: ``[preprocess] resampling = "totalseg"``.

TotalSegmentator (2.18, ``nnunet.nnUNet_predict_image`` and ``resampling.change_spacing``) does not let
nnU-Net resample: it brings the image to the task's spacing itself, so nnU-Net's own resampling finds
nothing to do (same shape in, same shape out). Step by step, for one network of a task:

1. reorient to the closest canonical RAS (the node: ``[preprocess] orientation``, node.infer.orient);
2. ``scipy.ndimage.zoom(order=1, mode="nearest")`` to ``round(n · spacing / target)`` voxels per axis: linear
   interpolation with the end voxel centres aligned (``grid_mode=False``) — the node's
   :func:`node.infer.transforms.resample_linear` — then ``astype(np.int32)``: every value rounded toward
   zero. A volume already at the target spacing is not touched (no rounding either);
3. nnU-Net: CT normalisation, sliding window, softmax, argmax — on the model grid;
4. the label map back to the native shape with ``zoom(order=0)``: nearest neighbour, end voxel centres
   aligned (:func:`labels_to_native`), then the reorientation undone.

Only the resampling is here; orientation, normalisation and the window are the node's ordinary steps.
"""

from __future__ import annotations

import numpy as np

from node.infer.transforms import model_grid_shape, normalise, resample_linear
from node.model.bundle import Preprocess

Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]


def to_model_grid_totalseg(voxels: np.ndarray, spacing: Spacing, pre: Preprocess) -> np.ndarray:
    """The normalised network input as TotalSegmentator makes it (steps 2 and 3's normalisation)."""
    if pre.spacing_mm is None or tuple(float(s) for s in spacing) == tuple(float(t) for t in pre.spacing_mm):
        return normalise(np.array(voxels, dtype=np.float32, copy=True), pre)  # change_spacing returns it as is
    image = resample_linear(voxels, model_grid_shape(voxels.shape, spacing, pre.spacing_mm))
    if image is voxels:
        image = image.copy()
    np.trunc(image, out=image)  # TotalSegmentator's astype(np.int32) after the zoom
    return normalise(image, pre)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """scipy ``zoom(order=0, grid_mode=False)``'s source index for each output index: the end voxel centres
    map onto each other, and a coordinate is rounded half up (``floor(x + 0.5)``)."""
    if n_out == 1 or n_in == 1:
        return np.zeros(n_out, dtype=np.int64)
    factor = (n_in - 1) / (n_out - 1)
    index = np.floor(np.arange(n_out, dtype=np.float64) * factor + 0.5).astype(np.int64)
    return np.clip(index, 0, n_in - 1)


def labels_to_native(labels: np.ndarray, native_shape: Shape) -> np.ndarray:
    """A (d, h, w) label map on the model grid → (D, H, W) on the native grid, nearest neighbour with the end
    voxel centres aligned (TotalSegmentator's ``change_spacing(order=0)`` back to the input's shape)."""
    if tuple(labels.shape) == tuple(native_shape):
        return labels
    iz, iy, ix = (_nearest_index(n, m) for n, m in zip(labels.shape, native_shape, strict=True))
    return np.ascontiguousarray(labels[np.ix_(iz, iy, ix)])


def argmax_labels(probabilities: np.ndarray) -> np.ndarray:
    """(K, d, h, w) probabilities → (d, h, w) uint8 argmax, on the model grid (nnU-Net's export)."""
    return np.argmax(probabilities, axis=0).astype(np.uint8)
