"""RT Structure Set reader: real planning-system files, and exact round trips through our own writer."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from node.assemble.volume import build_volume, read_series
from node.model.volume import Geometry, Volume
from node.read import Contour, Roi, StructureSetError, rasterise, read_structure_set
from node.write.result import Result
from node.write.rtstruct import build_rtstruct
from node.write.uids import ResultUids
from tests.harness.synthetic_ct import write_ct_series
from tests.harness.writing import BUNDLE, ORIENTATIONS, PROV

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "reference"


def _reference(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is not available")
    return path


# ---------------------------------------------------------------- real files


def test_eclipse_structure_set() -> None:
    folder = _reference("eclipse-rtstruct")
    paths = sorted(folder.glob("RS.*.dcm"))
    if not paths:
        pytest.skip(f"no RS.*.dcm in {folder}")
    ss = read_structure_set(paths[0])
    # Eclipse writes StructureSetROISequence (and the other two) in its own order, not by number.
    assert [r.number for r in ss.rois] == [1, 2, 3, 12, 11, 8, 13, 4, 5, 6, 14, 15, 16, 7, 9, 10]
    names = {r.number: r.name for r in ss.rois}
    assert names[1] == "BODY" and names[12] == "Femoral Head Lt" and names[11] == "Femoral Head RT"
    types = {r.name: r.interpreted_type for r in ss.rois}
    assert types["BODY"] == "EXTERNAL"
    assert types["PROS"] == "PTV" and types["PTV"] == "PTV" and types["CTV"] == "CTV"
    assert types["Rectum"] == "AVOIDANCE" and types["Vessels - left"] == "ORGAN" and types["XApprox"] == "MARKER"
    assert types["X1"] == types["X2"] == types["X3"] == ""  # empty RTROIInterpretedType
    contoured = {r.name: len(r.contours) for r in ss.rois if r.contours}
    assert contoured == {"BODY": 92, "Bladder": 21, "Femoral Head Lt": 19, "Femoral Head RT": 18, "PTV": 20,
                         "Rectum": 40}
    body = ss.roi("BODY")
    assert body.color == (0, 255, 0) and body.generation_algorithm == ""  # Type 2, left empty by Eclipse
    assert all(c.geometric_type == "CLOSED_PLANAR" and c.referenced_sop_instance_uid for c in body.contours)
    assert all(c.points.dtype == np.float64 and c.points.shape[1] == 3 for c in body.contours)
    assert len(ss.referenced_series) == 1
    series = ss.referenced_series[0]
    assert series.series_instance_uid == "1.2.840.113619.2.55.3.671756986.106.1316467036.465"
    assert len(series.sop_instance_uids) == 92
    assert {c.referenced_sop_instance_uid for c in body.contours} == set(series.sop_instance_uids)
    assert {r.frame_of_reference_uid for r in ss.rois} == set(ss.frame_of_reference_uids)


def test_eclipse_contours_fill_by_nearest_plane() -> None:
    """Without its CT, place Eclipse's contours on a grid matching their planes (no image UIDs)."""
    folder = _reference("eclipse-rtstruct")
    paths = sorted(folder.glob("RS.*.dcm"))
    if not paths:
        pytest.skip(f"no RS.*.dcm in {folder}")
    ss = read_structure_set(paths[0])
    body, bladder = ss.roi("BODY"), ss.roi("Bladder")
    points = np.concatenate([c.points for c in body.contours])
    z = np.unique(np.round(points[:, 2], 3))
    geometry = _grid(points.min(axis=0) - 10, float(z[0]), 2.5, len(z), 1.0, 512)
    body_mask = rasterise(body, geometry)
    bladder_mask = rasterise(bladder, geometry)
    assert body_mask.any(axis=(1, 2)).all()  # one BODY contour on every slice
    assert bladder_mask.any(axis=(1, 2)).sum() == 21
    assert (bladder_mask & ~body_mask).sum() == 0  # the bladder lies inside the body


