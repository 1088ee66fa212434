"""Clean a label volume before it is written: small parts dropped, holes filled, per the bundle's rules.

The SEG and the RTSTRUCT are both written from the cleaned labels, so they agree: a planning system
that fills our contours by pixel centres gets back exactly the SEG's pixels. Cleaning is in-plane,
slice by slice, because contours are: a *part* is a 4-connected set of a structure's pixels on one slice
(the tracer gives each its own outer contour), a *hole* an 8-connected set of other pixels on that slice
that the structure encloses (the tracer gives each its own inner contour). The area of a part or a hole
is the area inside its outline, in pixels enclosed (node/write/contour_check.py measures the same).
Each structure's :class:`~node.model.bundle.ContourRule` (``[contours]`` in the manifest) says:

- ``min_island_mm2``: a smaller part is dropped. Its pixels go to the structure that includes this one
  (a dropped piece of lung stays BODY), or to the background.
- ``keep_holes`` / ``min_hole_mm2``: a hole is filled unless holes are kept and it is at least the
  minimum. Only pixels of the background or of the including structure are filled (another structure
  inside the hole stays itself).

How: the structure is traced (node/write/contours.py, vectorised: a few tenths of a second for 300
slices of 512²), which gives every part and hole with its area; the outlines to act on are then filled
by pixel centres, all at once (:func:`inside_pixels`). The traced outline encloses exactly its pixels,
so the pixels inside a small part's outline are that part (and anything in its holes, smaller still),
and those inside a hole's outline are the hole (and whatever lies in it). No connected-component
labelling, and clean slices cost nothing beyond the tracing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from node.model.bundle import Bundle, ContourRule, Label
from node.model.volume import Geometry
from node.write.contours import Box, Outlines, Traced, finish, label_boxes, outline_label_px, structure_box


@dataclass(frozen=True)
class Cleaning:
    """What cleaning changed in one structure."""

    name: str
    parts_dropped: int
    holes_filled: int
    pixels_changed: int


def inside_pixels(traced: Traced, chosen: np.ndarray) -> tuple[np.ndarray, ...]:
    """(contour, slice, row, column) of every pixel whose centre lies inside one of the ``chosen`` outlines.

    Each outline is filled on its own, by the even-odd rule along each pixel row: an edge crosses row r
    when r lies in [its lower end, its upper end); the crossings of one outline on one row pair up, and
    the pixel centres between a pair are inside. Outline points lie on half-pixel positions along the
    row, never on a pixel centre, so no centre is ever on the boundary.
    """
    empty = np.empty(0, dtype=np.int64)
    if chosen.size == 0:
        return empty, empty, empty, empty
    starts, ends = traced.offsets[chosen], traced.offsets[chosen + 1]
    sizes = ends - starts
    index = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())  # points of chosen
    following = np.where(index + 1 == np.repeat(ends, sizes), np.repeat(starts, sizes), index + 1)
    a, b = traced.points[index], traced.points[following]
    owner = np.repeat(np.arange(len(chosen)), sizes)
    low, high = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    first, stop = np.ceil(low).astype(np.int64), np.ceil(high).astype(np.int64)  # rows first .. stop - 1
    rows_per_edge = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(a)), rows_per_edge)
    row = np.repeat(first, rows_per_edge) + np.arange(rows_per_edge.sum()) - np.repeat(
        np.cumsum(rows_per_edge) - rows_per_edge, rows_per_edge)
    ea, eb = a[edge], b[edge]
    x = ea[:, 1] + (row - ea[:, 0]) * (eb[:, 1] - ea[:, 1]) / (eb[:, 0] - ea[:, 0])
    order = np.lexsort((x, row, owner[edge]))
    row, x, who = row[order], x[order], owner[edge][order]
    start_col, end_col = np.ceil(x[0::2]).astype(np.int64), np.floor(x[1::2]).astype(np.int64)
    span_row, span_who = row[0::2], who[0::2]
    width = np.maximum(end_col - start_col + 1, 0)
    col = np.repeat(start_col, width) + np.arange(width.sum()) - np.repeat(np.cumsum(width) - width, width)
    who_px = np.repeat(span_who, width)
    return chosen[who_px], traced.slices[chosen][who_px], np.repeat(span_row, width), col


@dataclass(frozen=True)
class _Plan:
    """The pixels one structure's cleaning would change (found from its outlines, not applied yet)."""

    label: Label
    parent: int
    drop: tuple[np.ndarray, ...]  # (slice, row, column) inside the outlines of parts to drop
    fill: tuple[np.ndarray, ...]  # (outline, slice, row, column) inside the outlines of holes to fill
    parts: int
    outlines: Outlines  # as traced, before cleaning

    def apply(self, labels: np.ndarray) -> Cleaning:
        members = np.zeros(256, dtype=bool)
        members[[self.label.value, *self.label.includes]] = True
        fillable = np.zeros(256, dtype=bool)
        fillable[[0, self.parent]] = True
        k, i, j = self.drop
        mine = members[labels[k, i, j]]
        labels[k[mine], i[mine], j[mine]] = self.parent
        which, k, i, j = self.fill
        free = fillable[labels[k, i, j]]
        labels[k[free], i[free], j[free]] = self.label.value
        return Cleaning(self.label.name, self.parts, int(np.unique(which[free]).size),
                        int(np.count_nonzero(mine)) + int(np.count_nonzero(free)))


