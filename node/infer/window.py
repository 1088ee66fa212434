"""Sliding-window inference with Gaussian-weighted accumulation of overlapping tiles."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from node.infer.engine import Engine


def gaussian_weights(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Importance map that favours tile centres, exactly nnU-Net's (``compute_gaussian``): a unit impulse at
    voxel patch // 2 filtered with sigma = patch/8 (scipy, truncated at 4 sigma), scaled to a maximum of 1,
    its zeros raised to the smallest positive weight. An imported nnU-Net model's tiles are then blended
    as nnU-Net blends them."""
    impulse = np.zeros(patch, dtype=np.float64)
    impulse[tuple(n // 2 for n in patch)] = 1.0
    w = ndimage.gaussian_filter(impulse, [max(n * sigma_scale, 1e-3) for n in patch], 0, mode="constant", cval=0.0)
    w /= w.max()
    w[w <= 0] = w[w > 0].min()
    return w.astype(np.float32)


def tile_starts(size: int, patch: int, step: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``patch``, at most ``step`` apart, the first at 0 and the
    last ending at ``size``: as many tiles as steps of ``step`` need, spread evenly (nnU-Net's placement,
    ``compute_steps_for_sliding_window``, so an imported nnU-Net model sees the very tiles it would see there)."""
    if size <= patch:
        return [0]
    count = -(-(size - patch) // step) + 1
    return [int(np.round((size - patch) / (count - 1) * i)) for i in range(count)]


def tile_grid(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float) -> list[tuple[int, int, int]]:
    """Corners of the tiles covering a (D, H, W) image (padded to at least ``patch``), in the order
    :func:`sliding_window` runs them: the one tiling the CPU path, the GPU-resident pipeline and
    ``engines doctor``'s tile counts share."""
    steps = [max(1, int(round(p * (1 - overlap)))) for p in patch]
    starts = [tile_starts(max(s, p), p, st) for s, p, st in zip(shape, patch, steps, strict=False)]
    return list(itertools.product(*starts))  # type: ignore[arg-type]


def tiles_per_batch(engine: Engine, batch: int) -> int:
    """How many tiles go to ``engine`` at once: the engine's own batch when it has one (a TensorRT plan's
    ``max_batch``, sized from the patch and the GPU's free memory by node.infer.gpu.plan), else ``batch``
    (the manifest's ``[window] batch``, the CPU's; an imported nnU-Net bundle says 1)."""
    own = getattr(engine, "max_batch", None)
    return max(1, own if isinstance(own, int) and own > 0 else batch)


def sliding_window(
    image: np.ndarray,
    engine: Engine,
    *,
    patch: tuple[int, int, int],
    overlap: float,
    batch: int,
    pad_value: float,
) -> np.ndarray:
    """Run ``engine`` over a (D, H, W) image; return (K, D, H, W) averaged probabilities."""
    shape = image.shape
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=False))
    if padded_shape != shape:
        padded = np.full(padded_shape, pad_value, dtype=np.float32)
        padded[: shape[0], : shape[1], : shape[2]] = image
        image = padded
    corners = tile_grid(image.shape, patch, overlap)
    weights = gaussian_weights(patch)
    batch = tiles_per_batch(engine, batch)
    acc: np.ndarray | None = None
    norm = np.zeros(image.shape, dtype=np.float32)
    for b in range(0, len(corners), batch):
        group = corners[b : b + batch]
        tiles = np.stack([image[z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in group])
        probs = engine.run(tiles[:, None])
        if acc is None:
            acc = np.zeros((probs.shape[1], *image.shape), dtype=np.float32)
        if not probs.flags.writeable:
            probs = probs.copy()
        for (z, y, x), p in zip(group, probs, strict=False):
            p *= weights  # in place: no (K, *patch) temporary (the same float32 products as p * weights)
            acc[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] += p
            norm[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += weights
        del probs, tiles  # before the next batch runs: its activations come on top of what is still held
    assert acc is not None
    release = getattr(engine, "release_memory", None)
    if release is not None:  # the engine's activations are not needed while the probabilities go to the native grid
        release()
    acc /= norm
    return acc[:, : shape[0], : shape[1], : shape[2]]
