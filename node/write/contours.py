"""Label slices → closed planar contours in patient coordinates.

Contours pass through the midpoints of the mask's boundary pixel edges — the polygon marching
squares draws at the 0.5 iso-level — not through the centres of the boundary pixels, so a planning
system that fills the polygon by testing pixel centres gets back exactly the pixels we segmented.
Holes and islands are separate contours on the same slice: planning systems (Eclipse, RayStation,
plastimatch) combine the contours of one ROI on one plane by even-odd (XOR) filling, which turns an
inner contour into a hole. Where two pixels touch only at a corner they belong to separate contours
(4-connectivity), so no polygon ever crosses itself.

The tracing is vectorised over the whole stack: every boundary pixel edge of every slice becomes a
directed edge (inside on its right), each edge is linked to the edge leaving its end corner, and
the cycles are ordered by pointer jumping — no per-pixel Python, which made contouring 4 structures
on a 512×512×300 CT take ~2 s with scikit-image's per-slice tracing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.assemble.volume import Geometry

#: Contours enclosing less than this many pixels are dropped as degenerate.
MIN_AREA_PX = 0.5

# Edge directions in (row, column) image coordinates, clockwise: a right turn is +1.
UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3


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


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Directed boundary edges of every slice: (slice, start corner, end corner, direction, midpoint).

    Corners are numbered on the (rows+3)×(cols+3) corner grid of the mask padded by one pixel.
    """
    k_count, rows, cols = mask.shape
    padded = np.zeros((k_count, rows + 2, cols + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = mask
    width = cols + 3
    per_slice = (rows + 3) * width

    # Vertical edges on corner column c = j + 1, between pixels (i, j) and (i, j + 1).
    left, right = padded[:, :, :-1], padded[:, :, 1:]
    k1, i1, j1 = np.nonzero(left != right)
    right_inside = right[k1, i1, j1]
    c1 = j1 + 1
    top = k1 * per_slice + i1 * width + c1
    bottom = top + width
    start_v = np.where(right_inside, bottom, top)  # inside on the right: up if the right pixel is in
    end_v = np.where(right_inside, top, bottom)
    dir_v = np.where(right_inside, UP, DOWN)
    mid_v = np.column_stack([i1 + 0.5, c1.astype(np.float64)])

    # Horizontal edges on corner row r = i + 1, between pixels (i, j) and (i + 1, j).
    upper, lower = padded[:, :-1, :], padded[:, 1:, :]
    k2, i2, j2 = np.nonzero(upper != lower)
    lower_inside = lower[k2, i2, j2]
    r2 = i2 + 1
    west = k2 * per_slice + r2 * width + j2
    east = west + 1
    start_h = np.where(lower_inside, west, east)  # inside on the right: east if the lower pixel is in
    end_h = np.where(lower_inside, east, west)
    dir_h = np.where(lower_inside, RIGHT, LEFT)
    mid_h = np.column_stack([r2.astype(np.float64), j2 + 0.5])

    return (
        np.concatenate([k1, k2]),
        np.concatenate([start_v, start_h]),
        np.concatenate([end_v, end_h]),
        np.concatenate([dir_v, dir_h]),
        np.concatenate([mid_v, mid_h]) - 1.5,  # corner grid → pixel index (pixel centres at integers)
    )


def _link(start: np.ndarray, end: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """For each edge, the edge that leaves its end corner (at a saddle: the right turn)."""
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    first = np.searchsorted(sorted_start, end, side="left")
    count = np.searchsorted(sorted_start, end, side="right") - first
    nxt = order[first]
    saddle = np.flatnonzero(count == 2)
    if saddle.size:
        a, b = order[first[saddle]], order[first[saddle] + 1]
        turn_right = (direction[saddle] + 1) % 4
        nxt[saddle] = np.where(direction[a] == turn_right, a, b)
    return nxt


def _order_cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycle representative (its smallest edge) and the traversal order of all edges, by pointer jumping."""
    n = len(nxt)
    rep = np.arange(n)
    jump = nxt.copy()
    steps = 1
    while steps < n:
        # While some cycle is longer than the window, some edge's minimum still changes (the one
        # whose window ends just before its cycle's minimum), so "no change" means converged.
        smaller = rep[jump]
        if not (smaller < rep).any():
            break
        np.minimum(rep, smaller, out=rep)
        jump = jump[jump]
        steps *= 2
    # Break every cycle before its representative, then rank edges by distance to the break.
    succ = nxt.copy()
    terminal = nxt == rep  # the edge whose successor is its cycle's representative
    succ[terminal] = np.flatnonzero(terminal)
    rank = (~terminal).astype(np.int64)
    steps = 1
    while steps < n:
        ahead = succ[succ]
        if np.array_equal(ahead, succ):  # every pointer has reached its cycle's break
            break
        rank += rank[succ]
        succ = ahead
        steps *= 2
    return rep, np.lexsort((-rank, rep))


def mask_contours_px(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Closed contours (slice, (n, 2) row/col points) of every slice of a (slices, rows, cols) mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    occupied = np.flatnonzero(mask.any(axis=(0, 2)))
    if occupied.size == 0:
        return []
    columns = np.flatnonzero(mask.any(axis=(0, 1)))
    layers = np.flatnonzero(mask.any(axis=(1, 2)))
    r0, c0, k0 = occupied[0], columns[0], layers[0]
    crop = mask[k0 : layers[-1] + 1, r0 : occupied[-1] + 1, c0 : columns[-1] + 1]  # work on the bounding box
    slices, start, end, direction, mid = _boundary_edges(crop)
    slices += k0
    mid += np.array([r0, c0], dtype=np.float64)
    nxt = _link(start, end, direction)
    rep, order = _order_cycles(nxt)
    rep_sorted = rep[order]
    cuts = np.flatnonzero(np.diff(rep_sorted)) + 1
    result = []
    for run in np.split(order, cuts):
        points = drop_collinear(mid[run])
        if len(points) >= 3 and _polygon_area(points) >= MIN_AREA_PX:
            result.append((int(slices[run[0]]), points))
    result.sort(key=lambda item: item[0])
    return result


def slice_contours_px(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (row, col) of a 2D boolean mask, each without a repeated end point."""
    return [points for _, points in mask_contours_px(mask[None])]


def mask_contours(mask: np.ndarray, geometry: Geometry) -> list[SliceContour]:
    """All contours of a (slices, rows, cols) mask, in patient coordinates, in slice order."""
    result = []
    for k, rc in mask_contours_px(mask):
        kij = np.column_stack([np.full(len(rc), k, dtype=np.float64), rc[:, 0], rc[:, 1]])
        result.append(SliceContour(k, geometry.to_patient(kij)))
    return result