def _plan(labels: np.ndarray, label: Label, rule: ContourRule, parent: int, pixel_mm2: float,
          box: Box | None) -> _Plan:
    """Trace one structure (within ``box``, which holds all of it) and find the pixels inside the outlines its
    rule drops or fills."""
    outlines = outline_label_px(labels, label.value, label.includes, box=box)
    traced = finish(outlines)
    enclosed = (np.abs(traced.areas) + 0.5) * pixel_mm2  # the area inside each outline (see Contours.areas_px)
    outer = traced.areas > 0
    drop = np.flatnonzero(outer & (enclosed < rule.min_island_mm2))
    fill = np.flatnonzero(~outer & (enclosed < rule.min_hole_mm2) if rule.keep_holes else ~outer)
    return _Plan(label, parent, inside_pixels(traced, drop)[1:], inside_pixels(traced, fill), len(drop), outlines)


#: The box of a structure that is not in the label volume: nothing to trace.
_NOWHERE: Box = (slice(0, 0), slice(0, 0), slice(0, 0))


def clean_labels(labels: np.ndarray, bundle: Bundle, geometry: Geometry,
                 outlines: dict[int, Outlines] | None = None) -> list[Cleaning]:
    """Clean ``labels`` (slices, rows, cols; uint8) in place by each label's rule; what changed, per label.

    Structures that include others are cleaned first, one after another (dropping a part of BODY drops
    the lung pixels in it). The others are traced at the same time, on threads (the tracing is numpy work
    that releases the GIL), then changed one after another: none of them writes another's value or
    removes another's pixels (a part goes to the structure including it, a hole takes only background or
    that structure's pixels), so each one's outlines are the same whichever is changed first.

    ``outlines``, when given, receives (by label value) the outlines traced here that are still those of the
    cleaned labels, for the RTSTRUCT (node/write/rtstruct.py; the tracing is most of the cleaning's cost): a
    structure that includes none changed nothing but itself, so its outlines hold when its own cleaning
    changed nothing; those of a structure including others hold when the cleaning changed nothing at all.
    """
    _, dy, dx = geometry.spacing
    pixel_mm2 = abs(dy * dx)
    parents = {value: label.value for label in bundle.labels for value in label.includes}
    # Each structure is traced within its bounding box. Cleaning never moves a structure's pixels outside the
    # boxes found here: a dropped part goes to the structure including it (whose box holds it), a filled hole
    # lies within the structure's own outline.
    boxes = label_boxes(labels)

    def plan(label: Label) -> _Plan:
        return _plan(labels, label, bundle.contours.rule(label), parents.get(label.value, 0), pixel_mm2,
                     structure_box(boxes, (label.value, *label.includes)) or _NOWHERE)

    done: dict[str, Cleaning] = {}
    includers: list[_Plan] = []
    for label in sorted((lb for lb in bundle.labels if lb.includes), key=lambda lb: -len(lb.includes)):
        includers.append(plan(label))
        done[label.name] = includers[-1].apply(labels)
    leaves = [label for label in bundle.labels if not label.includes]
    with ThreadPoolExecutor(max_workers=max(1, min(len(leaves), os.cpu_count() or 1))) as pool:
        plans = list(pool.map(plan, leaves))
    for leaf_plan in plans:
        done[leaf_plan.label.name] = leaf_plan.apply(labels)
    if outlines is not None:
        unchanged = not any(cleaning.pixels_changed for cleaning in done.values())
        outlines.update({p.label.value: p.outlines for p in plans if not done[p.label.name].pixels_changed})
        outlines.update({p.label.value: p.outlines for p in includers if unchanged})
    return [done[label.name] for label in bundle.labels]
