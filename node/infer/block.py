"""Single-block inference: the whole (cropped) image in one fixed-size, padded block.

For networks whose layers normalise over their whole input (instance normalisation), the output
depends on everything in the block, padding included; such a model reproduces its published results
only when run on exactly the block it was trained with, not tiled. The liver U-Net is one.

volume → reorient → crop → [resample to the intermediate spacing → median] → resample to the model's
spacing → normalise → centre in the block → run → probabilities of the image's voxels → threshold
→ [erode, largest component, dilate on the model grid] → back to the crop's native grid → labels in
the acquisition's own array order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.errors import BundleError, InferenceError
from node.infer.coverage import check_body_width
from node.infer.crop import abdomen_box
from node.infer.engine import Engine, device_pipeline
from node.infer.median import median3
from node.infer.memory import release_free_memory
from node.infer.orient import Reorientation, reorientation
from node.infer.transforms import (
    largest_component,
    mask_to_grid,
    normalise,
    resample_centred,
)
from node.model.bundle import Bundle
from node.model.enums import Activation, Crop
from node.model.volume import Volume

_IDENTITY = Reorientation(permutation=(0, 1, 2), flips=(False, False, False), obliquity_deg=0.0)


def _offsets(image_shape: tuple[int, ...], block: tuple[int, int, int]) -> tuple[int, int, int]:
    """Block index of image voxel 0 per axis: the image centred in the block (d//2 − n//2)."""
    return tuple(b // 2 - n // 2 for n, b in zip(image_shape, block, strict=False))  # type: ignore[return-value]


def place_in_block(image: np.ndarray, block: tuple[int, int, int], pad_value: float) -> np.ndarray:
    """``image`` centred in a (1, 1, *block) array filled with ``pad_value``; an image larger than the
    block keeps its centre (the model cannot see the rest)."""
    out = np.full((1, 1, *block), pad_value, dtype=np.float32)
    src, dst = [], []
    for n, b, off in zip(image.shape, block, _offsets(image.shape, block), strict=False):
        lo = max(0, -off)
        hi = min(n, b - off)
        src.append(slice(lo, hi))
        dst.append(slice(lo + off, hi + off))
    out[(0, 0, *dst)] = image[tuple(src)]  # type: ignore[index]
    return out


def image_probabilities(output: np.ndarray, image_shape: tuple[int, int, int], block: tuple[int, int, int],
                        margin: int) -> np.ndarray:
    """(K, *image_shape) probabilities of the image's voxels from the network's (K, *block−2·margin)
    output; voxels the output does not reach take the nearest predicted value."""
    k = output.shape[0]
    out = np.empty((k, *image_shape), dtype=np.float32)
    src, dst, pads = [], [], []
    for n, _b, off, m in zip(image_shape, block, _offsets(image_shape, block), output.shape[1:], strict=False):
        first = off - margin  # output index of image voxel 0
        lo = max(0, -first)
        hi = min(n, m - first)
        if hi <= lo:
            raise InferenceError(f"the network's output ({m} voxels) does not reach the image ({n} voxels)")
        src.append(slice(lo + first, hi + first))
        dst.append(slice(lo, hi))
        pads.append((lo, n - hi))
    inner = output[(slice(None), *src)]
    if any(p != (0, 0) for p in pads):
        inner = np.pad(inner, [(0, 0), *pads], mode="edge")
    out[...] = inner
    return out


def _open_keep_largest(mask: np.ndarray) -> np.ndarray:
    """Erode (18-connected), keep the largest 6-connected component, dilate back; an erosion that
    leaves nothing keeps the largest component of the mask itself."""
    structure = ndimage.generate_binary_structure(3, 2)
    eroded = ndimage.binary_erosion(mask, structure=structure)
    if not eroded.any():
        return largest_component(mask)
    return ndimage.binary_dilation(largest_component(eroded), structure=structure)


def _channels_on_host(image: np.ndarray, bundle: Bundle, engine: Engine) -> list[tuple[int, np.ndarray]]:
    """Normalisation, the block, the network and the threshold in host memory, for an image already at
    the model's spacing: one (label value, mask on the model grid) per label."""
    pre, win, post = bundle.preprocess, bundle.window, bundle.postprocess
    assert win.block is not None
    image = normalise(image, pre)
    pad = win.pad_value if win.pad_value is not None else (pre.clip[0] + pre.offset) * pre.scale
    block = place_in_block(image, win.block, pad)
    release_free_memory()  # the preprocessing's freed temporaries, before the network's ~2 GB
    output = engine.run(block)
    del block
    if output.ndim != 5 or output.shape[0] != 1:
        raise InferenceError(f"{engine.name} returned shape {output.shape}; expected (1, K, D, H, W)")
    probabilities = image_probabilities(output[0], image.shape, win.block, win.output_margin)
    del output, image
    if bundle.activation is Activation.SIGMOID:
        return [(label.value, probabilities[i] > post.threshold) for i, label in enumerate(bundle.labels)]
    best = np.argmax(probabilities, axis=0)
    return [(label.value, best == label.value) for label in bundle.labels]


def segment_single_block(volume: Volume, bundle: Bundle, engine: Engine) -> np.ndarray:
    """Labels (uint8, shaped like ``volume``) from one block of ``bundle``'s network."""
    pre, win, post = bundle.preprocess, bundle.window, bundle.postprocess
    if win.block is None or pre.spacing_mm is None:
        raise BundleError(f"bundle {bundle.name}: single-block mode needs [window] block and [preprocess] spacing_mm")
    turn = reorientation(volume.geometry, pre.orientation) if pre.orientation else _IDENTITY
    hu = turn.apply(volume.voxels)
    spacing = turn.spacing(volume.geometry.spacing)

    box: tuple[slice, ...] = (slice(None),) * 3
    if pre.crop is Crop.ABDOMEN:
        if pre.crop_max_mm is None:
            raise BundleError(f"bundle {bundle.name}: crop 'abdomen' needs [preprocess] crop_max_mm")
        found = abdomen_box(hu, spacing, pre.crop_max_mm)
        check_body_width(bundle, found.body_width_mm)
        box = found.box
    crop = hu[box]  # a view: the first resampling step makes the (smaller) copy
    crop_shape: tuple[int, int, int] = crop.shape

    image, image_spacing = crop, spacing
    del crop
    if pre.intermediate_spacing_mm is not None:
        image = resample_centred(image, image_spacing, pre.intermediate_spacing_mm)
        image_spacing = pre.intermediate_spacing_mm
        if pre.median_size == 3:
            image = median3(image)
        elif pre.median_size > 1:
            image = ndimage.median_filter(image, size=pre.median_size, mode="nearest")
    values = [label.value for label in bundle.labels]
    resident = device_pipeline(engine)
    if resident is not None:  # resampling, normalisation, block, network and threshold on the GPU
        channels, _ = resident.single_block_channels(image, image_spacing, pre, win, bundle.activation,
                                                     post.threshold, values)
        del image
    else:
        image = resample_centred(image, image_spacing, pre.spacing_mm)  # drops the larger intermediate image
        channels = _channels_on_host(image, bundle, engine)
    labels_crop = np.zeros(crop_shape, dtype=np.uint8)
    for value, mask in channels:
        if post.open_model_grid and mask.any():
            mask = _open_keep_largest(mask)
        native = mask_to_grid(mask, pre.spacing_mm, spacing, crop_shape)
        labels_crop[native & (labels_crop == 0)] = value

    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[box] = labels_crop
    return np.ascontiguousarray(turn.undo(labels))
