"""The ground the rule-based BODY and lungs stand on (``node.infer.anatomy``): the output label values,
the coarse grid every rule runs on, in-plane morphology and per-component statistics.

The coarse grid (step 1 of ``node.infer.anatomy``): block means bring each axis to about ``COARSE_MM``,
coarser for large volumes so that the grid holds at most ``COARSE_MAX_VOXELS``; it is transposed so
that the voxel axis closest to the patient's head–feet axis comes first, so "in-plane" means the
(near-)axial plane and 2-D rules run on all planes in one 3-D call with an in-plane structuring element.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.model.volume import Geometry

#: Output label values.
BACKGROUND, BODY, LEFT_LUNG, RIGHT_LUNG = 0, 1, 2, 3

#: Target voxel size of the coarse grid, mm; blocks of at most MAX_FACTOR voxels per axis, and at
#: most COARSE_MAX_VOXELS voxels in all (larger volumes get larger blocks).
COARSE_MM = 2.0
MAX_FACTOR = 4
COARSE_MAX_VOXELS = 9_000_000

#: Structuring elements: 4- and 8-connected within a plane (axis 0 is the plane index), 6-connected in 3-D.
INPLANE4 = np.zeros((3, 3, 3), dtype=bool)
INPLANE4[1] = ndimage.generate_binary_structure(2, 1)
INPLANE8 = np.zeros((3, 3, 3), dtype=bool)
INPLANE8[1] = True
CONN6 = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------------
# Coarse grid
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoarseFrame:
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


def coarse_frame(geometry: Geometry, shape: tuple[int, int, int]) -> CoarseFrame:
    steps = [
        np.asarray(geometry.slice_step, dtype=np.float64),
        np.asarray(geometry.col_dir, dtype=np.float64) * geometry.spacing[1],
        np.asarray(geometry.row_dir, dtype=np.float64) * geometry.spacing[2],
    ]
    sizes = [float(geometry.spacing[0]), float(geometry.spacing[1]), float(geometry.spacing[2])]
    base = [1 if n < 2 else int(min(MAX_FACTOR, max(1, round(COARSE_MM / s))))
            for s, n in zip(sizes, shape, strict=True)]
    # Large volumes get a coarser grid, so the time is bounded: of the block sizes that keep the grid
    # within COARSE_MAX_VOXELS, the one whose coarsest axis is finest (300 slices of 3 mm at 0.98 mm
    # pixels: 300×171×171).
    square = abs(sizes[1] - sizes[2]) <= 0.01 * max(sizes[1], sizes[2])  # square pixels stay square
    choices: list[tuple[int, ...]] = list(
        itertools.product(*[range(b, MAX_FACTOR + 1) if n > 1 else (1,) for b, n in zip(base, shape, strict=True)]))
    fitting = [f for f in choices if np.prod([-(-n // k) for n, k in zip(shape, f, strict=True)]) <= COARSE_MAX_VOXELS
               and (not square or f[1] == f[2] or 1 in shape[1:])]

    def coarseness(f: tuple[int, ...]) -> tuple[float, int]:
        return max(s * k for s, k in zip(sizes, f, strict=True)), f[0] * f[1] * f[2]

    best: tuple[int, ...] = (min(fitting, key=coarseness) if fitting
                             else tuple(MAX_FACTOR if n > 1 else 1 for n in shape))
    factors = list(best)
    # Head–feet axis: the voxel axis whose direction is closest to patient z.
    cosines = [abs(step[2]) / max(np.linalg.norm(step), 1e-9) for step in steps]
    head_feet = int(np.argmax(cosines))
    order = (head_feet, *[a for a in range(3) if a != head_feet])
    spacing = tuple(sizes[a] * factors[a] for a in order)
    # Patient x of the centre of coarse voxel (0, 0, 0): source index (f - 1) / 2 on each axis.
    x0 = float(geometry.origin[0] + sum((factors[a] - 1) / 2.0 * steps[a][0] for a in range(3)))
    dx = tuple(float(steps[a][0] * factors[a]) for a in order)
    return CoarseFrame(factors=tuple(factors), order=order, spacing=spacing, x0=x0, dx=dx)  # type: ignore[arg-type]


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


def downsample(voxels: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
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
def erode(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    return ndimage.minimum_filter(mask.view(np.uint8), size=(1, size, size), mode="constant", cval=0).view(bool)


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    return ndimage.maximum_filter(mask.view(np.uint8), size=(1, size, size), mode="constant", cval=0).view(bool)


def fill_holes_inplane(mask: np.ndarray) -> np.ndarray:
    """Fill, in every plane, the background not 4-connected to that plane's border."""
    if not mask.any():
        return mask.copy()
    # Work inside the mask's bounding box with a one-voxel margin of background.
    lo = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    padded = np.ones((box.shape[0], box.shape[1] + 2, box.shape[2] + 2), dtype=bool)
    np.logical_not(box, out=padded[:, 1:-1, 1:-1])
    labels, n = ndimage.label(padded, structure=INPLANE4)
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(labels[:, 0, :])] = True  # the padded border is one component per plane
    holes = ~outside[labels] & padded
    out = mask.copy()
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= holes[:, 1:-1, 1:-1]
    return out


