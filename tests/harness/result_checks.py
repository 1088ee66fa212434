"""Independent checks of what the node wrote: references, geometry, validity (dciodvfy)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread

from tests.harness.dcmtk import dciodvfy

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def read_sources(paths: Iterable[Path]) -> dict[str, Dataset]:
    """SOP Instance UID → header of each pushed source instance."""
    out: dict[str, Dataset] = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def check_seg(seg_path: Path, sources: dict[str, Dataset], expected_segments: set[str]) -> Dataset:
    seg = dcmread(seg_path)
    assert seg.SOPClassUID == SEG_CLASS
    first = next(iter(sources.values()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.PatientID == first.PatientID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced and referenced <= set(sources), f"SEG references unknown instances {referenced - set(sources)}"
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for src in frame.DerivationImageSequence[0].SourceImageSequence:
            assert str(src.ReferencedSOPInstanceUID) in sources
    parsed = hd.seg.segread(seg_path)
    labels = {parsed.get_segment_description(n).segment_label for n in parsed.segment_numbers}
    assert labels == expected_segments, labels
    return seg


def contour_plane_distance(points: np.ndarray, image: Dataset) -> float:
    iop = np.array([float(v) for v in image.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    ipp = np.array([float(v) for v in image.ImagePositionPatient])
    return float(np.abs((points - ipp) @ normal).max())


def check_rtstruct(rt_path: Path, sources: dict[str, Dataset], expected_rois: set[str]) -> Dataset:
    rt = dcmread(rt_path)
    assert rt.SOPClassUID == RTSTRUCT_CLASS
    first = next(iter(sources.values()))
    assert rt.StudyInstanceUID == first.StudyInstanceUID
    assert rt.PatientID == first.PatientID
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    listed = {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence}
    assert listed == set(sources), "ContourImageSequence must list exactly the source images"
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    assert set(names.values()) == expected_rois
    assert {int(o.ReferencedROINumber) for o in rt.RTROIObservationsSequence} == set(names)
    n_contours = 0
    for roi in rt.ROIContourSequence:
        assert int(roi.ReferencedROINumber) in names
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints) >= 3
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            assert uid in sources, f"contour references unknown instance {uid}"
            distance = contour_plane_distance(points, sources[uid])
            assert distance < 0.01, f"contour lies {distance:.3f} mm off the plane of {uid}"
            n_contours += 1
    assert n_contours > 0
    return rt


def assert_dciodvfy_clean(path: Path) -> None:
    report = dciodvfy(path)
    assert report.ok, f"dciodvfy errors in {path.name}:\n" + "\n".join(report.errors)
