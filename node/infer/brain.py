"""Brain extraction on MR the way deepbet 1.0.2 does it (``combine = "deepbet"``, engines/brain-deepbet).

deepbet (MIT, University of Münster; ``deepbet/bet.py``, ``BrainExtraction.run_model`` and ``postprocess``)
works on the NIfTI array reoriented to the closest canonical RAS orientation (``nib.as_closest_canonical``:
array axis 0 patient right-ward, 1 anterior-ward, 2 superior-ward), whatever the voxel spacing:

1. ``x = nan_to_num(image)``; ``x_small`` = x resized to 128³ by nearest-exact sampling (PyTorch
   ``F.interpolate(mode="nearest-exact")``: source index ``floor((i + 0.5) · n_in / n_out)``);
2. ``low, high`` = the 0.5 and 99.5 percentiles of ``x_small`` (linear interpolation);
3. normalise: ``(x − low) / (high − low)`` clipped to [0, 1], then ``(x − mean) / std`` (the sample
   std, n − 1) and ``0.226 · x + 0.449``;
4. the locator (``bbox``, 128³) → softmax channel 1 > 0.5 → largest 26-connected component;
5. its box: along each axis the planes whose mean mask exceeds 0.02; centre and size scaled to the full
   image, size × 1.2 (a margin of 10 % each side), rounded, clipped to the image;
6. the box of ``x`` resized to 256³ (nearest-exact), normalised with step 2's ``low, high`` (mean and std
   of this block), the brain network → softmax channel 1 resized back to the box (nearest-exact);
7. probability > threshold (0.5); inside the box: largest 26-connected component, then 3D void filling
   (``fill_voids.fill``: every background region not connected to the box's faces).

Here the same steps in NumPy/SciPy, the networks through the node's engines (ONNX Runtime, OpenVINO,
TensorRT, …), the reorientation by :mod:`node.infer.orient` ("RAS", a transpose and flips of the
acquisition's (slice, row, column) array) and the mask returned in the acquisition's order.
tests/integration/test_brain_deepbet.py checks the result against deepbet's own PyTorch pipeline.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from node.assemble.select import MrFacts, why_not_mr
from node.errors import Declined, InferenceError
from node.infer.engine import Engine
from node.infer.orient import reorientation
from node.model.bundle import Bundle
from node.model.volume import Volume

log = logging.getLogger(__name__)

#: deepbet's array orientation (nibabel's canonical RAS+) in the node's notation.
DEEPBET_ORIENTATION = "RAS"
#: deepbet's intensity percentiles (of the 128³ image), box margin (fraction of the box per side) and
#: the fraction of a plane the locator's mask must cover for the plane to count (BrainExtraction.get_bbox).
PERCENTILES = (0.005, 0.995)
BOX_MARGIN = 0.1
PLANE_FRACTION = 0.02
#: deepbet's normalised image = 0.226 · z-score + 0.449 (ImageNet's grey mean and std).
NORMALISED_STD, NORMALISED_MEAN = 0.226, 0.449
#: The networks' softmax channel of the brain.
BRAIN_CHANNEL = 1
#: 26-connectivity (cc3d's default, which deepbet's keep_largest_connected_component uses).
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def nearest_exact_indices(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's nearest-exact source index of every output index: ``min(floor((i + 0.5) · s), n_in − 1)``
    with the scale ``s = n_in / n_out`` in float32 and the product rounded to float32 before the floor
    (aten/src/ATen/native/UpSample.h, ``nearest_neighbor_exact_compute_source_index``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    product = ((np.arange(n_out, dtype=np.float64) + 0.5) * np.float64(scale)).astype(np.float32)
    return np.minimum(np.floor(product).astype(np.int64), n_in - 1)


def resize_nearest_exact(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` resampled to ``shape`` like ``F.interpolate(x[None, None], shape, mode="nearest-exact")``."""
    index = np.ix_(*(nearest_exact_indices(n, m) for n, m in zip(x.shape, shape, strict=True)))
    return np.ascontiguousarray(x[index])


