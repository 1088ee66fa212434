"""BODY (the External outline) on the coarse grid: step 2 of ``node.infer.anatomy`` (its docstring tells
the whole method).

Tissue is ``HU > BODY_HU``; an in-plane opening cuts the couch off, the largest 3-D component and the
body-like others (arms, legs) are kept, details and shells the opening shaved off come back, and holes
are filled plane by plane, and so is air that reaches the outside only through a gap narrower than
``GAP_MAX_MM`` (an air-filled skull whose thin bone reads below ``BODY_HU`` in places).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.infer.anatomy_grid import (
    CONN6,
    INPLANE4,
    INPLANE8,
    CoarseFrame,
    bbox,
    dilate,
    erode,
    fill_enclosed_inplane,
    fill_holes_inplane,
    shape_of,
)

#: Tissue (BODY) threshold, HU; planning systems use −300…−500 (Eclipse: −350).
BODY_HU = -400.0
#: In-plane opening that separates the couch from the patient (side of the square), mm.
COUCH_OPEN_MM = 15.0
#: An in-plane hole of the tissue counts as the patient's (and is solid for the opening) when at
#: least this fraction of its rim is thick tissue (survives the opening).
HOLE_MIN_THICK_RIM = 0.4
#: Extra 3-D components (arms, legs) are kept at this fraction of the largest one's volume or more...
EXTRA_MIN_FRACTION = 0.01
#: ... with at least this mean cross-section per plane (couch rails are smaller), cm²...
EXTRA_MIN_AREA_CM2 = 12.0
#: ... and no flatter than this (ratio of the in-plane principal axes; couch boards are flatter).
EXTRA_MAX_ELONGATION = 4.0
#: Parts removed by the opening come back when they reach no further than this in-plane, mm.
DETAIL_MAX_MM = 40.0
#: A long piece removed by the opening is a shell of the body (a phantom's wall, a skull without
#: scalp) when it surrounds its centre (this fraction of directions) in this fraction of its planes.
SHELL_MIN_COVERAGE = 0.8
SHELL_MIN_PLANES = 0.25
#: Air inside the body that reaches the outside only through openings narrower than this (in-plane,
#: on the coarse grid) is enclosed, and filled like a hole: a skull phantom's air behind bone that
#: partial volume brings below BODY_HU, a sinus, bowel gas at a thin wall. Slits narrower than this
#: everywhere (between an arm and the trunk) stay out.
GAP_MAX_MM = 8.0
_SECTORS = 36
#: Pieces shaved off by the opening: 6-connected across planes, 8-connected in-plane (a thin ring on
#: the coarse grid touches itself diagonally).
_CONN_PIECES = CONN6 | INPLANE8


def gap_radius(spacing: tuple[float, float, float]) -> int:
    """Radius (coarse voxels) of the disk that passes only through openings of at least ``GAP_MAX_MM``."""
    return max(1, int(np.ceil((GAP_MAX_MM / min(spacing[1], spacing[2]) - 1) / 2)))


def _odd(mm: float, spacing: float) -> int:
    n = round(mm / spacing)
    return max(1, n + 1 - n % 2)


def _patient_holes(tissue: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """In-plane holes of ``tissue`` whose rim is at least HOLE_MIN_THICK_RIM ``thick`` (the trachea
    behind a thin anterior neck, lungs behind a thin chest wall); a couch's hollow core, rimmed by
    thin shells only, is not one."""
    holes = fill_holes_inplane(tissue) & ~tissue
    tight = bbox(holes)
    if tight is None:
        return holes
    box = (tight[0], *(slice(max(b.start - 1, 0), min(b.stop + 1, n))
                       for b, n in zip(tight[1:], tissue.shape[1:], strict=True)))
    inside = holes[box]
    labels, n = ndimage.label(inside, structure=INPLANE4)
    near = ndimage.maximum_filter(labels, size=(1, 3, 3), mode="constant", cval=0)
    rim = (near > 0) & ~inside
    owner = near[rim]
    total = np.bincount(owner, minlength=n + 1)
    thick_rim = np.bincount(owner, weights=thick[box][rim], minlength=n + 1)
    keep = thick_rim >= HOLE_MIN_THICK_RIM * np.maximum(total, 1)
    keep[0] = False
    out = np.zeros(tissue.shape, dtype=bool)
    out[box] = keep[labels]
    return out


def body_coarse(hu: np.ndarray, frame: CoarseFrame) -> np.ndarray:
    tissue = hu > BODY_HU
    if not tissue.any():
        return tissue
    size = _odd(COUCH_OPEN_MM, min(frame.spacing[1], frame.spacing[2]))
    # Holes of the patient are solid for the opening: a wall thinner than the opening (the front of
    # the neck over the larynx, a thin chest wall over a lung) is not cut off.
    tissue |= _patient_holes(tissue, dilate(erode(tissue, size), size) if size > 1 else tissue)
    opened = dilate(erode(tissue, size), size) if size > 1 else tissue
    labels, n = ndimage.label(opened, structure=CONN6)
    if n == 0:  # nothing survives the opening (a thin object): no couch separation possible
        opened = tissue
        labels, n = ndimage.label(opened, structure=CONN6)
    count = np.bincount(labels.ravel(), minlength=n + 1)
    count[0] = 0
    largest = int(np.argmax(count))
    keep = np.zeros(n + 1, dtype=bool)
    keep[largest] = True
    boxes = ndimage.find_objects(labels)
    for c in np.flatnonzero(count >= EXTRA_MIN_FRACTION * count[largest]):
        box = boxes[c - 1]
        if c == largest or box is None:
            continue
        area, elongation = shape_of(labels[box] == c, frame)
        keep[c] = area >= EXTRA_MIN_AREA_CM2 and elongation <= EXTRA_MAX_ELONGATION
    body = keep[labels]
    # What the opening shaved off the kept body comes back when it touches it and is a detail
    # (small in-plane: nose tip, ear, fingers), or when it is a shell around it, touching it or not (a
    # skull phantom's wall, a thin-walled phantom round free-standing inserts: with it come the pieces
    # inside that it touches). Long pieces that are not shells (a couch shell touching the back, a
    # head cradle) stay out.
    residual = tissue & ~opened
    radius = gap_radius(frame.spacing)
    if residual.any():
        body |= _shaved_back(residual, body, labels, opened, frame, radius)
    return fill_enclosed_inplane(body, radius)


def _shaved_back(residual: np.ndarray, body: np.ndarray, labels: np.ndarray, opened: np.ndarray,
                 frame: CoarseFrame, radius: int) -> np.ndarray:
    """What of ``residual`` (and of the opened pieces ``labels``) comes back to ``body``."""
    rlabels, rn = ndimage.label(residual, structure=_CONN_PIECES)
    touching = np.zeros(rn + 1, dtype=bool)
    touching[np.unique(rlabels[dilate(body, 3) & residual])] = True
    touching[0] = False
    reach_i = DETAIL_MAX_MM / frame.spacing[1]
    reach_j = DETAIL_MAX_MM / frame.spacing[2]
    back = np.zeros(rn + 1, dtype=bool)
    shells: list[int] = []
    boxes = ndimage.find_objects(rlabels)
    for idx, box in enumerate(boxes, start=1):
        if box is None:
            continue
        detail = box[1].stop - box[1].start <= reach_i and box[2].stop - box[2].start <= reach_j
        if touching[idx] and detail:
            back[idx] = True
        elif not detail and _is_shell(rlabels[box] == idx, frame) and (
                touching[idx] or _encloses(rlabels, idx, box, body, radius)):
            back[idx] = True
            shells.append(idx)
    # The dome of a shell above what it encloses (the top of a skull phantom over its inserts, in pieces
    # where partial volume breaks it): what lies inside the filled outline of the plane next to it comes
    # back, plane after plane.
    size = np.bincount(rlabels.ravel(), minlength=rn + 1)
    while shells:
        outline = fill_enclosed_inplane(body | back[rlabels], radius)
        near = outline.copy()
        near[1:] |= outline[:-1]
        near[:-1] |= outline[1:]
        inside = np.bincount(rlabels[near & residual], minlength=rn + 1)
        more = ~back & (2 * inside >= size)
        more[0] = False
        if not more.any():
            break
        back |= more
        shells.extend(int(i) for i in np.flatnonzero(more))
    out = back[rlabels]
    if shells:
        # Opened pieces that a shell touches (the inserts of a phantom, thick parts of its wall).
        near = dilate(np.isin(rlabels, shells), 3)
        inner = np.unique(labels[near & opened])
        inner = inner[inner > 0]
        out |= np.isin(labels, inner)
    return out


def _encloses(rlabels: np.ndarray, idx: int, box: tuple[slice, ...], body: np.ndarray, radius: int) -> bool:
    """True when piece ``idx`` of ``rlabels`` (a shell) surrounds some of ``body`` in-plane without touching
    it: a thin-walled phantom around inserts that stand free in its air. Judged in the piece's box grown
    by a margin, so that only the image's own edges count as walls."""
    margin = radius + 2
    grown = (box[0], *(slice(max(b.start - margin, 0), min(b.stop + margin, n))
                       for b, n in zip(box[1:], rlabels.shape[1:], strict=True)))
    piece = rlabels[grown] == idx
    return bool((fill_enclosed_inplane(piece, radius) & ~piece & body[grown]).any())


