"""Rule-based BODY (the External contour) and left/right lungs on CT, in voxel space.

What a planning system does to make an External, and the lungs, with thresholds and morphology:

1. **Coarse grid.** Block means bring each axis to about ``COARSE_MM`` (a 512×512 slice at 0.98 mm
   becomes 256×256), coarser for large volumes so that the grid holds at most
   ``COARSE_MAX_VOXELS`` (300 slices of 3 mm at 0.98 mm pixels: 300×171×171); every rule below runs
   there. The grid is transposed so that the voxel axis closest to the patient's head–feet axis
   comes first: "in-plane" then means the (near-)axial plane whatever the acquisition (axial,
   gantry-tilted, sagittal, coronal), and 2-D rules run on all planes in one 3-D call with an
   in-plane structuring element.
2. **BODY.** Tissue is ``HU > BODY_HU``. An in-plane opening (a ``COUCH_OPEN_MM`` square) cuts the
   couch, its shells and immobilisation boards and the bridges that join them to the patient. Of
   the 3-D components left, the largest is the patient; others are kept when body-like (at least
   ``EXTRA_MIN_FRACTION`` of the largest, ``EXTRA_MIN_AREA_CM2`` of cross-section per plane and
   not flat): arms at the sides and separate legs are part of the External, couch rails and boards
   are not. What the opening shaved off comes back when it touches the kept body and is either a
   detail (within ``DETAIL_MAX_MM`` in-plane: nose tip, ears, fingers) or a shell around it (a
   skull phantom's wall; with it the pieces it encloses); a long one-sided piece (a couch touching
   the back, a head cradle) stays out. Holes are filled plane by plane (lungs, bowel gas, trachea,
   sinuses; not a mouth open to the outside).
3. **Lungs.** Air (``HU < LUNG_HU``) inside the filled BODY. Small pure-air blobs near the midline in
   a plane (trachea, main bronchi, oesophageal air) are removed, then 3-D components are lungs when
   big (``LUNG_MIN_ML``) and of lung density: fewer than ``LUNG_MAX_PURE_FRACTION`` of their voxels
   are pure air (below ``PURE_AIR_HU``, raised when the air around the patient reads high); bowel
   gas is nearly all pure air, sinus air is small. From the lung components, wide pure-air regions
   with their rim (gas behind a thin diaphragm, the airway lumen) are carved off and small leftover
   pieces dropped. Each lung component is patient-left or patient-right by the side of the body's
   midline it lies on (LPS +x is patient left); a component on both sides (lungs touching at the
   anterior junction) is eroded in-plane until it falls apart, the parts are grown back and the
   rest goes by the midline (a component that never falls apart is one lung across the midline).
   A lung's centre lies at least ``LUNG_MIN_OFFSET_MM`` to its side (the nasal cavity does not).
   Lungs are filled plane by plane, each side alone (vessels and bronchi inside are lung; the
   mediastinum between the lungs is not).
4. **Full resolution.** Coarse labels are repeated onto the source grid; on a one-coarse-voxel band
   around each boundary the source voxel decides by its own threshold, so edges are not staircased.
   Blocks that the source voxels enclose (a shell that closes only at full resolution, air pockets
   at the edge) are filled, judged per block at coarse resolution.

Everything is in voxel space; patient geometry only decides which axis is head–feet and where
patient left is. Nothing here raises for a volume without a patient or without lungs. Known
limits: a couch plate in direct contact with the skin keeps a fillet about the opening's size at
the contact; single voxels of air within a coarse voxel of the skin can stay as holes; bowel gas
merged with a lung through a thin diaphragm takes the lung with it when the gas dominates the
merged component; lungs with more than half their voxels below ``PURE_AIR_HU`` (severe emphysema)
are taken for gas.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.errors import InferenceError
from node.model.volume import Geometry

#: Output label values.
BACKGROUND, BODY, LEFT_LUNG, RIGHT_LUNG = 0, 1, 2, 3

#: Tissue (BODY) threshold, HU; planning systems use −300…−500 (Eclipse: −350).
BODY_HU = -400.0
#: Lung air threshold, HU (half way between parenchyma at about −850 and soft tissue).
LUNG_HU = -400.0
#: Air without parenchyma (bowel gas, trachea) is below this, HU; 50 HU above the air around the
#: patient when that reads higher than −1000 HU, up to PURE_AIR_MAX_HU.
PURE_AIR_HU = -950.0
PURE_AIR_MAX_HU = -880.0
#: Target voxel size of the coarse grid, mm; blocks of at most MAX_FACTOR voxels per axis, and at
#: most COARSE_MAX_VOXELS voxels in all (larger volumes get larger blocks).
COARSE_MM = 2.0
MAX_FACTOR = 4
COARSE_MAX_VOXELS = 9_000_000
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
_SECTORS = 36
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

_INPLANE4 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE4[1] = ndimage.generate_binary_structure(2, 1)
_INPLANE8 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE8[1] = True
_CONN6 = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------------
# Coarse grid
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """The coarse grid: block factors per source axis, the axis order, voxel size and patient x."""

    factors: tuple[int, int, int]  # block size along source axes (slice, row, column)
    order: tuple[int, int, int]  # coarse axis a is source axis order[a]; order[0] is head–feet
    spacing: tuple[float, float, float]  # coarse voxel size along coarse axes, mm
    x0: float  # patient x (LPS, mm) of coarse voxel (0, 0, 0)
    dx: tuple[float, float, float]  # patient x step per coarse voxel along each coarse axis

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def pixel_cm2(self) -> float:
        return self.spacing[1] * self.spacing[2] / 100.0

    def x_of(self, k: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return self.x0 + k * self.dx[0] + i * self.dx[1] + j * self.dx[2]


def _frame(geometry: Geometry, shape: tuple[int, int, int]) -> _Frame:
    steps = [
        np.asarray(geometry.slice_step, dtype=np.float64),
        np.asarray(geometry.col_dir, dtype=np.float64) * geometry.spacing[1],
        np.asarray(geometry.row_dir, dtype=np.float64) * geometry.spacing[2],
    ]
    sizes = [float(geometry.spacing[0]), float(geometry.spacing[1]), float(geometry.spacing[2])]
    base = [1 if n < 2 else int(min(MAX_FACTOR, max(1, round(COARSE_MM / s)))) for s, n in zip(sizes, shape)]
    # Large volumes get a coarser grid, so the time is bounded: of the block sizes that keep the grid
    # within COARSE_MAX_VOXELS, the one whose coarsest axis is finest (300 slices of 3 mm at 0.98 mm
    # pixels: 300×171×171).
    square = abs(sizes[1] - sizes[2]) <= 0.01 * max(sizes[1], sizes[2])  # square pixels stay square
    choices: list[tuple[int, ...]] = list(
        itertools.product(*[range(b, MAX_FACTOR + 1) if n > 1 else (1,) for b, n in zip(base, shape)]))
    fitting = [f for f in choices if np.prod([-(-n // k) for n, k in zip(shape, f)]) <= COARSE_MAX_VOXELS
               and (not square or f[1] == f[2] or 1 in shape[1:])]

    def coarseness(f: tuple[int, ...]) -> tuple[float, int]:
        return max(s * k for s, k in zip(sizes, f)), f[0] * f[1] * f[2]

    best: tuple[int, ...] = min(fitting, key=coarseness) if fitting else tuple(MAX_FACTOR if n > 1 else 1 for n in shape)
    factors = list(best)
    # Head–feet axis: the voxel axis whose direction is closest to patient z.
    cosines = [abs(step[2]) / max(np.linalg.norm(step), 1e-9) for step in steps]
    head_feet = int(np.argmax(cosines))
    order = (head_feet, *[a for a in range(3) if a != head_feet])
    spacing = tuple(sizes[a] * factors[a] for a in order)
    # Patient x of the centre of coarse voxel (0, 0, 0): source index (f - 1) / 2 on each axis.
    x0 = float(geometry.origin[0] + sum((factors[a] - 1) / 2.0 * steps[a][0] for a in range(3)))
    dx = tuple(float(steps[a][0] * factors[a]) for a in order)
    return _Frame(factors=tuple(factors), order=order, spacing=spacing, x0=x0, dx=dx)  # type: ignore[arg-type]


def _reduce_axis(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Mean over blocks of ``f`` along ``axis`` (the last block may be shorter)."""
    if f == 1:
        return a
    n = a.shape[axis]
    m = n // f
    index: list[slice] = [slice(None)] * 3

    def part(sl: slice) -> np.ndarray:
        index[axis] = sl
        return a[tuple(index)]

    out = part(slice(0, m * f, f)).astype(np.float32, copy=True)
    for o in range(1, f):
        out += part(slice(o, m * f, f))
    out *= np.float32(1.0 / f)
    if n > m * f:
        rest = part(slice(m * f, n)).mean(axis=axis, keepdims=True, dtype=np.float32)
        out = np.concatenate([out, rest], axis=axis)
    return out


