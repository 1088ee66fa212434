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
the cycles are walked by scipy's depth-first traversal (C) from a root linked to each cycle's
smallest edge; collinear points, degenerate contours and the conversion to patient coordinates are
done for all contours at once — no per-pixel or per-contour Python, which made contouring 4
structures on a 512×512×300 CT take ~2 s with scikit-image's per-slice tracing (and ~1 s with
per-contour numpy calls and pointer jumping).

Smoothing (``smooth=True``; a bundle's ``[contours] smoothing = "half-pixel"``, node/write/smoothing.py)
rounds the staircases and thins the points, never moving the outline by more than 0.35 px, so that,
filled by pixel centres, the smoothed contours still give back exactly the mask (and the SEG).
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.ndimage import find_objects
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

from node.model.volume import Geometry
from node.write.smoothing import simplified, smoothed

#: Contours enclosing less than this many pixels are dropped as degenerate.
MIN_AREA_PX = 0.5
#: Slices traced together (see _trace): ~20 MB of working memory per 512×512 slab of this size.
SLAB_SLICES = 32

# Edge directions in (row, column) image coordinates, clockwise: a right turn is +1.
UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3


@dataclass(frozen=True)
class SliceContour:
    slice_index: int
    points_lps: np.ndarray  # (n, 3) mm, n >= 3, not repeating the first point


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Directed boundary edges of every slice: (slice, start corner, end corner, direction, midpoint).

    Corners are numbered on the (rows+3)×(cols+3) corner grid of the mask padded by one pixel.
    """
    k_count, rows, cols = mask.shape
    padded = np.zeros((k_count, rows + 2, cols + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = mask
    # Transitions along the flattened padded stack: the padding rows and columns are never inside, so
    # neighbours in the flat array that straddle a row or slice end never differ. np.flatnonzero on
    # the flat array is several times faster than np.nonzero on 3D arrays, and gives the same order.
    flat = padded.ravel()
    padded_width = cols + 2
    per_padded_slice = (rows + 2) * padded_width
    width = cols + 3
    per_slice = (rows + 3) * width

    # Vertical edges on corner column c = j + 1, between pixels (i, j) and (i, j + 1).
    p = np.flatnonzero(flat[:-1] != flat[1:])
    right_inside = flat[p + 1]
    k1, within = np.divmod(p, per_padded_slice)
    i1, j1 = np.divmod(within, padded_width)
    c1 = j1 + 1
    top = k1 * per_slice + i1 * width + c1
    bottom = top + width
    start_v = np.where(right_inside, bottom, top)  # inside on the right: up if the right pixel is in
    end_v = np.where(right_inside, top, bottom)
    dir_v = np.where(right_inside, UP, DOWN)
    mid_v = np.column_stack([i1 + 0.5, c1.astype(np.float64)])

    # Horizontal edges on corner row r = i + 1, between pixels (i, j) and (i + 1, j).
    q = np.flatnonzero(flat[:-padded_width] != flat[padded_width:])
    lower_inside = flat[q + padded_width]
    k2, within = np.divmod(q, per_padded_slice)
    i2, j2 = np.divmod(within, padded_width)
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


def _cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All edges in traversal order, cycle after cycle, and where each cycle starts in that order.

    Each cycle starts at its smallest edge and cycles come in the order of those edges. ``nxt`` is a
    permutation, so its cycles are the weakly connected components; a depth-first walk from an extra
    root node linked to each component's smallest edge (in increasing order) walks one whole cycle
    per root child.
    """
    n = len(nxt)
    graph = csr_matrix((np.ones(n, dtype=np.int8), nxt, np.arange(n + 1)), shape=(n, n))
    count, component = connected_components(graph, directed=True, connection="weak")
    smallest = np.full(count, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n))
    smallest.sort()
    rooted = csr_matrix(
        (np.ones(n + count, dtype=np.int8), np.concatenate([nxt, smallest]), np.append(np.arange(n + 1), n + count)),
        shape=(n + 1, n + 1),
    )
    order = depth_first_order(rooted, n, directed=True, return_predecessors=False)[1:]
    starts = np.flatnonzero(np.isin(order, smallest, assume_unique=True))
    if len(order) != n or len(starts) != count or (len(starts) and starts[0] != 0):
        raise AssertionError(f"contour tracing walked {len(order)} of {n} edges in {len(starts)} of {count} cycles")
    return order, starts


