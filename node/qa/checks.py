"""What is wrong with a clinician's contours, named before they are measured.

A structure set from a planning system may carry open contours (OPEN_PLANAR, POINT: no volume),
polygons that cross themselves (filled even-odd, as the planning systems do, but worth saying) and
contours off the image planes (:func:`node.read.rasterise` refuses those). The checks here never raise:
they return sentences for the qa record.
"""

from __future__ import annotations

import numpy as np

from node.model.volume import Geometry
from node.read import Roi
from node.read.rtstruct import CLOSED_TYPES

#: Polygons with more points than this are not checked for self-intersection (the check is quadratic).
MAX_CHECKED_POINTS = 4000
_CHUNK = 256


def _orientation(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Sign of the turn p → q → r for broadcast arrays of 2-D points (…, 2)."""
    cross = (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
    return np.sign(np.where(np.abs(cross) < 1e-9, 0.0, cross))


def self_intersects(xy: np.ndarray) -> bool:
    """True when the closed polygon ``xy`` (n, 2) has two non-adjacent edges that properly cross.

    Edges that only touch at a point (a vertex on another edge, collinear overlaps) do not count: pixel-edge
    contours touch themselves at corners without enclosing anything wrongly.
    """
    n = len(xy)
    if n < 4:
        return False
    a, b = xy, np.roll(xy, -1, axis=0)
    index = np.arange(n)
    for start in range(0, n, _CHUNK):
        i = index[start:start + _CHUNK, None]
        j = index[None, :]
        candidates = (j > i + 1) & ~((i == 0) & (j == n - 1))  # not the same, not adjacent (the ring closes)
        if not candidates.any():
            continue
        pa, pb = a[start:start + _CHUNK, None], b[start:start + _CHUNK, None]
        qa, qb = a[None, :], b[None, :]
        o1, o2 = _orientation(pa, pb, qa), _orientation(pa, pb, qb)
        o3, o4 = _orientation(qa, qb, pa), _orientation(qa, qb, pb)
        crossing = (o1 * o2 < 0) & (o3 * o4 < 0) & candidates
        if crossing.any():
            return True
    return False


def contour_problems(roi: Roi, geometry: Geometry) -> tuple[list[str], bool]:
    """Sentences about ``roi``'s contours, and whether it has any closed contour to fill."""
    problems: list[str] = []
    open_kinds = sorted({c.geometric_type for c in roi.contours if c.geometric_type not in CLOSED_TYPES})
    closed = [c for c in roi.contours if c.geometric_type in CLOSED_TYPES and len(c.points) >= 3]
    if open_kinds:
        count = sum(1 for c in roi.contours if c.geometric_type not in CLOSED_TYPES)
        problems.append(f"ROI {roi.name!r} has {count} open contour(s) ({', '.join(open_kinds)}), which enclose "
                        "no volume and were left out")
    crossing, unchecked = [], 0
    for n, contour in enumerate(roi.contours, start=1):
        if contour.geometric_type not in CLOSED_TYPES or len(contour.points) < 4:
            continue
        if len(contour.points) > MAX_CHECKED_POINTS:
            unchecked += 1
            continue
        offset = contour.points - geometry.origin
        xy = np.stack([offset @ geometry.row_dir, offset @ geometry.col_dir], axis=1)
        if self_intersects(xy):
            crossing.append(n)
    if crossing:
        shown = ", ".join(map(str, crossing[:5])) + (f" and {len(crossing) - 5} more" if len(crossing) > 5 else "")
        problems.append(f"ROI {roi.name!r} has self-intersecting polygon(s) (contour {shown}), filled even-odd")
    if unchecked:
        problems.append(f"ROI {roi.name!r}: {unchecked} contour(s) of more than {MAX_CHECKED_POINTS} points were "
                        "not checked for self-intersection")
    return problems, bool(closed)