def _is_shell(piece: np.ndarray, frame: CoarseFrame) -> bool:
    """True when ``piece`` surrounds its own centre (covers ``SHELL_MIN_COVERAGE`` of the directions
    around it) in at least ``SHELL_MIN_PLANES`` of the planes it spans; a couch or a head cradle
    lies on one side."""
    k, i, j = np.nonzero(piece)
    if k.size == 0:
        return False
    planes = piece.shape[0]
    count = np.maximum(np.bincount(k, minlength=planes), 1)
    yi = i * frame.spacing[1]
    yj = j * frame.spacing[2]
    ci = np.bincount(k, weights=yi, minlength=planes) / count
    cj = np.bincount(k, weights=yj, minlength=planes) / count
    angle = np.arctan2(yi - ci[k], yj - cj[k])
    sector = np.minimum(((angle + np.pi) / (2 * np.pi) * _SECTORS).astype(np.int64), _SECTORS - 1)
    covered = np.bincount(np.unique(k * _SECTORS + sector) // _SECTORS, minlength=planes)
    present = np.count_nonzero(np.bincount(k, minlength=planes))
    ringed = np.count_nonzero(covered >= SHELL_MIN_COVERAGE * _SECTORS)
    return bool(ringed >= max(1, SHELL_MIN_PLANES * present))

