"""Label slices → closed planar contours in patient coordinates.

Contours follow the mask's pixel edges (marching squares at the 0.5 iso-level), not the centres of
the boundary pixels, so a planning system that fills the polygon by testing pixel centres gets back
exactly the pixels we segmented. Holes and islands are separate contours on the same slice: planning
systems (Eclipse, RayStation, plastimatch) combine contours of one ROI on one plane by even-odd
(XOR) filling, which turns an inner contour into a hole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import measure

from node.assemble.volume import Geometry

#: Contours enclosing less than this many pixels are dropped as degenerate.
MIN_AREA_PX = 0.5


@dataclass(frozen=True)
class SliceContour:
    slice_index: int
    points_lps: np.ndarray  # (n, 3) mm, n >= 3, not repeating the first point


def _polygon_area(rc: np.ndarray) -> float:
    r, c = rc[:, 0], rc[:, 1]
    return 0.5 * abs(float(np.dot(r, np.roll(c, -1)) - np.dot(c, np.roll(r, -1))))


def drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove points that lie on the straight line through their neighbours (exact: no shape change).

    Marching squares puts a point on every pixel edge it crosses, so straight runs carry one point
    per pixel; dropping them shrinks ContourData several-fold without moving the outline.
    """
    if len(points) <= 3:
        return points
    back = points - np.roll(points, 1, axis=0)
    ahead = np.roll(points, -1, axis=0) - points
    cross = back[:, 0] * ahead[:, 1] - back[:, 1] * ahead[:, 0]
    dot = (back * ahead).sum(axis=1)
    # Straight continuation only (dot > 0): a reversal would be a spike tip, which is kept.
    # Runs of collinear points all go at once: the line through the run's end points is the same.
    return points[~((np.abs(cross) < 1e-9) & (dot > 0))]


def slice_contours_px(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (row, col) of a 2D boolean mask, each without a repeated end point."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=np.float32)
    crop[1:-1, 1:-1] = mask[r0:r1, c0:c1]
    out = []
    for contour in measure.find_contours(crop, 0.5):
        if len(contour) < 4:
            continue
        simplified = drop_collinear(contour[:-1])
        if len(simplified) < 3 or _polygon_area(simplified) < MIN_AREA_PX:
            continue
        simplified = simplified + np.array([r0 - 1, c0 - 1], dtype=np.float64)
        out.append(simplified)
    return out


def mask_contours(mask: np.ndarray, geometry: Geometry) -> list[SliceContour]:
    """All contours of a (slices, rows, cols) mask, in patient coordinates."""
    result = []
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        for rc in slice_contours_px(mask[k]):
            kij = np.column_stack([np.full(len(rc), k, dtype=np.float64), rc[:, 0], rc[:, 1]])
            result.append(SliceContour(int(k), geometry.to_patient(kij)))
    return result
