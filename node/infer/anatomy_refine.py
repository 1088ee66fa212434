"""Coarse labels back onto the source grid: step 4 of ``node.infer.anatomy`` (its docstring tells the
whole method).

Coarse labels are repeated onto the source grid; on a one-coarse-voxel band around each boundary the
source voxel decides by its own threshold (``BODY_HU``, ``LUNG_HU``), so edges are not staircased.
Blocks that the source voxels enclose are filled, judged per block at coarse resolution.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.infer.anatomy_grid import BODY, LEFT_LUNG, RIGHT_LUNG, CoarseFrame, bbox, erode, fill_enclosed_inplane
from node.infer.body import BODY_HU, gap_radius
from node.infer.lungs import LUNG_HU


def _band(mask: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Voxels within one step of ``mask``'s boundary, on either side (the volume's edges are not a
    boundary: the patient goes on beyond the first and last slice)."""
    grown = ndimage.maximum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)
    shrunk = ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)
    return grown & ~shrunk


def coarse_bands(body: np.ndarray, left: np.ndarray, right: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Where the source voxels decide: 1 on BODY's edge, LEFT_LUNG/RIGHT_LUNG on a lung's edge."""
    bands = np.zeros(body.shape, dtype=np.uint8)
    bands[_band(body, size)] = 1
    for mask, other, value in ((left, right, LEFT_LUNG), (right, left, RIGHT_LUNG)):
        tight = bbox(mask)
        if tight is None:
            continue
        # Grow the box by one voxel so the band's outer ring is inside it.
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(tight, mask.shape, strict=True))
        band = _band(mask[box], size) & body[box] & ~other[box]
        bands[box][band] = value
    return bands


def _blocks(kc: np.ndarray, ic: np.ndarray, jc: np.ndarray, factors: tuple[int, int, int],
            shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each offset inside a block: (which of the coarse voxels have it, flat source index)."""
    out = []
    for a in range(factors[0]):
        k = kc * factors[0] + a
        for b in range(factors[1]):
            i = ic * factors[1] + b
            for c in range(factors[2]):
                j = jc * factors[2] + c
                valid = (k < shape[0]) & (i < shape[1]) & (j < shape[2])
                out.append((valid, ((k * shape[1] + i) * shape[2] + j)[valid]))
    return out


def to_full(labels: np.ndarray, bands: np.ndarray, voxels: np.ndarray, frame: CoarseFrame) -> np.ndarray:
    """Coarse labels repeated onto the source grid; on the bands each source voxel decides by its HU.

    Then holes: where the source voxels close a region the coarse grid left open (a thin shell) or
    leave air inside the body's edge, the enclosed blocks are filled (plane by plane, at coarse
    resolution: blocks whose in-plane neighbours are all inside the filled outline)."""
    factors = frame.factors
    shape = voxels.shape
    if factors == (1, 1, 1):
        return labels.copy()
    f0, f1, f2 = factors
    n0, n1, n2 = labels.shape
    padded = np.empty((n0 * f0, n1 * f1, n2 * f2), dtype=np.uint8)
    padded.reshape(n0, f0, n1, f1, n2, f2)[...] = labels[:, None, :, None, :, None]
    out = padded[: shape[0], : shape[1], : shape[2]]
    if not out.flags.c_contiguous:
        out = np.ascontiguousarray(out)
    kc, ic, jc = np.nonzero(bands)
    if kc.size == 0:
        return out
    kind = bands[kc, ic, jc]
    flat_voxels = np.ascontiguousarray(voxels).reshape(-1)
    flat_out = out.reshape(-1)
    body_band = kind == 1
    inside = np.zeros(kc.size, dtype=np.int32)
    present = np.zeros(kc.size, dtype=np.int32)
    for valid, flat in _blocks(kc, ic, jc, factors, shape):
        hu = flat_voxels[flat]
        decided = np.where(body_band[valid], (hu > BODY_HU).astype(np.uint8),
                           np.where(hu < LUNG_HU, kind[valid], np.uint8(BODY)))
        flat_out[flat] = decided
        inside[valid] += decided > 0
        present[valid] += 1
    # Holes, judged per block: a block is "touched" when any of its voxels is in, "full" when all are.
    touched = labels > 0
    touched[kc, ic, jc] = inside > 0
    full = labels > 0
    full[kc, ic, jc] = inside == present
    inverse = tuple(int(a) for a in np.argsort(frame.order))
    filled = fill_enclosed_inplane(np.ascontiguousarray(touched.transpose(frame.order)), gap_radius(frame.spacing))
    interior = erode(filled, 3).transpose(inverse)
    kh, ih, jh = np.nonzero(interior & ~full)
    for _valid, flat in _blocks(kh, ih, jh, factors, shape):
        flat_out[flat] = np.maximum(flat_out[flat], np.uint8(BODY))
    return out