def _downsample(voxels: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block means of ``voxels`` (float32), two slabs of slices at a time in threads."""
    if factors == (1, 1, 1):
        return np.asarray(voxels, dtype=np.float32)
    n0 = voxels.shape[0]
    f0 = factors[0]
    # Slabs aligned to the slice factor, so blocks never straddle two slabs.
    slab = max(f0, (max(1, n0 // 8) // f0) * f0)
    starts = list(range(0, n0, slab))

    def work(s: int) -> np.ndarray:
        out = _reduce_axis(voxels[s:s + slab], factors[2], 2)
        out = _reduce_axis(out, factors[1], 1)
        return _reduce_axis(out, f0, 0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(work, starts))
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


# --------------------------------------------------------------------------------------------
# In-plane morphology (axis 0 is the plane index)
# --------------------------------------------------------------------------------------------
def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    return ndimage.minimum_filter(mask.view(np.uint8), size=(1, size, size), mode="constant", cval=0).view(bool)


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    return ndimage.maximum_filter(mask.view(np.uint8), size=(1, size, size), mode="constant", cval=0).view(bool)


def _fill_holes_inplane(mask: np.ndarray) -> np.ndarray:
    """Fill, in every plane, the background not 4-connected to that plane's border."""
    if not mask.any():
        return mask.copy()
    # Work inside the mask's bounding box with a one-voxel margin of background.
    lo = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    padded = np.ones((box.shape[0], box.shape[1] + 2, box.shape[2] + 2), dtype=bool)
    np.logical_not(box, out=padded[:, 1:-1, 1:-1])
    labels, n = ndimage.label(padded, structure=_INPLANE4)
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(labels[:, 0, :])] = True  # the padded border is one component per plane
    holes = ~outside[labels] & padded
    out = mask.copy()
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= holes[:, 1:-1, 1:-1]
    return out


