"""DICOM-SEG reader: each segment of a Segmentation as a boolean mask on the volume its frames were drawn on.

A frame goes onto the slice whose SOP instance it was derived from (DerivationImageSequence →
SourceImageSequence) or, when it names none, onto the slice plane its ImagePositionPatient lies on. Only
segmentations on the image grid itself are read (frames of the volume's rows × columns); BINARY,
FRACTIONAL (a pixel belongs when it is at least half the maximum) and LABELMAP segmentations are taken.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.errors import Permanent
from node.model.volume import Geometry

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class SegmentationError(Permanent):
    """A Segmentation cannot be read, or its frames cannot be placed on a volume."""


@dataclass(frozen=True)
class SegmentMask:
    number: int
    label: str
    mask: np.ndarray  # bool, the volume's shape


@dataclass(frozen=True)
class SegmentationSet:
    sop_instance_uid: str
    label: str  # ContentLabel
    referenced_series_uids: tuple[str, ...]
    segments: list[SegmentMask]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _first(item: Dataset | None, *path: str) -> Dataset | None:
    for keyword in path:
        seq = item.get(keyword) if item is not None else None
        if not seq:
            return None
        item = seq[0]
    return item


def referenced_series(ds: Dataset) -> tuple[str, ...]:
    """The SeriesInstanceUIDs in ReferencedSeriesSequence (the images a SEG was derived from)."""
    return tuple(u for u in (_text(s, "SeriesInstanceUID") for s in ds.get("ReferencedSeriesSequence", None) or [])
                 if u)


def read_segmentation(source: Dataset | str | os.PathLike[str], geometry: Geometry,
                      sop_instance_uids: Sequence[str]) -> SegmentationSet:
    """Every segment of a Segmentation as a mask shaped like ``geometry`` (slices in ``sop_instance_uids`` order)."""
    try:
        ds = source if isinstance(source, Dataset) else dcmread(source)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SegmentationError(f"{source}: not a readable DICOM file ({exc})") from exc
    uid = _text(ds, "SOPInstanceUID") or "?"
    if _text(ds, "SOPClassUID") != SEGMENTATION_STORAGE:
        raise SegmentationError(f"{uid} is not a Segmentation (SOP class {_text(ds, 'SOPClassUID') or 'missing'})")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (rows, cols) != tuple(geometry.shape[1:]):
        raise SegmentationError(f"Segmentation {uid} has {rows}×{cols} frames; the images it refers to are "
                                f"{geometry.shape[1]}×{geometry.shape[2]}: only segmentations on the image grid "
                                "are read")
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises a variety of decoder errors
        raise SegmentationError(f"the pixel data of Segmentation {uid} cannot be decoded: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[None]
    kind = _text(ds, "SegmentationType").upper()
    labels = {int(s.SegmentNumber): _text(s, "SegmentLabel") for s in ds.get("SegmentSequence", None) or []}
    if not labels:
        raise SegmentationError(f"Segmentation {uid} has no SegmentSequence")
    index = {u: k for k, u in enumerate(sop_instance_uids)}
    masks = {n: np.zeros(geometry.shape, dtype=bool) for n in labels}
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    frames = list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    if len(frames) != len(pixels):
        raise SegmentationError(f"Segmentation {uid} has {len(pixels)} frames and {len(frames)} per-frame "
                                "functional groups")
    for f, (item, frame) in enumerate(zip(frames, pixels, strict=True), start=1):
        k = _frame_slice(item, shared, geometry, index, f"frame {f} of Segmentation {uid}")
        if kind == "LABELMAP":
            for number, mask in masks.items():
                mask[k] |= frame == number
            continue
        ident = _first(item, "SegmentIdentificationSequence") or _first(shared, "SegmentIdentificationSequence")
        number = int(str(ident.get("ReferencedSegmentNumber", 0))) if ident is not None else 0
        if number not in masks:
            raise SegmentationError(f"frame {f} of Segmentation {uid} belongs to segment {number}, which "
                                    f"SegmentSequence does not define (it defines {sorted(masks)})")
        threshold = (int(ds.get("MaximumFractionalValue", 255) or 255) + 1) // 2 if kind == "FRACTIONAL" else 1
        masks[number][k] |= frame >= threshold
    return SegmentationSet(uid, _text(ds, "ContentLabel"), referenced_series(ds),
                           [SegmentMask(n, labels[n], masks[n]) for n in sorted(masks)])


def _frame_slice(item: Dataset, shared: Dataset | None, geometry: Geometry, index: dict[str, int], where: str) -> int:
    source = _first(item, "DerivationImageSequence", "SourceImageSequence")
    uid = _text(source, "ReferencedSOPInstanceUID") if source is not None else ""
    if uid and index:
        if uid not in index:
            raise SegmentationError(f"{where} was derived from image {uid}, which is not one of the "
                                    f"{len(index)} images of the volume")
        return index[uid]
    plane = _first(item, "PlanePositionSequence") or _first(shared, "PlanePositionSequence")
    position = plane.get("ImagePositionPatient") if plane is not None else None
    if not position:
        raise SegmentationError(f"{where} names neither a source image nor its ImagePositionPatient")
    along = float((np.array([float(v) for v in position]) - geometry.origin) @ geometry.normal)
    step = float(geometry.slice_step @ geometry.normal) or geometry.spacing[0]
    k = int(np.rint(along / step))
    if not 0 <= k < geometry.shape[0] or abs(along - k * step) > 0.5 * abs(step):
        raise SegmentationError(f"{where} lies {along:.2f} mm along the slice normal, on no slice of the volume")
    return k