def normalise(x: np.ndarray, low: np.float32, high: np.float32) -> np.ndarray:
    """deepbet.utils.normalize, in float32."""
    y = np.clip((x - low) / (high - low), 0.0, 1.0, dtype=np.float32)
    y = (y - y.mean(dtype=np.float32)) / y.std(ddof=1, dtype=np.float32)
    return (np.float32(NORMALISED_STD) * y + np.float32(NORMALISED_MEAN)).astype(np.float32)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` (on a tie the first in raster order); empty stays empty."""
    components, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def fill_voids(mask: np.ndarray) -> np.ndarray:
    """Every background region not 6-connected to the array's faces filled (as ``fill_voids.fill`` does)."""
    filled: np.ndarray = ndimage.binary_fill_holes(mask)
    return filled


def box_with_margin(mask_small: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """deepbet's ``get_bbox_with_margin`` on the locator's mask: the box in the full image, in float32."""
    ranges = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        fraction = mask_small.astype(np.float32).mean(axis=others, dtype=np.float32)
        planes = np.flatnonzero(fraction > np.float32(PLANE_FRACTION))
        if planes.size == 0:
            raise Declined("the brain locator found no brain in the series (no plane more than "
                           f"{PLANE_FRACTION:.0%} covered along array axis {axis}); it needs a head MR")
        ranges.append((int(planes.min()), int(planes.max()) + 1))
    scale = np.array(shape, dtype=np.float32) / np.array(mask_small.shape, dtype=np.float32)
    center = np.round(scale * np.array([(lo + hi) / 2 for lo, hi in ranges], dtype=np.float32))
    grown = np.float32(1) + np.float32(2) * np.float32(BOX_MARGIN)
    size = np.round(grown * (scale * np.array([hi - lo for lo, hi in ranges], dtype=np.float32)))
    box = []
    for c, s, n in zip(center, size, shape, strict=True):
        lo, hi = int(c - s / np.float32(2)), int(c + s / np.float32(2))
        box.append(slice(max(0, lo), min(n, hi), 1))
    return box[0], box[1], box[2]


def _channel(engine: Engine, x: np.ndarray, what: str) -> np.ndarray:
    output = engine.run(x[None, None])
    if output.ndim != 5 or output.shape[0] != 1 or output.shape[1] <= BRAIN_CHANNEL or output.shape[2:] != x.shape:
        raise InferenceError(f"{engine.name} ({what}) returned shape {output.shape}; expected (1, 2, {x.shape})")
    channel: np.ndarray = output[0, BRAIN_CHANNEL]
    return channel


def _block(bundle: Bundle, part: str) -> tuple[int, int, int]:
    for p in bundle.parts:
        if p.name == part and p.bundle.window.block is not None:
            return p.bundle.window.block
    raise InferenceError(f"bundle {bundle.name} has no part {part!r} with a [parts.window] block")


def brain_mask_ras(x: np.ndarray, engines: dict[str, Engine], small: tuple[int, int, int],
                   large: tuple[int, int, int], threshold: float) -> np.ndarray:
    """deepbet's mask (bool) of an image already in its RAS orientation."""
    x = np.nan_to_num(x.astype(np.float32, copy=False))
    x_small = resize_nearest_exact(x, small)
    low, high = (np.float32(q) for q in np.quantile(x_small, PERCENTILES))
    if not high > low:
        raise Declined(f"the image has no contrast for brain extraction (0.5 and 99.5 percentiles both {low})")
    located = _channel(engines["bbox"], normalise(x_small, low, high), "locator") > 0.5
    del x_small
    box = box_with_margin(keep_largest_component(located), (x.shape[0], x.shape[1], x.shape[2]))
    crop = x[box]
    crop_shape = (crop.shape[0], crop.shape[1], crop.shape[2])
    probability = _channel(engines["brain"], normalise(resize_nearest_exact(crop, large), low, high), "brain")
    inside = resize_nearest_exact(probability, crop_shape) > threshold
    mask = np.zeros(x.shape, dtype=bool)
    mask[box] = fill_voids(keep_largest_component(inside))
    log.debug("deepbet: box %s of %s, %d brain voxels", box, x.shape, int(mask.sum()))
    return mask


def check_series(volume: Volume, bundle: Bundle) -> None:
    """Declined unless the volume's headers meet the bundle's ``[select.mr]`` rules (the settle-time check may
    not have read them) and its slices are evenly spaced (deepbet resizes the array as a regular grid)."""
    if volume.headers:
        reason = why_not_mr(bundle, MrFacts.of(volume.headers[0]))
        if reason:
            raise Declined(reason)
    if not volume.geometry.is_uniform:
        raise Declined(f"{bundle.name} needs evenly spaced slices (deepbet resizes the image as a regular grid); "
                       f"this series has {volume.geometry.gap_summary()}")


def segment_brain(volume: Volume, bundle: Bundle, engines: dict[str, Engine]) -> np.ndarray:
    """The brain (uint8: 0, or the brain part's label value) on ``volume``'s own grid, for a series that meets
    the bundle's rules (else :class:`Declined`)."""
    check_series(volume, bundle)
    return brain_labels(volume, bundle, engines)


def brain_labels(volume: Volume, bundle: Bundle, engines: dict[str, Engine]) -> np.ndarray:
    """deepbet's steps on any volume, without the selection rules (benchmarks/brain_parity.py runs it on T2)."""
    turn = reorientation(volume.geometry, DEEPBET_ORIENTATION)
    mask = brain_mask_ras(turn.apply(volume.voxels), engines, _block(bundle, "bbox"), _block(bundle, "brain"),
                          bundle.postprocess.threshold)
    brain = next(p for p in bundle.parts if p.name == "brain")
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[mask] = brain.lookup()[BRAIN_CHANNEL]
    return np.ascontiguousarray(turn.undo(labels))