def _grid(corner: np.ndarray, z0: float, dz: float, slices: int, spacing: float, size: int) -> Geometry:
    """An axial grid: slices every ``dz`` mm from ``z0``, ``size`` x ``size`` pixels from ``corner`` (x, y)."""
    return Geometry(
        origin=np.array([corner[0], corner[1], z0]),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        normal=np.array([0.0, 0.0, 1.0]),
        slice_step=np.array([0.0, 0.0, dz]),
        spacing=(dz, spacing, spacing),
        shape=(slices, size, size),
    )


def _mim_ct() -> Volume:
    folder = _reference("mim-rtstruct")
    return build_volume(read_series([folder / "ct_1.dcm", folder / "ct_2.dcm"]))


def test_mim_folder_rt_utils_structure_set_rasterises_with_its_hole() -> None:
    ss = read_structure_set(_reference("mim-rtstruct", "rt.dcm"))
    assert [(r.number, r.name, r.interpreted_type, r.generation_algorithm) for r in ss.rois] == [
        (1, "ROI-1", "", "MANUAL")
    ]
    roi = ss.rois[0]
    assert roi.color == (162, 136, 95) and len(roi.contours) == 2
    volume = _mim_ct()
    assert [c.referenced_sop_instance_uid for c in roi.contours] == [volume.sop_instance_uids[0]] * 2
    # rt-utils wrote a frame of reference of its own; the contours are tied to the CT by image UID.
    assert roi.frame_of_reference_uid != volume.headers[0].FrameOfReferenceUID
    mask = rasterise(roi, volume)
    assert mask.shape == volume.voxels.shape
    assert mask[0].any() and not mask[1].any()
    g = volume.geometry

    def pixel(x: float, y: float) -> tuple[int, int]:
        offset = np.array([x, y, 60.0]) - g.slice_position(0)
        return int(round(offset @ g.col_dir / g.spacing[1])), int(round(offset @ g.row_dir / g.spacing[2]))

    assert mask[0][pixel(-49.0, -49.0)]  # in the outer square (-51..-27 mm), outside the inner contour
    assert not mask[0][pixel(-39.0, -39.0)]  # inside the inner contour (-47..-32 mm): a hole
    assert np.array_equal(rasterise(roi, volume.geometry), mask)  # nearest plane agrees with the UIDs


def test_contours_without_image_refs_need_the_volumes_frame_of_reference() -> None:
    roi = read_structure_set(_reference("mim-rtstruct", "rt.dcm")).rois[0]
    bare = dataclasses.replace(roi, contours=[dataclasses.replace(c, referenced_sop_instance_uid=None)
                                              for c in roi.contours])
    with pytest.raises(StructureSetError, match="frame of reference"):
        rasterise(bare, _mim_ct())