def disk(radius: int) -> np.ndarray:
    """An in-plane disk of ``radius`` voxels as a (1, 2r+1, 2r+1) structuring element."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y <= radius * radius)[None]


def fill_enclosed_inplane(mask: np.ndarray, radius: int) -> np.ndarray:
    """``fill_holes_inplane``, and also the background that reaches the plane's outside only through
    openings narrower than a disk of ``radius`` voxels, where it is wider than that disk inside.

    The outside is what a disk of that radius sweeps, moving through the background from the plane's
    edge: a cavity behind a narrow gap (an air-filled skull whose thin bone reads below the threshold
    in places, a sinus, gas in a bowel loop at a thin wall) is not reached and is filled; a slit (the air
    between an arm and the trunk) is narrower than the disk everywhere and stays out. Where the mask
    touches the image's edge (a field of view that cuts the patient), the edge is a wall: the outside
    comes in from the image's corners and the mask's other sides, not through the cut.
    """
    filled = fill_holes_inplane(mask)
    tight = bbox(mask)
    if radius < 1 or tight is None:
        return filled
    margin = radius + 1
    box: list[slice] = [tight[0]]
    pads: list[tuple[int, int]] = [(0, 0)]
    for b, n in zip(tight[1:], mask.shape[1:], strict=True):
        lo, hi = max(b.start - margin, 0), min(b.stop + margin, n)
        box.append(slice(lo, hi))
        pads.append((margin if lo == 0 else 0, margin if hi == n else 0))  # an image edge: replicated
    air = ~np.pad(filled[tuple(box)], pads, mode="edge")
    footprint = disk(radius)
    core = ndimage.minimum_filter(air.view(np.uint8), footprint=footprint, mode="constant", cval=1).view(bool)
    # Seeds: the array's rim on the sides that are not image edges, and its corners.
    rim = np.zeros(air.shape[1:], dtype=bool)
    rim[[0, 0, -1, -1], [0, -1, 0, -1]] = True
    rim[0, :] |= pads[1][0] == 0
    rim[-1, :] |= pads[1][1] == 0
    rim[:, 0] |= pads[2][0] == 0
    rim[:, -1] |= pads[2][1] == 0
    seeds = core & rim
    unseeded = ~seeds.any(axis=(1, 2))  # a plane filled to all its edges and corners: every edge is open
    if unseeded.any():
        ring = np.zeros(air.shape[1:], dtype=bool)
        ring[[0, -1], :] = ring[:, [0, -1]] = True
        seeds[unseeded] = core[unseeded] & ring
    labels, _ = ndimage.label(core, structure=INPLANE8)
    ids = np.unique(labels[seeds])
    reached = ndimage.maximum_filter(np.isin(labels, ids[ids > 0]).view(np.uint8), footprint=footprint,
                                     mode="constant", cval=0).view(bool) & air
    enclosed = air & ~reached
    labels, _ = ndimage.label(enclosed, structure=INPLANE4)
    wide = np.unique(labels[ndimage.minimum_filter(enclosed.view(np.uint8), footprint=footprint, mode="constant",
                                                   cval=1).view(bool)])
    cavities = np.isin(labels, wide[wide > 0])
    inner = tuple(slice(lo, cavities.shape[a + 1] - hi) for a, (lo, hi) in enumerate(pads[1:]))
    filled[tuple(box)] |= cavities[(slice(None), *inner)]
    return filled


def label_stats(labels: np.ndarray, n: int, mask: np.ndarray, frame: CoarseFrame,
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


def shape_of(mask: np.ndarray, frame: CoarseFrame) -> tuple[float, float]:
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


def bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    boxes = ndimage.find_objects(mask.view(np.uint8))
    return boxes[0] if boxes and boxes[0] is not None else None


def shifted(frame: CoarseFrame, box: tuple[slice, slice, slice]) -> CoarseFrame:
    """The frame of a sub-volume starting at ``box``'s corner."""
    x0 = frame.x0 + sum(float(b.start) * d for b, d in zip(box, frame.dx, strict=True))
    return CoarseFrame(factors=frame.factors, order=frame.order, spacing=frame.spacing, x0=x0, dx=frame.dx)


def midline_x(body: np.ndarray, frame: CoarseFrame) -> np.ndarray:
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
