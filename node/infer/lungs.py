"""Left and right lungs on the coarse grid: step 3 of ``node.infer.anatomy`` (its docstring tells the
whole method).

Air (``HU < LUNG_HU``) inside the filled BODY; airway blobs near the midline out; 3-D components big
enough and of lung density (not nearly all pure air, as bowel gas is) are lungs; gas behind a thin
diaphragm carved off; each lung goes to the side of the body's midline it lies on, lungs that touch
are split by in-plane erosion; each side is filled plane by plane.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.infer.anatomy_grid import (
    CONN6,
    INPLANE8,
    CoarseFrame,
    bbox,
    dilate,
    erode,
    fill_holes_inplane,
    label_stats,
    midline_x,
    shifted,
)

#: Lung air threshold, HU (half way between parenchyma at about −850 and soft tissue).
LUNG_HU = -400.0
#: Air without parenchyma (bowel gas, trachea) is below this, HU; 50 HU above the air around the
#: patient when that reads higher than −1000 HU, up to PURE_AIR_MAX_HU.
PURE_AIR_HU = -950.0
PURE_AIR_MAX_HU = -880.0
#: Smallest lung component, mL.
LUNG_MIN_ML = 15.0
#: Lung components have fewer voxels than this below PURE_AIR_HU (bowel gas has more).
LUNG_MAX_PURE_FRACTION = 0.5
#: A lung's centre lies at least this far to its side of the body's midline, mm.
LUNG_MIN_OFFSET_MM = 20.0
#: Pieces of a lung component cut off by gas removal stay at this fraction of its largest piece.
LUNG_MIN_PIECE = 0.1
#: Airway blobs: in-plane area below this (cm²), mean HU below AIRWAY_MEAN_HU, within
#: AIRWAY_MIDLINE_MM of the body's midline.
AIRWAY_MAX_AREA_CM2 = 12.0
AIRWAY_MEAN_HU = -900.0
AIRWAY_MIDLINE_MM = 45.0
#: In-plane erosion steps tried to separate lungs that touch (coarse voxels).
SPLIT_MAX_EROSION = 6


def lungs_coarse(hu: np.ndarray, body: np.ndarray, frame: CoarseFrame) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros(hu.shape, dtype=bool)
    right = np.zeros(hu.shape, dtype=bool)
    air = body & (hu < LUNG_HU)
    box = bbox(air)
    if box is None:
        return left, right
    midline = midline_x(body, frame)[box[0]]
    pure_hu = _pure_air_hu(hu, body)
    sub_frame = shifted(frame, box)
    air = air[box]
    sub_hu = hu[box]
    # 1. Airway blobs (trachea, main bronchi) out, plane by plane.
    labels, n = ndimage.label(air, structure=INPLANE8)
    stats = label_stats(labels, n, air, sub_frame, sub_hu, pure_hu)
    area = stats["count"] * frame.pixel_cm2
    offset = np.abs(stats["x"] - midline[np.rint(stats["plane"]).astype(np.int64)])
    airway_hu = pure_hu + (AIRWAY_MEAN_HU - PURE_AIR_HU)
    airway = (area < AIRWAY_MAX_AREA_CM2) & (stats["hu"] < airway_hu) & (offset < AIRWAY_MIDLINE_MM)
    airway[0] = False
    air &= ~airway[labels]
    del labels
    # 2. Lung components: big, with lung density (bowel gas is nearly all pure air).
    labels, n = ndimage.label(air, structure=CONN6)
    stats = label_stats(labels, n, air, sub_frame, sub_hu, pure_hu)
    volume = stats["count"] * frame.voxel_ml
    is_lung = (volume >= LUNG_MIN_ML) & (stats["pure"] < LUNG_MAX_PURE_FRACTION)
    is_lung[0] = False
    if not is_lung.any():
        return left, right
    lungs = is_lung[labels]
    # 3. Gas that touches a lung through a thin diaphragm (stomach fundus, colon), and the airway
    # lumen: pure air wide enough to survive an in-plane opening, with its partial-volume rim, comes
    # off; of each lung component, the pieces left that are big (absolutely and next to the
    # component's largest piece) stay. Gas enclosed by lung (a bulla, a bronchus) comes back with
    # the filling.
    gas = dilate(erode((sub_hu < pure_hu) & lungs, 3), 3)
    if gas.any():
        lungs &= ~dilate(gas, 3)
        pieces, m = ndimage.label(lungs, structure=CONN6)
        if m == 0:
            return left, right
        count = np.bincount(pieces.ravel(), minlength=m + 1)
        count[0] = 0
        parent = np.zeros(m + 1, dtype=np.int64)
        parent[pieces[lungs]] = labels[lungs]
        largest = np.zeros(n + 1, dtype=np.int64)
        np.maximum.at(largest, parent, count)
        keep = (count * frame.voxel_ml >= LUNG_MIN_ML) & (count >= LUNG_MIN_PIECE * largest[parent])
        keep[0] = False
        labels, n = pieces, m
        is_lung = keep
    del lungs
    sub_left = np.zeros(air.shape, dtype=bool)
    sub_right = np.zeros(air.shape, dtype=bool)
    mixed: list[int] = []
    boxes = ndimage.find_objects(labels)
    for c in np.flatnonzero(is_lung):
        cbox = boxes[c - 1]
        assert cbox is not None
        comp = labels[cbox] == c
        side = _side_fraction(comp, shifted(sub_frame, cbox), midline[cbox[0]])
        if side >= 0.9:
            sub_left[cbox] |= comp
        elif side <= 0.1:
            sub_right[cbox] |= comp
        else:
            mixed.append(int(c))
    if mixed:
        joined = np.isin(labels, mixed)
        jbox = bbox(joined)
        assert jbox is not None
        split_left, split_right = _split_joined(joined[jbox], shifted(sub_frame, jbox), midline[jbox[0]])
        sub_left[jbox] |= split_left
        sub_right[jbox] |= split_right
    del labels
    # 4. Lungs lie to the side of the midline: a component centred on it (nasal cavity, pharynx,
    # oesophagus, a midline bowel loop) is not one.
    sub_left = _lateral(sub_left, sub_frame, midline, +1)
    sub_right = _lateral(sub_right, sub_frame, midline, -1)
    sub_body = body[box]
    left[box] = fill_holes_inplane(sub_left) & sub_body
    right[box] = fill_holes_inplane(sub_right) & sub_body & ~left[box]
    return left, right


def _lateral(mask: np.ndarray, frame: CoarseFrame, midline: np.ndarray, side: int) -> np.ndarray:
    """The 3-D components of ``mask`` whose centre lies at least LUNG_MIN_OFFSET_MM to ``side``
    (+1 patient left, −1 right) of the midline."""
    labels, n = ndimage.label(mask, structure=CONN6)
    if n == 0:
        return mask
    k, i, j = np.nonzero(mask)
    lab = labels[k, i, j]
    offset = np.bincount(lab, weights=frame.x_of(k, i, j) - midline[k], minlength=n + 1) / np.maximum(
        np.bincount(lab, minlength=n + 1), 1)
    keep = side * offset >= LUNG_MIN_OFFSET_MM
    keep[0] = False
    return keep[labels]


def _pure_air_hu(hu: np.ndarray, body: np.ndarray) -> float:
    """The pure-air threshold for this scanner: PURE_AIR_HU, raised (up to PURE_AIR_MAX_HU) where
    the air around the patient reads higher than −1000 HU (a miscalibrated or noisy scanner)."""
    step = max(1, hu.size // 1_000_000)
    sample = hu.reshape(-1)[::step][~body.reshape(-1)[::step]]
    sample = sample[(sample > -1100.0) & (sample < -700.0)]
    if sample.size < 1000:
        return PURE_AIR_HU
    return float(np.clip(np.median(sample) + 50.0, PURE_AIR_HU, PURE_AIR_MAX_HU))


def _side_fraction(mask: np.ndarray, frame: CoarseFrame, midline: np.ndarray) -> float:
    """Fraction of ``mask``'s voxels on the patient-left side of the plane's midline."""
    k, i, j = np.nonzero(mask)
    if k.size == 0:
        return 0.5
    return float(np.mean(frame.x_of(k, i, j) > midline[k]))


def _by_midline(mask: np.ndarray, frame: CoarseFrame, midline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, i, j = np.nonzero(mask)
    is_left = frame.x_of(k, i, j) > midline[k]
    left = np.zeros(mask.shape, dtype=bool)
    right = np.zeros(mask.shape, dtype=bool)
    left[k[is_left], i[is_left], j[is_left]] = True
    right[k[~is_left], i[~is_left], j[~is_left]] = True
    return left, right


def _split_joined(joined: np.ndarray, frame: CoarseFrame, midline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split lungs that touch: erode in-plane until parts on each side of the midline appear, grow
    them back, and give what is left by its side of the midline. A component that never falls
    apart is one lung across the midline (after a pneumonectomy, say): its side is where most of it
    lies, unless it is nearly balanced, then the midline cuts it."""
    seeds_left = np.zeros(joined.shape, dtype=bool)
    seeds_right = np.zeros(joined.shape, dtype=bool)
    eroded = joined
    steps = 0
    for step in range(1, SPLIT_MAX_EROSION + 1):
        steps = step  # erosion steps taken (the seeds grow back for steps + 2)
        eroded = erode(eroded, 3)
        labels, n = ndimage.label(eroded, structure=CONN6)
        if n == 0:
            break
        seeds_left[:] = False
        seeds_right[:] = False
        volumes = np.bincount(labels.ravel(), minlength=n + 1)
        for c in range(1, n + 1):
            if volumes[c] * frame.voxel_ml < LUNG_MIN_ML / 4:
                continue
            comp = labels == c
            side = _side_fraction(comp, frame, midline)
            if side >= 0.9:
                seeds_left |= comp
            elif side <= 0.1:
                seeds_right |= comp
        if seeds_left.any() and seeds_right.any():
            break
    if not (seeds_left.any() and seeds_right.any()):
        side = _side_fraction(joined, frame, midline)
        if 0.25 < side < 0.75:
            return _by_midline(joined, frame, midline)
        empty = np.zeros(joined.shape, dtype=bool)
        return (joined.copy(), empty) if side >= 0.5 else (empty, joined.copy())
    # Grow both seeds back inside the joined mask, one in-plane step at a time.
    free = joined & ~seeds_left & ~seeds_right
    for _ in range(steps + 2):
        grow_left = dilate(seeds_left, 3) & free
        grow_right = dilate(seeds_right, 3) & free
        both = grow_left & grow_right
        if both.any():
            tie_left, tie_right = _by_midline(both, frame, midline)
            grow_left = (grow_left & ~both) | tie_left
            grow_right = (grow_right & ~both) | tie_right
        seeds_left |= grow_left
        seeds_right |= grow_right
        free &= ~(grow_left | grow_right)
        if not free.any():
            break
    rest_left, rest_right = _by_midline(free, frame, midline)
    return seeds_left | rest_left, seeds_right | rest_right

