"""Edit an RT Structure Set the way a clinician does in a planning system, with pydicom.

A planning system that saves an edited structure set writes a new instance: a new SOP Instance UID, a
new series, a new StructureSetLabel, today's date. The helpers here change the node's RTSTRUCT in
place of a clinician: move a structure, erode it on some slices (each contour offset inwards, mitred,
so every edge moves by exactly the distance), delete one, add one, and write it out.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid


def _roi_number(ds: Dataset, name: str) -> int:
    for item in ds.StructureSetROISequence:
        if str(item.ROIName) == name:
            return int(item.ROINumber)
    names = [str(i.ROIName) for i in ds.StructureSetROISequence]
    raise KeyError(f"no ROI {name!r} in the structure set (it has {names})")


def _contours(ds: Dataset, name: str) -> list[Dataset]:
    number = _roi_number(ds, name)
    for item in ds.ROIContourSequence:
        if int(item.ReferencedROINumber) == number:
            return list(item.ContourSequence)
    raise KeyError(f"ROI {name!r} has no ROIContourSequence item")


def _points(contour: Dataset) -> np.ndarray:
    return np.array([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)


def _set_points(contour: Dataset, points: np.ndarray) -> None:
    contour.ContourData = [f"{v:.3f}" for v in points.reshape(-1)]
    contour.NumberOfContourPoints = len(points)


def new_version(source: Path | Dataset, label: str, *, manufacturer: str = "Varian Medical Systems") -> Dataset:
    """A copy as a planning system saves an edit: new SOP Instance UID and series, new label, today's date."""
    ds = copy.deepcopy(source if isinstance(source, Dataset) else dcmread(source))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.Manufacturer = manufacturer
    now = datetime.datetime.now()
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    for item in ds.StructureSetROISequence:
        item.ROIGenerationAlgorithm = "MANUAL"
    return ds


def move_roi(ds: Dataset, name: str, offset_mm: Sequence[float]) -> None:
    """Move every contour of ``name`` by ``offset_mm`` (in-plane: the contours stay on their slices)."""
    for contour in _contours(ds, name):
        _set_points(contour, _points(contour) + np.asarray(offset_mm, dtype=np.float64))


def offset_polygon(points: np.ndarray, inward_mm: float) -> np.ndarray:
    """An axial polygon (n, 3) with every edge moved ``inward_mm`` towards its inside (mitred corners)."""
    xy = points[:, :2]
    area = 0.5 * float(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
    edges = np.roll(xy, -1, axis=0) - xy  # edge i: vertex i → i+1
    lengths = np.linalg.norm(edges, axis=1, keepdims=True)
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / np.where(lengths > 0, lengths, 1.0)
    if area < 0:  # clockwise: the left normal points outwards
        normals = -normals
    before, after = np.roll(normals, 1, axis=0), normals  # the edges into and out of each vertex
    mitre = before + after
    mitre /= np.maximum(np.linalg.norm(mitre, axis=1, keepdims=True), 1e-9)
    scale = inward_mm / np.maximum(np.sum(mitre * after, axis=1, keepdims=True), 0.5)
    out = points.copy()
    out[:, :2] = xy + mitre * scale
    return out


def erode_roi(ds: Dataset, name: str, mm: float, slices: int) -> list[float]:
    """Erode ``name`` by ``mm`` on ``slices`` consecutive slices in the middle of its extent; their z (mm)."""
    contours = sorted(_contours(ds, name), key=lambda c: float(_points(c)[0, 2]))
    planes = sorted({round(float(_points(c)[0, 2]), 3) for c in contours})
    start = max(0, len(planes) // 2 - slices // 2)
    chosen = planes[start:start + slices]
    for contour in contours:
        if round(float(_points(contour)[0, 2]), 3) in chosen:
            _set_points(contour, offset_polygon(_points(contour), mm))
    return chosen


def delete_roi(ds: Dataset, name: str) -> None:
    """Remove ``name`` from the three ROI sequences."""
    number = _roi_number(ds, name)
    for keyword, key in (("StructureSetROISequence", "ROINumber"), ("ROIContourSequence", "ReferencedROINumber"),
                         ("RTROIObservationsSequence", "ReferencedROINumber")):
        kept = [item for item in ds.get(keyword, []) if int(item.get(key)) != number]
        setattr(ds, keyword, DicomSequence(kept))


def add_roi(ds: Dataset, name: str, contours: Sequence[tuple[np.ndarray, str]], *, kind: str = "GTV",
            color: tuple[int, int, int] = (255, 0, 0)) -> int:
    """Add a manually drawn ROI of closed planar ``contours`` ((n, 3) points, the image each is drawn on)."""
    number = max(int(i.ROINumber) for i in ds.StructureSetROISequence) + 1
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    roi.ROIName = name
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence.append(roi)
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(color)
    item.ContourSequence = DicomSequence()
    for points, image_uid in contours:
        contour = Dataset()
        image = Dataset()
        image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        image.ReferencedSOPInstanceUID = image_uid
        contour.ContourImageSequence = DicomSequence([image])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        _set_points(contour, points)
        item.ContourSequence.append(contour)
    ds.ROIContourSequence.append(item)
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.RTROIInterpretedType = kind
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence.append(observation)
    return number


def circle(centre: Sequence[float], radius_mm: float, points: int = 48) -> np.ndarray:
    """An axial circle (points, 3) around ``centre`` (x, y, z)."""
    angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    return np.stack([centre[0] + radius_mm * np.cos(angles), centre[1] + radius_mm * np.sin(angles),
                     np.full(points, float(centre[2]))], axis=1)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
