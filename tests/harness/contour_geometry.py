"""Contours as a planning system reads them: RTSTRUCT polygons back in pixel coordinates, filled by pixel
centres with the even-odd rule, and distances between outlines (the contour cleaning and smoothing tests)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pydicom import Dataset
from scipy import ndimage


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of closed (n, 2) row/column polygons by pixel centres (integer coordinates)."""
    rows, cols = shape
    count = np.zeros((rows, cols + 1), dtype=np.int64)  # crossings right of each pixel centre, as differences
    for points in polygons:
        a, b = points, np.roll(points, -1, axis=0)
        lo, hi = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
        first = np.clip(np.floor(lo).astype(np.int64) + 1, 0, rows)  # rows r with lo < r <= hi (half-open)
        last = np.clip(np.floor(hi).astype(np.int64) + 1, 0, rows)
        n = np.maximum(last - first, 0)
        edge = np.repeat(np.arange(len(a)), n)
        r = np.repeat(first, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        x = a[edge, 1] + (r - a[edge, 0]) * (b[edge, 1] - a[edge, 1]) / (b[edge, 0] - a[edge, 0])
        np.add.at(count, (r, np.zeros_like(r)), 1)  # every centre c < x of row r sees this crossing
        np.add.at(count, (r, np.clip(np.ceil(x).astype(np.int64), 0, cols)), -1)
    return (np.cumsum(count, axis=1)[:, :cols] % 2).astype(bool)


def distance_to_outline(points: np.ndarray, outline: list[np.ndarray], chunk: int = 512) -> np.ndarray:
    """Distance of each (n, 2) point from the nearest segment of any closed polygon in ``outline``."""
    a = np.concatenate(outline)
    b = np.concatenate([np.roll(o, -1, axis=0) for o in outline])
    ab = b - a
    length2 = np.maximum((ab * ab).sum(-1), 1e-24)
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk, None]
        t = np.clip(((p - a[None]) * ab[None]).sum(-1) / length2[None], 0, 1)
        foot = a[None] + t[..., None] * ab[None]
        out[s : s + chunk] = np.sqrt(((p - foot) ** 2).sum(-1)).min(axis=1)
    return out


def rtstruct_polygons_px(rt: Dataset, headers: list[Dataset]) -> dict[str, dict[int, list[np.ndarray]]]:
    """Per ROI name and source slice (index in ``headers``), each contour as (n, 2) row/column points."""
    slice_of = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    out: dict[str, dict[int, list[np.ndarray]]] = {}
    for roi in rt.ROIContourSequence:
        per_slice: dict[int, list[np.ndarray]] = defaultdict(list)
        for item in roi.get("ContourSequence", []):
            k = slice_of[str(item.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            h = headers[k]
            origin = np.array([float(v) for v in h.ImagePositionPatient])
            iop = np.array([float(v) for v in h.ImageOrientationPatient])
            spacing_r, spacing_c = (float(v) for v in h.PixelSpacing)
            lps = np.array([float(v) for v in item.ContourData]).reshape(-1, 3) - origin
            per_slice[k].append(np.column_stack([lps @ iop[3:] / spacing_r, lps @ iop[:3] / spacing_c]))
        out[names[int(roi.ReferencedROINumber)]] = dict(per_slice)
    return out


def add_body_noise(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise as issue 16's chest CT had, added to ``labels`` (BODY = 1, every labelled voxel in the body) in
    place: on every slice, specks of 1–19 px in the air in front of the body (at least 4 px from it) and
    pockets of 1–46 px just inside its back, where it meets the table. Returns the specks' and pockets' masks."""
    body = labels > 0
    near = ndimage.binary_dilation(body, structure=np.array([[[0] * 3] * 3, [[1] * 3] * 3, [[0] * 3] * 3]),
                                   iterations=4)
    specks = np.zeros_like(body)
    pockets = np.zeros_like(body)
    for k in range(len(labels)):
        rows = np.flatnonzero(body[k].any(axis=1))
        if rows.size == 0:
            continue
        for _ in range(40 if rows[0] > 12 else 0):
            r, c = rng.integers(0, rows[0] - 8), rng.integers(8, labels.shape[2] - 8)
            size = int(rng.integers(1, 20))
            side = int(np.ceil(np.sqrt(size)))
            patch = (k, slice(r, r + side), slice(c, c + max(1, size // side)))
            if not near[patch].any():
                specks[patch] = True
        middle = labels.shape[2] // 2
        back = int(np.flatnonzero(body[k, :, middle])[-1])
        for _ in range(12):
            size = int(rng.integers(1, 47))
            side = int(np.ceil(np.sqrt(size)))
            r, c = back - int(rng.integers(4, 10)) - side, middle + int(rng.integers(-60, 60))
            patch = (k, slice(r, r + side), slice(c, c + max(1, size // side)))
            if ndimage.binary_erosion(body[k], iterations=2)[patch[1:]].all():
                pockets[patch] = True
    labels[specks] = 1
    labels[pockets] = 0
    return specks, pockets
