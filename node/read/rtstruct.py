"""RT Structure Set reader: ROIs with their contours, and contours → voxel masks on a volume.

:func:`read_structure_set` matches the three ROI sequences (StructureSetROISequence, ROIContourSequence,
RTROIObservationsSequence) by ROI number, not by position: planning systems write them in different
orders (Eclipse sorts one by name, another by number), and ROIs may have no contours at all.

:func:`rasterise` fills one ROI's closed planar contours into a boolean mask shaped like a volume.
A contour goes onto the slice whose SOP instance it references (ContourImageSequence) or, when it
references none, onto the nearest slice plane. Points are projected onto the slice's row and column
directions, so oblique, sagittal and gantry-tilted (sheared) stacks work as well as axial ones.
Pixels are filled when their centre lies inside the polygon (the rule the planning systems use, and
the one our writer's pixel-edge contours reproduce exactly), and contours of one ROI on one slice are
combined even-odd (XOR), so an inner contour is a hole and a contour inside that hole an island.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.errors import Permanent
from node.model.volume import Geometry, Volume

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: Geometric types filled by :func:`rasterise` (CLOSEDPLANAR_XOR states the even-odd rule explicitly).
CLOSED_TYPES = frozenset({"CLOSED_PLANAR", "CLOSEDPLANAR_XOR"})
#: A closed contour's points may spread this fraction of the slice spacing along the slice normal.
PLANAR_TOLERANCE = 0.1
_CONTOUR_DATA = 0x30060050


class StructureSetError(Permanent):
    """An RT Structure Set cannot be read, or its contours cannot be placed on a volume."""


@dataclass(frozen=True, eq=False)
class Contour:
    """One contour: its geometric type, points in patient LPS mm, and the image it was drawn on."""

    geometric_type: str
    points: np.ndarray  # (n, 3) float64
    referenced_sop_instance_uid: str | None


@dataclass
class Roi:
    """One ROI, merged from the three ROI sequences of the structure set."""

    number: int
    name: str
    interpreted_type: str  # RTROIInterpretedType; "" when there is no observation or it is empty
    color: tuple[int, int, int] | None  # ROIDisplayColor; None when missing or malformed
    generation_algorithm: str  # ROIGenerationAlgorithm (AUTOMATIC, SEMIAUTOMATIC, MANUAL) or ""
    frame_of_reference_uid: str  # ReferencedFrameOfReferenceUID or ""
    contours: list[Contour] = field(default_factory=list)


@dataclass(frozen=True)
class ReferencedSeries:
    """A series listed in ReferencedFrameOfReferenceSequence, with the images it names."""

    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]


@dataclass
class StructureSet:
    sop_instance_uid: str
    label: str
    rois: list[Roi]
    #: Every FrameOfReferenceUID in ReferencedFrameOfReferenceSequence (whether or not it lists studies).
    frame_of_reference_uids: list[str]
    referenced_series: list[ReferencedSeries]

    def roi(self, key: str | int) -> Roi:
        """The ROI with this name (first match) or ROI number."""
        for roi in self.rois:
            if (roi.number == key) if isinstance(key, int) else (roi.name == key):
                return roi
        raise StructureSetError(
            f"the structure set has no ROI {key!r}; it has {[(r.number, r.name) for r in self.rois]}"
        )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _number(item: Dataset, keyword: str, where: str) -> int:
    value = item.get(keyword)
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise StructureSetError(f"{where} has no valid {keyword} (got {value!r})") from None


def _color(item: Dataset) -> tuple[int, int, int] | None:
    value = item.get("ROIDisplayColor")
    try:
        rgb = tuple(int(str(v).strip()) for v in value)
    except (TypeError, ValueError):
        return None
    return (rgb[0], rgb[1], rgb[2]) if len(rgb) == 3 else None


def _points(item: Dataset, where: str) -> np.ndarray:
    """ContourData as (n, 3) float64, parsed from the raw DS text when still unparsed (much faster)."""
    element = item.get_item(_CONTOUR_DATA)
    if element is None:
        raise StructureSetError(f"{where} has no ContourData")
    value = element.value
    if value is None:
        parts: list[object] = []
    elif isinstance(value, bytes):
        parts = list(value.decode("ascii", "replace").split("\\")) if value.strip(b" \0") else []
    elif isinstance(value, str):
        parts = list(value.split("\\")) if value.strip() else []
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        values = np.array([float(str(p).strip(" \0")) for p in parts], dtype=np.float64)
    except ValueError:
        raise StructureSetError(f"{where} has non-numeric ContourData (starting {str(value)[:60]!r})") from None
    if values.size == 0 or values.size % 3:
        raise StructureSetError(f"{where} has {values.size} ContourData values; it needs a non-zero multiple of 3")
    if not np.isfinite(values).all():
        raise StructureSetError(f"{where} has non-finite ContourData values")
    return values.reshape(-1, 3)


def _contour(item: Dataset, where: str) -> Contour:
    geometric_type = _text(item, "ContourGeometricType").upper()
    if not geometric_type:
        raise StructureSetError(f"{where} has no ContourGeometricType")
    uid = None
    for image in item.get("ContourImageSequence", None) or []:
        uid = _text(image, "ReferencedSOPInstanceUID") or None
        if uid:
            break
    return Contour(geometric_type, _points(item, where), uid)


def _referenced(ds: Dataset) -> tuple[list[str], list[ReferencedSeries]]:
    frames, series = [], []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", None) or []:
        frame_uid = _text(frame, "FrameOfReferenceUID")
        frames.append(frame_uid)
        # RTReferencedStudySequence is Type 3: MIM may leave it out.
        for study in frame.get("RTReferencedStudySequence", None) or []:
            study_uid = _text(study, "ReferencedSOPInstanceUID")
            for item in study.get("RTReferencedSeriesSequence", None) or []:
                images = tuple(
                    _text(image, "ReferencedSOPInstanceUID") for image in item.get("ContourImageSequence", None) or []
                )
                series.append(ReferencedSeries(frame_uid, study_uid, _text(item, "SeriesInstanceUID"), images))
    return frames, series


def read_structure_set(source: Dataset | str | os.PathLike[str]) -> StructureSet:
    """Read an RT Structure Set (a dataset or a file path) into ROIs with their contours.

    ROIs keep StructureSetROISequence order. An observation naming no defined ROI is ignored (it
    carries no geometry); contours for an undefined ROI, or two contour items for one ROI, are errors.
    """
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            ds = dcmread(source)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise StructureSetError(f"{os.fspath(source)}: not a readable DICOM file ({exc})") from exc
    sop_class = _text(ds, "SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if not sop_class and meta is not None:
        sop_class = _text(meta, "MediaStorageSOPClassUID")
    modality = _text(ds, "Modality")
    if (sop_class and sop_class != RT_STRUCTURE_SET_STORAGE) or (not sop_class and modality != "RTSTRUCT"):
        raise StructureSetError(
            f"{ds.get('SOPInstanceUID', '?')} is not an RT Structure Set "
            f"(SOP class {sop_class or 'missing'}, modality {modality or 'missing'})"
        )
    if "StructureSetROISequence" not in ds:
        raise StructureSetError(f"RT Structure Set {ds.get('SOPInstanceUID', '?')} has no StructureSetROISequence")

    rois: dict[int, Roi] = {}
    for n, item in enumerate(ds.StructureSetROISequence or [], start=1):
        number = _number(item, "ROINumber", f"StructureSetROISequence item {n}")
        if number in rois:
            raise StructureSetError(f"ROI number {number} is defined twice in StructureSetROISequence")
        rois[number] = Roi(
            number=number,
            name=_text(item, "ROIName"),
            interpreted_type="",
            color=None,
            generation_algorithm=_text(item, "ROIGenerationAlgorithm").upper(),
            frame_of_reference_uid=_text(item, "ReferencedFrameOfReferenceUID"),
        )

    seen: set[int] = set()
    for n, item in enumerate(ds.get("ROIContourSequence", None) or [], start=1):
        number = _number(item, "ReferencedROINumber", f"ROIContourSequence item {n}")
        if number not in rois:
            raise StructureSetError(
                f"ROIContourSequence item {n} refers to ROI number {number}, which StructureSetROISequence "
                f"does not define (it defines {sorted(rois)})"
            )
        if number in seen:
            raise StructureSetError(f"ROIContourSequence has two items for ROI number {number}")
        seen.add(number)
        roi = rois[number]
        roi.color = _color(item)
        roi.contours = [
            _contour(contour, f"contour {c} of ROI {number} ({roi.name!r})")
            for c, contour in enumerate(item.get("ContourSequence", None) or [], start=1)
        ]

    for item in ds.get("RTROIObservationsSequence", None) or []:
        try:
            number = int(str(item.get("ReferencedROINumber")).strip())
        except ValueError:
            continue
        if number in rois and not rois[number].interpreted_type:
            rois[number].interpreted_type = _text(item, "RTROIInterpretedType").upper()

    frames, series = _referenced(ds)
    return StructureSet(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        label=_text(ds, "StructureSetLabel"),
        rois=list(rois.values()),
        frame_of_reference_uids=frames,
        referenced_series=series,
    )


def _slice_index(
    contour: Contour,
    where: str,
    geometry: Geometry,
    index: dict[str, int],
    roi_frame: str,
    volume_frame: str,
) -> int:
    """The slice a closed contour lies on: its referenced image, else the nearest slice plane."""
    spacing = geometry.spacing[0]
    along = (contour.points - geometry.origin) @ geometry.normal
    spread = float(along.max() - along.min())
    if spread > PLANAR_TOLERANCE * spacing:
        raise StructureSetError(
            f"{where} is not in a slice plane: its points spread {spread:.2f} mm along the slice normal "
            f"{np.round(geometry.normal, 3).tolist()} (more than {PLANAR_TOLERANCE * spacing:.2f} mm)"
        )
    uid = contour.referenced_sop_instance_uid
    if uid and index:
        if uid not in index:
            raise StructureSetError(
                f"{where} references image {uid}, which is not one of the {len(index)} images of the volume"
            )
        k = index[uid]
    else:
        # Placed by geometry alone, which means something only within one frame of reference.
        if roi_frame and volume_frame and roi_frame != volume_frame:
            raise StructureSetError(
                f"{where} references no image of the volume and its ROI is in frame of reference {roi_frame}, "
                f"not the volume's {volume_frame}"
            )
        k = int(np.argmin(np.abs(geometry.along_normal() - float(along.mean()))))  # even or uneven stacks
    distance = float(np.mean((contour.points - geometry.slice_position(k)) @ geometry.normal))
    if abs(distance) > 0.5 * spacing + 1e-6:
        place = f"the plane of slice {k}" + (f" (image {uid})" if uid and index else ", the nearest slice")
        raise StructureSetError(
            f"{where} lies {distance:+.2f} mm from {place}, more than half the slice spacing of {spacing:.2f} mm"
        )
    return k


def fill_polygon(rows: np.ndarray, cols: np.ndarray, layer: np.ndarray) -> None:
    """Set ``layer`` (a bool image, overwritten) True at the pixels whose centre lies inside the polygon.

    A scanline fill, even-odd: for each pixel row, the edges crossing its centre line (half-open in the
    row direction, so a vertex on the line counts once) give sorted crossings, and the pixels between the
    first and second, third and fourth, ... are inside. Vectorised over all rows and edges at once: a
    pixel-edge contour of a body outline (thousands of vertices) fills in about a millisecond.
    """
    layer[:] = False
    height, width = layer.shape
    r0, c0 = rows, cols
    r1, c1 = np.roll(rows, -1), np.roll(cols, -1)
    lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
    first, last = max(0, int(np.ceil(lo.min()))), min(height - 1, int(np.floor(hi.max())))
    if last < first:
        return
    centres = np.arange(first, last + 1, dtype=np.float64)
    crossing = (lo[:, None] <= centres[None, :]) & (centres[None, :] < hi[:, None])
    edge, row = np.nonzero(crossing)
    if edge.size == 0:
        return
    t = (centres[row] - r0[edge]) / (r1[edge] - r0[edge])
    x = c0[edge] + t * (c1[edge] - c0[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    starts, ends = x[0::2], x[1::2]
    line = row[0::2] + first
    begin = np.clip(np.ceil(starts), 0, width).astype(np.int64)
    end = np.clip(np.ceil(ends), 0, width).astype(np.int64)
    keep = end > begin
    marks = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(marks, (line[keep], begin[keep]), 1)
    np.add.at(marks, (line[keep], end[keep]), -1)
    layer[:] = np.cumsum(marks[:, :width], axis=1) > 0


def rasterise(
    roi: Roi,
    target: Volume | Geometry,
    sop_instance_uids: Sequence[str] | None = None,
) -> np.ndarray:
    """Fill ``roi``'s closed planar contours into a bool mask of ``target``'s shape (slice, row, column).

    ``sop_instance_uids`` are the target's images in slice order (a Volume's own by default); a
    contour referencing an image that is not among them is an error, since the structure set was then
    drawn on other images. Contours without an image reference (or all contours, when no UIDs are
    given) go onto the nearest slice plane. POINT and OPEN_* contours are skipped.
    """
    if isinstance(target, Volume):
        geometry = target.geometry
        if sop_instance_uids is None:
            sop_instance_uids = target.sop_instance_uids
        volume_frame = _text(target.headers[0], "FrameOfReferenceUID") if target.headers else ""
    else:
        geometry, volume_frame = target, ""
    uids = list(sop_instance_uids or [])
    if uids and len(uids) != geometry.shape[0]:
        raise StructureSetError(f"{len(uids)} SOP instance UIDs were given for a volume of {geometry.shape[0]} slices")
    index = {uid: k for k, uid in enumerate(uids)}
    mask = np.zeros(geometry.shape, dtype=bool)
    layer = np.zeros(geometry.shape[1:], dtype=bool)
    for n, contour in enumerate(roi.contours, start=1):
        if contour.geometric_type not in CLOSED_TYPES or len(contour.points) < 3:
            continue
        where = f"contour {n} of ROI {roi.number} ({roi.name!r})"
        k = _slice_index(contour, where, geometry, index, roi.frame_of_reference_uid, volume_frame)
        offset = contour.points - geometry.slice_position(k)
        rows = offset @ geometry.col_dir / geometry.spacing[1]
        cols = offset @ geometry.row_dir / geometry.spacing[2]
        fill_polygon(rows, cols, layer)
        mask[k] ^= layer
    return mask
