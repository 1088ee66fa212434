"""Half-pixel smoothing of traced contours: rounded staircases, fewer points, no pixel centre crossed.

Two steps, both vectorised over every contour of a slab (node/write/contours.py calls them):

1. :func:`smoothed`: SMOOTHING_PASSES passes of a [1, 2, 1] / 4 filter along each contour, every point's
   move clamped to SMOOTHING_CLAMP_PX.
2. :func:`simplified`: points dropped while the polyline stays within SIMPLIFY_TOLERANCE_PX of the smoothed
   one (each pass drops, among the points whose removal keeps that bound, those whose cost is a local
   minimum, so no two neighbours go at once; the bound of every new segment is carried forward).

Every point of the result lies within SMOOTHING_CLAMP_PX + SIMPLIFY_TOLERANCE_PX =
MAX_SMOOTHING_SHIFT_PX (0.35 px) of the traced outline, and moving the traced outline there point by
point keeps every intermediate outline as near. The traced outline passes no nearer than 0.354 px to a
pixel centre (at its 45° chamfers; 0.5 px elsewhere), so no pixel centre ever changes side: filled by
pixel centres, the smoothed contours give back exactly the mask they were traced from (and the SEG
written from it). Distinct traced contours are at least 0.707 px apart (two pixels touching at a
corner), so two smoothed contours never cross either.
"""

from __future__ import annotations

import numpy as np

from node.model.bundle import MAX_SMOOTHING_SHIFT_PX

#: Passes of the [1, 2, 1] / 4 filter along a contour (a Gaussian of about 1.4 points' sigma).
SMOOTHING_PASSES = 4
#: The most the filter may move a point, in pixels; the rest of MAX_SMOOTHING_SHIFT_PX goes to simplification.
SMOOTHING_CLAMP_PX = 0.25
SIMPLIFY_TOLERANCE_PX = MAX_SMOOTHING_SHIFT_PX - SMOOTHING_CLAMP_PX
#: Simplification passes (each drops at most every other point of a contour) and the smallest contour it
#: thins (so that at least 4 points remain).
SIMPLIFY_PASSES = 12
SIMPLIFY_MIN_POINTS = 8


def smoothed(points: np.ndarray, after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """(n, 2) points filtered along their contours (``after``/``before``: each point's neighbours)."""
    r, c = points[:, 0], points[:, 1]
    sr, sc = r, c
    for _ in range(SMOOTHING_PASSES):
        sr = 0.5 * sr + 0.25 * (sr[before] + sr[after])
        sc = 0.5 * sc + 0.25 * (sc[before] + sc[after])
    dr, dc = sr - r, sc - c
    scale = np.minimum(1.0, SMOOTHING_CLAMP_PX / np.maximum(np.hypot(dr, dc), 1e-12))
    return np.column_stack([r + dr * scale, c + dc * scale])


def _segment_distance(qr: np.ndarray, qc: np.ndarray, ar: np.ndarray, ac: np.ndarray, br: np.ndarray,
                      bc: np.ndarray) -> np.ndarray:
    """Distance of each point q from the segment a–b (coordinates as separate arrays)."""
    abr, abc = br - ar, bc - ac
    t = np.clip(((qr - ar) * abr + (qc - ac) * abc) / np.maximum(abr * abr + abc * abc, 1e-24), 0.0, 1.0)
    return np.hypot(qr - ar - t * abr, qc - ac - t * abc)


def simplified(points: np.ndarray, cycle: np.ndarray, after: np.ndarray, before: np.ndarray,
               count: int) -> np.ndarray:
    """Which of ``points`` (contour ``cycle`` of ``count``, neighbours ``after``/``before``) to keep.

    After the first pass only the points whose cost can have changed are looked at again: those that
    could go but were not taken, and the neighbours of those that went.
    """
    r, c = points[:, 0], points[:, 1]
    nxt, prv = after.copy(), before.copy()
    alive = np.ones(len(points), dtype=bool)
    remaining = np.bincount(cycle, minlength=count)
    error = np.zeros(len(points))  # bound of the segment from each point to its next alive point
    cost = np.full(len(points), np.inf)
    active = np.flatnonzero(remaining[cycle] >= SIMPLIFY_MIN_POINTS)
    for _ in range(SIMPLIFY_PASSES):
        active = active[alive[active] & (remaining[cycle[active]] >= SIMPLIFY_MIN_POINTS)]
        if active.size == 0:
            break
        p, n = prv[active], nxt[active]
        bound = np.maximum(error[p], error[active]) + _segment_distance(r[active], c[active], r[p], c[p], r[n], c[n])
        mine = np.where(bound <= SIMPLIFY_TOLERANCE_PX, bound, np.inf)
        cost[active] = mine
        # A local minimum of (cost, index) among its neighbours: never two neighbours in one pass.
        lower_than_prev = (mine < cost[p]) | ((mine == cost[p]) & (active < p))
        lower_than_next = (mine < cost[n]) | ((mine == cost[n]) & (active < n))
        go = np.isfinite(mine) & lower_than_prev & lower_than_next
        cost[active] = np.inf  # costs are recomputed where they are looked at next
        if not go.any():
            break
        gone, p_gone, n_gone = active[go], p[go], n[go]
        error[p_gone] = mine[go]
        nxt[p_gone], prv[n_gone] = n_gone, p_gone
        alive[gone] = False
        remaining -= np.bincount(cycle[gone], minlength=count)
        look = np.zeros(len(points), dtype=bool)
        look[active[np.isfinite(mine) & ~go]] = look[p_gone] = look[n_gone] = True
        active = np.flatnonzero(look)
    return alive