def _next_in_cycle(starts: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For points stored cycle after cycle (cycle i from ``starts[i]``): cycle index, next and previous point."""
    lengths = np.diff(np.append(starts, total))
    cycle = np.repeat(np.arange(len(starts)), lengths)
    first = starts[cycle]
    last = first + lengths[cycle] - 1
    index = np.arange(total)
    return cycle, np.where(index == last, first, index + 1), np.where(index == first, last, index - 1)


class Traced(NamedTuple):
    """Contours in pixel coordinates, contour after contour, in slice order."""

    slices: np.ndarray  # the slice of each contour
    offsets: np.ndarray  # where each contour's points start, one extra at the end
    points: np.ndarray  # (n, 2) row/column
    areas: np.ndarray  # signed area of each traced outline in px²: > 0 outer contour, < 0 hole


class Outlines(NamedTuple):
    """Traced outlines before smoothing and thinning (pixel coordinates): cycle after cycle, cycle ``i``'s points
    from ``starts[i]``. Kept so that the cleaning's tracing serves the RTSTRUCT too (node/write/clean.py)."""

    slices: np.ndarray  # the slice of each cycle
    starts: np.ndarray  # where each cycle's points start
    points: np.ndarray  # (n, 2) row/column, multiples of 0.5
    twice_area: np.ndarray  # twice the signed shoelace area of each cycle (< 0 outer contour, > 0 hole)

    def shifted(self, slices: int, rows: int, columns: int) -> Outlines:
        return Outlines(self.slices + slices, self.starts, self.points + np.array([rows, columns], dtype=np.float64),
                        self.twice_area)


_NO_OUTLINES = Outlines(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty((0, 2)), np.empty(0))


def _outlines(slab: Callable[[int, int], np.ndarray], count: int) -> Outlines:
    """The outlines of a mask of ``count`` slices, ``slab(a, b)`` giving slices a..b-1 as booleans.

    Contours lie within one slice, so slabs of SLAB_SLICES slices are traced one after another: the
    working memory (the padded slab, its transitions, a dozen arrays per boundary edge) stays that of a
    slab, and a label volume never has to become a whole boolean mask. The result is the same as for the
    whole stack at once: cycles start at their first vertical edge in raster order within a slice either way.
    """
    parts = [_outline_block(slab(a, min(a + SLAB_SLICES, count))).shifted(a, 0, 0)
             for a in range(0, count, SLAB_SLICES)]
    if not parts:
        return _NO_OUTLINES
    sizes = np.array([len(part.points) for part in parts])
    firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return Outlines(np.concatenate([part.slices for part in parts]),
                    np.concatenate([part.starts + first for part, first in zip(parts, firsts, strict=True)]),
                    np.concatenate([part.points for part in parts]),
                    np.concatenate([part.twice_area for part in parts]))


def _trace(slab: Callable[[int, int], np.ndarray], count: int, smooth: bool = False) -> Traced:
    """Contours of a mask of ``count`` slices, ``slab(a, b)`` giving slices a..b-1 as booleans (see
    :func:`_outlines` and :func:`finish`)."""
    return finish(_outlines(slab, count), smooth)


_EMPTY = Traced(np.empty(0, dtype=np.int64), np.zeros(1, dtype=np.int64), np.empty((0, 2)), np.empty(0))


def _outline_block(mask: np.ndarray) -> Outlines:
    """The outlines of one (slices, rows, cols) boolean block, all at once."""
    layers = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    if layers.size == 0:
        return _NO_OUTLINES
    k0 = layers[0]
    footprint = np.asarray(mask[k0 : layers[-1] + 1].any(axis=0))  # rows × columns
    occupied, columns = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    r0, c0 = occupied[0], columns[0]
    crop = mask[k0 : layers[-1] + 1, r0 : occupied[-1] + 1, c0 : columns[-1] + 1]  # work on the bounding box
    slices, start, end, direction, mid = _boundary_edges(crop)
    order, starts = _cycles(_link(start, end, direction))
    points = mid[order] + np.array([r0, c0], dtype=np.float64)
    cycle, after, _ = _next_in_cycle(starts, len(points))
    # Shoelace area of the traced outline (exact: coordinates are multiples of 0.5), signed: the inside
    # is on the right of every edge, so outer contours (negative here, rows pointing down) and holes
    # have opposite signs.
    r, c = points[:, 0], points[:, 1]
    twice_area = np.bincount(cycle, r * c[after] - c * r[after], minlength=len(starts))
    return Outlines(slices[order[starts]] + k0, starts, points, twice_area)


def finish(outlines: Outlines, smooth: bool = False) -> Traced:
    """The contours of ``outlines``: smoothed when asked (node/write/smoothing.py), collinear points dropped,
    degenerate contours dropped, in slice order. The signed area is that of the traced outline (before
    smoothing): positive for an outer contour, negative for a hole."""
    contour_slice, starts, points, twice_area = outlines
    if len(starts) == 0:
        return _EMPTY
    cycle, after, before = _next_in_cycle(starts, len(points))
    if smooth:
        points = smoothed(points, after, before)

    # Drop points on the straight line through their neighbours (exact: no shape change). Marching
    # squares puts a point on every pixel edge it crosses, so straight runs carry one point per pixel;
    # dropping them shrinks ContourData several-fold without moving the outline. Straight
    # continuation only (dot > 0): a reversal would be a spike tip, which is kept. Runs of collinear
    # points all go at once: the line through the run's end points is the same. Contours of at most
    # 3 points keep them all. (After smoothing, only runs that stayed straight go.)
    back = points - points[before]
    ahead = points[after] - points
    cross = back[:, 0] * ahead[:, 1] - back[:, 1] * ahead[:, 0]
    dot = (back * ahead).sum(axis=1)
    lengths = np.diff(np.append(starts, len(points)))
    keep = ~((np.abs(cross) < 1e-9) & (dot > 0) & (lengths[cycle] > 3))
    points, cycle = points[keep], cycle[keep]
    if smooth:
        kept = np.bincount(cycle, minlength=len(starts))
        _, after, before = _next_in_cycle(np.concatenate([[0], np.cumsum(kept)[:-1]]), len(points))
        keep = simplified(points, cycle, after, before, len(starts))
        points, cycle = points[keep], cycle[keep]

    # Drop degenerate contours.
    kept = np.bincount(cycle, minlength=len(starts))
    kept_starts = np.concatenate([[0], np.cumsum(kept)[:-1]])
    valid = np.flatnonzero((kept >= 3) & (0.5 * np.abs(twice_area) >= MIN_AREA_PX))
    chosen = valid[np.argsort(contour_slice[valid], kind="stable")]  # slice order; ties keep edge order

    sizes = kept[chosen]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    gather = np.repeat(kept_starts[chosen] - offsets[:-1], sizes) + np.arange(offsets[-1])
    return Traced(contour_slice[chosen], offsets, points[gather], -0.5 * twice_area[chosen])  # outer contours > 0


def mask_contours_px(mask: np.ndarray, *, smooth: bool = False) -> list[tuple[int, np.ndarray]]:
    """Closed contours (slice, (n, 2) row/col points) of every slice of a (slices, rows, cols) mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    slices, offsets, points, _ = _trace(lambda a, b: mask[a:b], len(mask), smooth)
    return [(int(k), points[a:b]) for k, a, b in zip(slices, offsets[:-1], offsets[1:], strict=True)]


def slice_contours_px(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (row, col) of a 2D boolean mask, each without a repeated end point."""
    return [points for _, points in mask_contours_px(mask[None])]


@dataclass(frozen=True)
class Contours:
    """All contours of one mask, in slice order: contour ``n`` lies on slice ``slices[n]`` and its
    points are ``points_lps[offsets[n] : offsets[n + 1]]`` (mm, LPS). ``areas_px[n]`` is the area of its
    traced outline in pixels, positive for an outer contour, negative for a hole (it is the area of the
    pixels it encloses less half a pixel, the corners its chamfers cut, for an outline without saddles)."""

    slices: np.ndarray
    offsets: np.ndarray
    points_lps: np.ndarray
    areas_px: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def sizes(self) -> np.ndarray:
        """Number of points of each contour."""
        return np.diff(self.offsets)

    def split(self) -> list[SliceContour]:
        return [SliceContour(int(k), self.points_lps[a:b])
                for k, a, b in zip(self.slices.tolist(), self.offsets[:-1].tolist(), self.offsets[1:].tolist(),
                                   strict=True)]


def trace_mask(mask: np.ndarray, geometry: Geometry, *, smooth: bool = False) -> Contours:
    """All contours of a (slices, rows, cols) mask, in patient coordinates, in slice order."""
    mask = np.asarray(mask, dtype=bool)
    return _in_patient_space(_trace(lambda a, b: mask[a:b], len(mask), smooth), geometry)


#: A box of a label volume: (slices, rows, columns) ranges; see :func:`label_boxes`.
Box = tuple[slice, slice, slice]


def label_boxes(labels: np.ndarray) -> dict[int, Box]:
    """The bounding box of each label value present in ``labels`` (one pass over the volume, scipy's
    ``find_objects``). Tracing a structure within its box instead of the whole volume is what keeps a
    result of a hundred organs fast: comparing every voxel once per structure cost more than the tracing."""
    found = find_objects(labels)
    return {value: (box[0], box[1], box[2]) for value, box in enumerate(found, start=1) if box is not None}


def structure_box(boxes: dict[int, Box], values: tuple[int, ...]) -> Box | None:
    """The box holding every label of ``values`` (a structure and the labels it includes); None: none present."""
    present = [boxes[v] for v in values if v in boxes]
    if not present:
        return None
    return (slice(min(b[0].start for b in present), max(b[0].stop for b in present)),
            slice(min(b[1].start for b in present), max(b[1].stop for b in present)),
            slice(min(b[2].start for b in present), max(b[2].stop for b in present)))


def outline_label_px(labels: np.ndarray, value: int, includes: tuple[int, ...] = (), *,
                     box: Box | None = None) -> Outlines:
    """The outlines of ``labels == value`` (or any of ``value, *includes``), without making that whole mask; only
    within ``box`` when given (which must hold every pixel of the structure)."""
    if box is not None:
        return outline_label_px(labels[box], value, includes).shifted(box[0].start, box[1].start, box[2].start)
    if includes:
        lut = np.zeros(256, dtype=bool)
        lut[[value, *includes]] = True
        return _outlines(lambda a, b: lut[labels[a:b]], len(labels))
    return _outlines(lambda a, b: labels[a:b] == value, len(labels))


def trace_label_px(labels: np.ndarray, value: int, includes: tuple[int, ...] = (), *, smooth: bool = False,
                   box: Box | None = None) -> Traced:
    """Contours of ``labels == value`` (or any of ``value, *includes``) in pixel coordinates (see
    :func:`outline_label_px`)."""
    return finish(outline_label_px(labels, value, includes, box=box), smooth)


def trace_label(labels: np.ndarray, value: int, geometry: Geometry, includes: tuple[int, ...] = (), *,
                smooth: bool = False, box: Box | None = None, outlines: Outlines | None = None) -> Contours:
    """:func:`trace_mask` of ``labels == value`` (or any of ``value, *includes``), without making that whole mask;
    only within ``box`` when given; from ``outlines`` when given (the structure's, already traced)."""
    if outlines is None:
        outlines = outline_label_px(labels, value, includes, box=box)
    return _in_patient_space(finish(outlines, smooth), geometry)


def _in_patient_space(traced: Traced, geometry: Geometry) -> Contours:
    slices, offsets, points, areas = traced
    kij = np.column_stack([np.repeat(slices, np.diff(offsets)).astype(np.float64), points[:, 0], points[:, 1]])
    return Contours(slices, offsets, geometry.to_patient(kij), areas)


def mask_contours(mask: np.ndarray, geometry: Geometry) -> list[SliceContour]:
    """All contours of a (slices, rows, cols) mask, in patient coordinates, in slice order."""
    return trace_mask(mask, geometry).split()