def _label_stats(labels: np.ndarray, n: int, mask: np.ndarray, frame: _Frame,
                 hu: np.ndarray, pure_hu: float) -> dict[str, np.ndarray]:
    """Per-label voxel count, mean HU, fraction under ``pure_hu``, mean patient x and plane, from
    the voxels of ``mask`` (which holds every labelled voxel)."""
    flat = np.flatnonzero(mask.ravel())
    lab = labels.ravel()[flat]
    k, i, j = np.unravel_index(flat, mask.shape)
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    safe = np.maximum(count, 1)
    values = hu.ravel()[flat]
    return {
        "count": count,
        "x": np.bincount(lab, weights=frame.x_of(k, i, j), minlength=n + 1) / safe,
        "plane": np.bincount(lab, weights=k, minlength=n + 1) / safe,
        "hu": np.bincount(lab, weights=values, minlength=n + 1) / safe,
        "pure": np.bincount(lab, weights=(values < pure_hu), minlength=n + 1) / safe,
    }


def _shape_of(mask: np.ndarray, frame: _Frame) -> tuple[float, float]:
    """Mean in-plane area (cm², over the planes it spans) and elongation (ratio of principal axes)."""
    k, i, j = np.nonzero(mask)
    planes = int(np.unique(k).size)
    area = k.size * frame.pixel_cm2 / max(planes, 1)
    if k.size < 3:
        return area, 1.0
    yi = i * frame.spacing[1]
    yj = j * frame.spacing[2]
    cov = np.cov(np.stack([yi, yj]))
    low, high = np.linalg.eigvalsh(cov)
    return area, float(np.sqrt(max(high, 1e-6) / max(low, 1e-6)))


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    boxes = ndimage.find_objects(mask.view(np.uint8))
    return boxes[0] if boxes and boxes[0] is not None else None  # type: ignore[return-value]


def _shifted(frame: _Frame, box: tuple[slice, slice, slice]) -> _Frame:
    """The frame of a sub-volume starting at ``box``'s corner."""
    x0 = frame.x0 + sum(float(b.start) * d for b, d in zip(box, frame.dx))
    return _Frame(factors=frame.factors, order=frame.order, spacing=frame.spacing, x0=x0, dx=frame.dx)


