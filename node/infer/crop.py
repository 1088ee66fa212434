"""The abdomen crop for upper-abdominal organ models (the liver): a box around the body, centred on the
liver's craniocaudal range, at most the size the model was trained on.

Works on a volume already in "S.." orientation (axis 0 inferior→superior; see :mod:`node.infer.orient`)
and on a ~3 mm subsample of it, so it takes a fraction of a second on a 512×512×300 CT. Steps:

1. Body: the largest 3D component of tissue (> −150 HU) after an in-plane erosion of ~6 mm, which cuts
   the couch and thin cables off; its box in the two in-plane axes.
2. Liver dome: the lungs are the largest internal air region (< −600 HU, inside the body's filled
   outline, ≥ 150 mL); the lowest slice where their area is still ≥ 10 % of its maximum is the lung
   base, where the liver dome sits. The box's top is ``dome_margin_mm`` above it and it extends down
   by the model's maximum height. With no lungs in the field (an abdomen-only series) the box starts at
   the top of the series, since the liver is the uppermost abdominal organ.
3. The in-plane box is the body's box over those slices, trimmed about its centre to the maximum size.

Unlike the package's crop (which looks for the hip bones and crashed on a 20-slice series), every step
degrades to "keep the whole extent" when its landmark is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.errors import Declined
from node.infer.transforms import fill_holes_per_slice, largest_component

TISSUE_HU = -150.0
AIR_HU = -600.0
MIN_LUNG_ML = 150.0
LUNG_BASE_FRACTION = 0.10
COUCH_EROSION_MM = 6.0


@dataclass(frozen=True)
class AbdomenBox:
    box: tuple[slice, slice, slice]  # in the full-resolution, reoriented array
    body_width_mm: float  # widest extent of the body along axis 2 (left-right for "SAR")
    lung_base_index: int | None  # axis-0 index of the lung base, None when no lungs were found


def _span(mask_1d: np.ndarray) -> tuple[int, int]:
    hits = np.flatnonzero(mask_1d)
    return int(hits[0]), int(hits[-1]) + 1


def _trim(lo: int, hi: int, max_len: int) -> tuple[int, int]:
    """Shrink [lo, hi) about its centre to at most ``max_len``."""
    excess = (hi - lo) - max_len
    if excess <= 0:
        return lo, hi
    lo += excess // 2
    return lo, lo + max_len


def abdomen_box(hu: np.ndarray, spacing: tuple[float, float, float],
                max_mm: tuple[float, float, float], dome_margin_mm: float = 70.0) -> AbdomenBox:
    """Find the crop box of ``hu`` (axis 0 inferior→superior) for an upper-abdomen model."""
    stride = tuple(max(1, int(3.0 / s)) for s in spacing)
    coarse = hu[::stride[0], ::stride[1], ::stride[2]]
    cs = tuple(s * f for s, f in zip(spacing, stride, strict=True))

    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    erosion = max(1, int(round(COUCH_EROSION_MM / max(cs[1], cs[2]))))
    tissue = ndimage.binary_erosion(coarse > TISSUE_HU, structure=in_plane, iterations=erosion)
    if not tissue.any():
        raise Declined(f"no body found: nothing above {TISSUE_HU:g} HU survives a {COUCH_EROSION_MM:g} mm erosion")
    body = ndimage.binary_dilation(largest_component(tissue), structure=in_plane, iterations=erosion)
    body &= coarse > TISSUE_HU
    cols = body.any(axis=1)  # (slices, axis-2)
    widths = [(_span(c)[1] - _span(c)[0]) * cs[2] for c in cols if c.any()]
    body_width = float(max(widths)) if widths else 0.0

    # Lungs: the largest air region inside the body's outline (internal air only).
    outline = fill_holes_per_slice(body)
    air = (coarse < AIR_HU) & outline
    lung_base: int | None = None
    if air.any():
        lungs = largest_component(air)
        voxel_ml = float(np.prod(cs)) / 1000.0
        if lungs.sum() * voxel_ml >= MIN_LUNG_ML:
            area = lungs.sum(axis=(1, 2))
            lung_slices = np.flatnonzero(area >= LUNG_BASE_FRACTION * area.max())
            lung_base = int(lung_slices[0]) * stride[0]

    n0 = hu.shape[0]
    height = max(1, int(round(max_mm[0] / spacing[0])))
    top = n0 if lung_base is None else min(n0, lung_base + int(round(dome_margin_mm / spacing[0])))
    lo0 = max(0, top - height)
    hi0 = min(n0, lo0 + height)

    in_range = body[lo0 // stride[0]:max(lo0 // stride[0] + 1, -(-hi0 // stride[0]))]
    if not in_range.any():
        in_range = body
    lo1, hi1 = _span(in_range.any(axis=(0, 2)))
    lo2, hi2 = _span(in_range.any(axis=(0, 1)))
    lo1, hi1 = lo1 * stride[1], min(hu.shape[1], hi1 * stride[1])
    lo2, hi2 = lo2 * stride[2], min(hu.shape[2], hi2 * stride[2])
    lo1, hi1 = _trim(lo1, hi1, int(round(max_mm[1] / spacing[1])))
    lo2, hi2 = _trim(lo2, hi2, int(round(max_mm[2] / spacing[2])))
    return AbdomenBox(
        box=(slice(lo0, hi0), slice(lo1, hi1), slice(lo2, hi2)),
        body_width_mm=body_width,
        lung_base_index=lung_base,
    )