@pytest.mark.parametrize("name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_mim_structure_sets_referencing_images_the_ct_lacks(name: str) -> None:
    """MIM files whose contours lie on 3 slices (z 60, 65, 70) of which the CT folder holds 2."""
    ss = read_structure_set(_reference("mim-rtstruct", name))
    assert [(r.number, r.name, r.interpreted_type) for r in ss.rois] == [
        (1, "ROI-1", ""), (2, "ROI-2", ""), (3, "ROI-3", ""), (4, "ROI-4", "")
    ]
    assert all(len(r.contours) == 3 for r in ss.rois)
    if name.startswith("non_existent"):
        # ReferencedFrameOfReferenceSequence without RTReferencedStudySequence (Type 3): readable.
        assert ss.referenced_series == [] and len(ss.frame_of_reference_uids) == 1
    else:
        assert len(ss.referenced_series) == 1 and len(ss.referenced_series[0].sop_instance_uids) == 5
    volume = _mim_ct()
    missing = "2.16.840.1.114362.1.11940992.23790159890.563423471.995.90"
    assert missing not in volume.sop_instance_uids
    for roi in ss.rois:
        with pytest.raises(StructureSetError, match=f"references image {missing}, which is not one of the 2 images"):
            rasterise(roi, volume)
        # By geometry alone, the z = 70 mm contour is a whole slice beyond the last CT plane (65 mm).
        with pytest.raises(StructureSetError, match="more than half the slice spacing"):
            rasterise(roi, volume.geometry)
        # The contours that do lie on the CT fill non-empty masks on both slices.
        present = [c for c in roi.contours if c.referenced_sop_instance_uid in volume.sop_instance_uids]
        mask = rasterise(dataclasses.replace(roi, contours=present), volume)
        assert mask.any(axis=(1, 2)).all()


def test_a_ct_image_is_not_a_structure_set() -> None:
    with pytest.raises(StructureSetError, match="is not an RT Structure Set"):
        read_structure_set(_reference("mim-rtstruct", "ct_1.dcm"))


def test_xio_structure_set() -> None:
    ss = read_structure_set(_reference("xio-rtstruct", "rtss.dcm"))
    assert [(r.number, r.name, r.interpreted_type) for r in ss.rois] == [
        (1, "BODY", "EXTERNAL"), (2, "Areola", "AVOIDANCE"), (3, "Borders", "CTV"), (4, "Breast", "GTV"),
        (5, "Heart", "ORGAN"), (6, "Lt Lung", "AVOIDANCE"), (7, "Nodes", "AVOIDANCE"), (8, "Scar", "AVOIDANCE"),
        (9, "Tumor Bed", "CTV"), (10, "Tumor Bed Block", "GTV"),
    ]
    assert all(r.generation_algorithm == "MANUAL" for r in ss.rois)
    assert [len(r.contours) for r in ss.rois] == [141, 0, 2, 48, 33, 165, 4, 6, 18, 24]
    assert ss.roi("Heart").color == (255, 128, 0)
    assert len(ss.referenced_series) == 1 and len(ss.referenced_series[0].sop_instance_uids) == 98


def test_xio_body_on_its_one_ct_slice() -> None:
    ss = read_structure_set(_reference("xio-rtstruct", "rtss.dcm"))
    volume = build_volume(read_series([_reference("xio-rtstruct", "ct.0.dcm")]))
    body = ss.roi("BODY")
    on_slice = [c for c in body.contours if c.referenced_sop_instance_uid == volume.sop_instance_uids[0]]
    assert len(on_slice) == 4  # the outline plus small separate contours on the same plane
    mask = rasterise(dataclasses.replace(body, contours=on_slice), volume)
    hu = volume.voxels
    assert mask.sum() > 10_000
    assert (hu[mask] > -400).mean() > 0.95 and (hu[~mask] > -400).mean() < 0.05
    with pytest.raises(StructureSetError, match="not one of the 1 images"):
        rasterise(body, volume)  # the other 97 slices are not here


# ---------------------------------------------------------------- synthetic cases


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """A ring with a hole and an island; one slice also has an island inside the hole."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:10, 30:70, 25:65] = 1
    labels[2:10, 40:60, 35:55] = 0
    labels[4:8, 10:18, 75:88] = 1
    labels[6, 46:53, 41:49] = 1
    return labels


def _volume(tmp_path: Path, orientation: tuple[float, ...]) -> Volume:
    origin = (40.0, -200.0, 200.0) if orientation == ORIENTATIONS["sagittal"] else (-192.0, -192.0, 0.0)
    series = write_ct_series(tmp_path, slices=12, rows=96, columns=96, pixel_spacing=(4.0, 4.0),
                             slice_thickness=4.0, orientation=orientation, origin=origin, noise_hu=0)
    return build_volume(read_series(series.files))


def _round_trip(tmp_path: Path, volume: Volume, labels: np.ndarray) -> Roi:
    rt = build_rtstruct(Result.of(volume, labels, BUNDLE, ResultUids.for_job("key"), PROV))
    buffer = BytesIO()
    rt.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "rt.dcm"
    path.write_bytes(buffer.getvalue())
    ss = read_structure_set(path)
    assert [(r.number, r.name, r.interpreted_type, r.generation_algorithm) for r in ss.rois] == [
        (1, "BODY", "EXTERNAL", "AUTOMATIC")
    ]
    assert ss.referenced_series[0].sop_instance_uids == tuple(volume.sop_instance_uids)
    return ss.rois[0]


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_round_trip_through_our_writer_is_exact(tmp_path: Path, name: str) -> None:
    volume = _volume(tmp_path, ORIENTATIONS[name])
    labels = _labels(volume.geometry.shape)
    roi = _round_trip(tmp_path, volume, labels)
    referenced: list[str] = []
    for c in roi.contours:
        assert c.referenced_sop_instance_uid is not None  # every contour our writer makes names its image
        referenced.append(c.referenced_sop_instance_uid)
    assert len([uid for uid in referenced if volume.sop_instance_uids.index(uid) == 6]) == 4
    mask = rasterise(roi, volume)
    assert np.array_equal(mask, labels.astype(bool))
    assert np.array_equal(rasterise(roi, volume.geometry), mask)  # nearest plane, no UIDs


def test_round_trip_on_a_gantry_tilted_sheared_stack(tmp_path: Path) -> None:
    volume = _volume(tmp_path, ORIENTATIONS["axial"])
    g = volume.geometry
    sheared = dataclasses.replace(g, slice_step=g.spacing[0] * g.normal + 1.7 * g.col_dir + 0.6 * g.row_dir)
    volume = Volume(voxels=volume.voxels, geometry=sheared, headers=volume.headers)
    labels = _labels(sheared.shape)
    roi = _round_trip(tmp_path, volume, labels)
    assert np.array_equal(rasterise(roi, volume), labels.astype(bool))
    assert np.array_equal(rasterise(roi, sheared), labels.astype(bool))


def _square(z: float, size: float = 20.0) -> np.ndarray:
    return np.array([[-size, -size, z], [size, -size, z], [size, size, z], [-size, size, z]], dtype=np.float64)


def _roi(*contours: Contour) -> Roi:
    return Roi(1, "R", "ORGAN", None, "MANUAL", "", list(contours))


def test_placement_errors_and_skipped_types() -> None:
    g = _grid(np.array([-50.5, -50.5]), 0.0, 3.0, 4, 1.0, 100)  # square edges between pixel centres
    tilted = _square(3.0)
    tilted[2, 2] = 4.0  # a 1 mm rise along the normal: beyond 0.1 x 3 mm
    with pytest.raises(StructureSetError, match="not in a slice plane: its points spread 1.00 mm"):
        rasterise(_roi(Contour("CLOSED_PLANAR", tilted, None)), g)
    with pytest.raises(StructureSetError, match=r"lies \+2.00 mm from the plane of slice 3"):
        rasterise(_roi(Contour("CLOSED_PLANAR", _square(11.0), None)), g)
    with pytest.raises(StructureSetError, match="2 SOP instance UIDs were given for a volume of 4 slices"):
        rasterise(_roi(), g, ["1.2", "1.3"])
    # Referenced by UID, but 3.5 mm from that image's plane: the reference and the points disagree.
    with pytest.raises(StructureSetError, match=r"lies \+3.50 mm from the plane of slice 1 \(image 1.1\)"):
        rasterise(_roi(Contour("CLOSED_PLANAR", _square(6.5), "1.1")), g, ["1.0", "1.1", "1.2", "1.3"])
    mask = rasterise(_roi(Contour("POINT", _square(3.0)[:1], None), Contour("OPEN_PLANAR", _square(3.0), None),
                          Contour("CLOSEDPLANAR_XOR", _square(4.0), None)), g)
    assert mask[1].sum() == 40 * 40 and mask.sum() == 40 * 40  # 1 mm off slice 1 is within half a spacing


def test_sequences_are_matched_by_roi_number_and_inconsistencies_named() -> None:
    def item(**values: object) -> Dataset:
        ds = Dataset()
        for key, value in values.items():
            setattr(ds, key, value)
        return ds

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence = [item(ROINumber=7, ROIName="B"), item(ROINumber=3, ROIName="A")]
    contour = item(ContourGeometricType="CLOSED_PLANAR", ContourData=[0, 0, 0, 1, 0, 0, 1, 1, 0])
    ds.ROIContourSequence = [item(ReferencedROINumber=3, ROIDisplayColor=[1, 2, 3], ContourSequence=[contour]),
                             item(ReferencedROINumber=7)]
    ds.RTROIObservationsSequence = [item(ReferencedROINumber=7, RTROIInterpretedType="PTV"),
                                    item(ReferencedROINumber=99, RTROIInterpretedType="ORGAN")]
    ss = read_structure_set(ds)
    assert [(r.number, r.name, r.interpreted_type, r.color, len(r.contours)) for r in ss.rois] == [
        (7, "B", "PTV", None, 0), (3, "A", "", (1, 2, 3), 1)
    ]
    assert ss.roi(3).contours[0].referenced_sop_instance_uid is None
    assert ss.roi(3).contours[0].points.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    ds.ROIContourSequence.append(item(ReferencedROINumber=5))
    with pytest.raises(StructureSetError, match="refers to ROI number 5, which StructureSetROISequence does not"):
        read_structure_set(ds)
    del ds.ROIContourSequence[2]
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [0, 0, 0, 1]
    with pytest.raises(StructureSetError, match="contour 1 of ROI 3 \\('A'\\) has 4 ContourData values"):
        read_structure_set(ds)
    with pytest.raises(StructureSetError, match="no ROI 'C'"):
        ss.roi("C")


def test_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not dicom at all")
    with pytest.raises(StructureSetError, match="x.dcm: not a readable DICOM file"):
        read_structure_set(path)


# ---------------------------------------------------------------- the scanline fill and the SEG reader


def test_scanline_fill_matches_point_in_polygon() -> None:
    """``fill_polygon`` (vectorised scanlines) fills the pixels whose centre is inside, as skimage's
    point-in-polygon test does, for random polygons whose vertices avoid the pixel-centre lines."""
    from skimage.draw import polygon

    from node.read.rtstruct import fill_polygon

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(3, 30))
        rows, cols = rng.uniform(-5, 45, n), rng.uniform(-5, 45, n)
        expected = np.zeros((40, 40), dtype=bool)
        rr, cc = polygon(rows, cols, shape=expected.shape)
        expected[rr, cc] = True
        got = np.ones((40, 40), dtype=bool)  # overwritten
        fill_polygon(rows, cols, got)
        assert np.array_equal(got, expected)


def test_dcmqi_segmentation_reads_onto_its_ct() -> None:
    from node.read.seg import SegmentationError, read_segmentation

    folder = _reference("dcmqi-liver-seg")
    volume = build_volume(read_series(sorted((folder / "ct-3slice").glob("*.dcm"))))
    seg = read_segmentation(folder / "liver.dcm", volume.geometry, volume.sop_instance_uids)
    (liver,) = seg.segments
    assert liver.label == "Liver" and liver.mask.shape == volume.voxels.shape
    assert liver.mask.any(axis=(1, 2)).all()  # a liver outline on each of the three slices
    assert seg.referenced_series_uids == (str(volume.headers[0].SeriesInstanceUID),)
    with pytest.raises(SegmentationError, match="not one of the 2 images of the volume"):
        read_segmentation(folder / "liver.dcm", volume.geometry, volume.sop_instance_uids[:2])