def _midline_x(body: np.ndarray, frame: _Frame) -> np.ndarray:
    """Patient x (mm) of the body's centroid in each plane (NaN where the plane has no body)."""
    per_i = body.sum(axis=2, dtype=np.int64)  # (planes, rows)
    per_j = body.sum(axis=1, dtype=np.int64)  # (planes, cols)
    count = per_i.sum(axis=1).astype(np.float64)
    mean_i = per_i @ np.arange(body.shape[1]) / np.maximum(count, 1)
    mean_j = per_j @ np.arange(body.shape[2]) / np.maximum(count, 1)
    k = np.arange(body.shape[0])
    x = frame.x_of(k, mean_i, mean_j)
    x[count == 0] = np.nan
    return x


# --------------------------------------------------------------------------------------------
# BODY
# --------------------------------------------------------------------------------------------
def _odd(mm: float, spacing: float) -> int:
    n = round(mm / spacing)
    return max(1, n + 1 - n % 2)


def _patient_holes(tissue: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """In-plane holes of ``tissue`` whose rim is at least HOLE_MIN_THICK_RIM ``thick`` (the trachea
    behind a thin anterior neck, lungs behind a thin chest wall); a couch's hollow core, rimmed by
    thin shells only, is not one."""
    holes = _fill_holes_inplane(tissue) & ~tissue
    tight = _bbox(holes)
    if tight is None:
        return holes
    box = (tight[0], *(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(tight[1:], tissue.shape[1:])))
    inside = holes[box]
    labels, n = ndimage.label(inside, structure=_INPLANE4)
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


def _body_coarse(hu: np.ndarray, frame: _Frame) -> np.ndarray:
    tissue = hu > BODY_HU
    if not tissue.any():
        return tissue
    size = _odd(COUCH_OPEN_MM, min(frame.spacing[1], frame.spacing[2]))
    # Holes of the patient are solid for the opening: a wall thinner than the opening (the front of
    # the neck over the larynx, a thin chest wall over a lung) is not cut off.
    tissue |= _patient_holes(tissue, _dilate(_erode(tissue, size), size) if size > 1 else tissue)
    opened = _dilate(_erode(tissue, size), size) if size > 1 else tissue
    labels, n = ndimage.label(opened, structure=_CONN6)
    if n == 0:  # nothing survives the opening (a thin object): no couch separation possible
        opened = tissue
        labels, n = ndimage.label(opened, structure=_CONN6)
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
        area, elongation = _shape_of(labels[box] == c, frame)
        keep[c] = area >= EXTRA_MIN_AREA_CM2 and elongation <= EXTRA_MAX_ELONGATION
    body = keep[labels]
    # What the opening shaved off the kept body comes back when it touches it and is a detail
    # (small in-plane: nose tip, ear, fingers) or a shell around it (a skull phantom's wall: with
    # it come the pieces inside that it touches). Long pieces that are not shells (a couch shell
    # touching the back, a head cradle) stay out.
    residual = tissue & ~opened
    if not residual.any():
        return _fill_holes_inplane(body)
    rlabels, rn = ndimage.label(residual, structure=_CONN6)
    touching = np.zeros(rn + 1, dtype=bool)
    touching[np.unique(rlabels[_dilate(body, 3) & residual])] = True
    touching[0] = False
    reach_i = DETAIL_MAX_MM / frame.spacing[1]
    reach_j = DETAIL_MAX_MM / frame.spacing[2]
    back = np.zeros(rn + 1, dtype=bool)
    shells: list[int] = []
    for idx, box in enumerate(ndimage.find_objects(rlabels), start=1):
        if box is None or not touching[idx]:
            continue
        if box[1].stop - box[1].start <= reach_i and box[2].stop - box[2].start <= reach_j:
            back[idx] = True
        elif _is_shell(rlabels[box] == idx, frame):
            back[idx] = True
            shells.append(idx)
    body |= back[rlabels]
    if shells:
        # Opened pieces that a shell touches (the inserts of a phantom, thick parts of its wall).
        near = _dilate(np.isin(rlabels, shells), 3)
        inner = np.unique(labels[near & opened])
        inner = inner[inner > 0]
        body |= np.isin(labels, inner)
    return _fill_holes_inplane(body)


def _is_shell(piece: np.ndarray, frame: _Frame) -> bool:
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


# --------------------------------------------------------------------------------------------
# Lungs
# --------------------------------------------------------------------------------------------
def _lungs_coarse(hu: np.ndarray, body: np.ndarray, frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros(hu.shape, dtype=bool)
    right = np.zeros(hu.shape, dtype=bool)
    air = body & (hu < LUNG_HU)
    box = _bbox(air)
    if box is None:
        return left, right
    midline = _midline_x(body, frame)[box[0]]
    pure_hu = _pure_air_hu(hu, body)
    sub_frame = _shifted(frame, box)
    air = air[box]
    sub_hu = hu[box]
    # 1. Airway blobs (trachea, main bronchi) out, plane by plane.
    labels, n = ndimage.label(air, structure=_INPLANE8)
    stats = _label_stats(labels, n, air, sub_frame, sub_hu, pure_hu)
    area = stats["count"] * frame.pixel_cm2
    offset = np.abs(stats["x"] - midline[np.rint(stats["plane"]).astype(np.int64)])
    airway_hu = pure_hu + (AIRWAY_MEAN_HU - PURE_AIR_HU)
    airway = (area < AIRWAY_MAX_AREA_CM2) & (stats["hu"] < airway_hu) & (offset < AIRWAY_MIDLINE_MM)
    airway[0] = False
    air &= ~airway[labels]
    del labels
    # 2. Lung components: big, with lung density (bowel gas is nearly all pure air).
    labels, n = ndimage.label(air, structure=_CONN6)
    stats = _label_stats(labels, n, air, sub_frame, sub_hu, pure_hu)
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
    gas = _dilate(_erode((sub_hu < pure_hu) & lungs, 3), 3)
    if gas.any():
        lungs &= ~_dilate(gas, 3)
        pieces, m = ndimage.label(lungs, structure=_CONN6)
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
        side = _side_fraction(comp, _shifted(sub_frame, cbox), midline[cbox[0]])
        if side >= 0.9:
            sub_left[cbox] |= comp
        elif side <= 0.1:
            sub_right[cbox] |= comp
        else:
            mixed.append(int(c))
    if mixed:
        joined = np.isin(labels, mixed)
        jbox = _bbox(joined)
        assert jbox is not None
        split_left, split_right = _split_joined(joined[jbox], _shifted(sub_frame, jbox), midline[jbox[0]])
        sub_left[jbox] |= split_left
        sub_right[jbox] |= split_right
    del labels
    # 4. Lungs lie to the side of the midline: a component centred on it (nasal cavity, pharynx,
    # oesophagus, a midline bowel loop) is not one.
    sub_left = _lateral(sub_left, sub_frame, midline, +1)
    sub_right = _lateral(sub_right, sub_frame, midline, -1)
    sub_body = body[box]
    left[box] = _fill_holes_inplane(sub_left) & sub_body
    right[box] = _fill_holes_inplane(sub_right) & sub_body & ~left[box]
    return left, right


def _lateral(mask: np.ndarray, frame: _Frame, midline: np.ndarray, side: int) -> np.ndarray:
    """The 3-D components of ``mask`` whose centre lies at least LUNG_MIN_OFFSET_MM to ``side``
    (+1 patient left, −1 right) of the midline."""
    labels, n = ndimage.label(mask, structure=_CONN6)
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


def _side_fraction(mask: np.ndarray, frame: _Frame, midline: np.ndarray) -> float:
    """Fraction of ``mask``'s voxels on the patient-left side of the plane's midline."""
    k, i, j = np.nonzero(mask)
    if k.size == 0:
        return 0.5
    return float(np.mean(frame.x_of(k, i, j) > midline[k]))


def _by_midline(mask: np.ndarray, frame: _Frame, midline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, i, j = np.nonzero(mask)
    is_left = frame.x_of(k, i, j) > midline[k]
    left = np.zeros(mask.shape, dtype=bool)
    right = np.zeros(mask.shape, dtype=bool)
    left[k[is_left], i[is_left], j[is_left]] = True
    right[k[~is_left], i[~is_left], j[~is_left]] = True
    return left, right


def _split_joined(joined: np.ndarray, frame: _Frame, midline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split lungs that touch: erode in-plane until parts on each side of the midline appear, grow
    them back, and give what is left by its side of the midline. A component that never falls
    apart is one lung across the midline (after a pneumonectomy, say): its side is where most of it
    lies, unless it is nearly balanced, then the midline cuts it."""
    seeds_left = np.zeros(joined.shape, dtype=bool)
    seeds_right = np.zeros(joined.shape, dtype=bool)
    eroded = joined
    steps = 0
    for steps in range(1, SPLIT_MAX_EROSION + 1):
        eroded = _erode(eroded, 3)
        labels, n = ndimage.label(eroded, structure=_CONN6)
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
        grow_left = _dilate(seeds_left, 3) & free
        grow_right = _dilate(seeds_right, 3) & free
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


# --------------------------------------------------------------------------------------------
# Back to full resolution
# --------------------------------------------------------------------------------------------
def _band(mask: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Voxels within one step of ``mask``'s boundary, on either side (the volume's edges are not a
    boundary: the patient goes on beyond the first and last slice)."""
    grown = ndimage.maximum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)
    shrunk = ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="nearest").view(bool)
    return grown & ~shrunk


def _coarse_bands(body: np.ndarray, left: np.ndarray, right: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Where the source voxels decide: 1 on BODY's edge, LEFT_LUNG/RIGHT_LUNG on a lung's edge."""
    bands = np.zeros(body.shape, dtype=np.uint8)
    bands[_band(body, size)] = 1
    for mask, other, value in ((left, right, LEFT_LUNG), (right, left, RIGHT_LUNG)):
        tight = _bbox(mask)
        if tight is None:
            continue
        # Grow the box by one voxel so the band's outer ring is inside it.
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(tight, mask.shape))
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


def _to_full(labels: np.ndarray, bands: np.ndarray, voxels: np.ndarray, frame: _Frame) -> np.ndarray:
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
    filled = _fill_holes_inplane(np.ascontiguousarray(touched.transpose(frame.order)))
    interior = _erode(filled, 3).transpose(inverse)
    kh, ih, jh = np.nonzero(interior & ~full)
    for _valid, flat in _blocks(kh, ih, jh, factors, shape):
        flat_out[flat] = np.maximum(flat_out[flat], np.uint8(BODY))
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check(voxels: np.ndarray, geometry: Geometry) -> None:
    if voxels.ndim != 3:
        raise InferenceError(f"BODY/lungs need a (slices, rows, columns) volume; got shape {voxels.shape}")
    if tuple(voxels.shape) != tuple(geometry.shape):
        raise InferenceError(f"the voxels have shape {voxels.shape} but the geometry describes {geometry.shape}")


def _coarse_result(voxels: np.ndarray, geometry: Geometry, lungs: bool) -> tuple[np.ndarray, np.ndarray, _Frame]:
    """Coarse labels and refinement bands (see ``_to_full``) on the source axes, and the frame."""
    frame = _frame(geometry, tuple(voxels.shape))  # type: ignore[arg-type]
    hu = _downsample(voxels, frame.factors)
    hu = np.ascontiguousarray(hu.transpose(frame.order))
    body = _body_coarse(hu, frame)
    labels = body.astype(np.uint8)
    left = right = np.zeros(body.shape, dtype=bool)
    if lungs:
        left, right = _lungs_coarse(hu, body, frame)
        labels[left] = LEFT_LUNG
        labels[right] = RIGHT_LUNG
    del hu
    if frame.factors == (1, 1, 1):
        bands = np.zeros(body.shape, dtype=np.uint8)
    else:
        # The band spans the axes that were reduced.
        size = tuple(3 if frame.factors[a] > 1 else 1 for a in frame.order)
        bands = _coarse_bands(body, left, right, size)  # type: ignore[arg-type]
    inverse = tuple(int(a) for a in np.argsort(frame.order))
    return (np.ascontiguousarray(labels.transpose(inverse)), np.ascontiguousarray(bands.transpose(inverse)), frame)


def segment_body_lungs(voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(slices, rows, cols) float32 HU on ``geometry`` → uint8 labels: 0 background, 1 BODY,
    2 left lung, 3 right lung (patient left/right: LPS +x is patient LEFT).

    Lungs lie inside BODY and carry their own values; BODY's mask is ``labels > 0``. A volume
    without a patient gives all zeros, one without lungs gives no 2 or 3; nothing raises for either.
    Voxels that do not match the geometry's shape raise :class:`InferenceError`. About 1–2 s and
    300 MB beyond the input for 300×512×512 on two cores (``benchmarks/anatomy_bench.py``).
    """
    _check(voxels, geometry)
    labels, bands, frame = _coarse_result(voxels, geometry, lungs=True)
    return _to_full(labels, bands, voxels, frame)


def body_mask(voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The External (BODY) as a boolean mask shaped like ``voxels`` (lungs skipped: faster)."""
    _check(voxels, geometry)
    labels, bands, frame = _coarse_result(voxels, geometry, lungs=False)
    return _to_full(labels, bands, voxels, frame) > 0


def lung_masks(voxels: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(left lung, right lung) boolean masks shaped like ``voxels`` (patient left: LPS +x)."""
    labels = segment_body_lungs(voxels, geometry)
    return labels == LEFT_LUNG, labels == RIGHT_LUNG
