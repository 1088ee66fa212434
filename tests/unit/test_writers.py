"""SEG and RTSTRUCT built from a label volume: valid (dciodvfy), exact on read-back, in the right place."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from skimage.draw import polygon as fill_polygon

from node.assemble.volume import build_volume, read_series
from node.errors import WriteError
from node.model.bundle import Bundle, Code, ContourOptions, ContourRule, ContourSmoothing, Label
from node.model.enums import SegType
from node.model.volume import Volume
from node.write import files as files_module
from node.write import seg as seg_module
from node.write.contours import mask_contours_px, slice_contours_px
from node.write.result import Result, present_labels
from node.write.rtstruct import build_rtstruct
from node.write.seg import build_seg, build_seg_highdicom
from node.write.uids import ResultUids, job_key
from tests.harness.dcmtk import dciodvfy, tool_missing_reason
from tests.harness.synthetic_ct import body_mask_lps, write_ct_series
from tests.harness.writing import BUNDLE, ORIENTATIONS, PROV


def _case(tmp_path: Path, orientation: tuple[float, ...]) -> tuple[Volume, np.ndarray]:
    origin = (40.0, -200.0, 200.0) if orientation == ORIENTATIONS["sagittal"] else (-204.8, -204.8, 0.0)
    series = write_ct_series(tmp_path, slices=16, rows=96, columns=96, pixel_spacing=(4.2, 4.2),
                             slice_thickness=5.0, orientation=orientation, origin=origin, noise_hu=0)
    volume = build_volume(read_series(series.files))
    k, i, j = np.meshgrid(*(np.arange(n) for n in volume.geometry.shape), indexing="ij")
    truth = body_mask_lps(volume.geometry.to_patient(np.stack([k, i, j], axis=-1)))
    assert truth.any()
    return volume, truth.astype(np.uint8)


def _save(ds) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_seg_reads_back_to_exactly_the_labels(tmp_path: Path, name: str, seg_type: SegType) -> None:
    volume, labels = _case(tmp_path, ORIENTATIONS[name])
    uids = ResultUids.for_job(job_key(str(volume.headers[0].SeriesInstanceUID), BUNDLE.id, volume.sop_instance_uids))
    seg = build_seg(Result.of(volume, labels, BUNDLE, uids, PROV), seg_type=seg_type)
    path = tmp_path / "seg.dcm"
    path.write_bytes(_save(seg))
    parsed = hd.seg.segread(path)
    assert parsed.SOPInstanceUID == uids.seg_instance
    back = parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=True)
    assert np.array_equal(back, labels)
    assert parsed.SegmentationType == seg_type
    # Debian's dicom3tools predates the Label Map Segmentation IOD (2024): it validates BINARY only.
    if seg_type == "BINARY" and not tool_missing_reason("dciodvfy"):
        report = dciodvfy(path)
        assert report.ok, report.errors


def _comparable(data: bytes):
    """A written SEG read back, without what differs on every build (random UIDs, time stamps)."""
    ds = dcmread(BytesIO(data))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        delattr(ds, keyword)
    for item in ds.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    for item in [*ds.DimensionOrganizationSequence, *ds.DimensionIndexSequence]:
        del item.DimensionOrganizationUID
    for item in ds.SegmentSequence:
        item.pop("TrackingUID", None)
    return ds


def _three_structures(volume: Volume, body: np.ndarray) -> tuple[Bundle, np.ndarray]:
    anatomy = Code("SCT", "123037004", "Anatomical Structure")
    bundle = dataclasses.replace(BUNDLE, labels=(
        BUNDLE.labels[0],
        Label(2, "Lung_L", anatomy, Code("SCT", "44029006", "Left lung"), (0, 128, 255), "ORGAN"),
        Label(3, "Spine", anatomy, Code("SCT", "421060004", "Spinal column"), (255, 255, 0), "ORGAN"),
    ))
    labels = body.copy()
    labels[(volume.voxels < -600) & (body > 0)] = 2
    labels[volume.voxels > 500] = 3
    return bundle, labels


@pytest.mark.parametrize("structures", [1, 3])
@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_seg_is_what_highdicom_builds_for_the_whole_series(
    tmp_path: Path, name: str, seg_type: SegType, structures: int, caplog: pytest.LogCaptureFixture
) -> None:
    """build_seg writes the frames itself (highdicom builds a two-slice template): same object, every element."""
    volume, body = _case(tmp_path, ORIENTATIONS[name])
    bundle, labels = _three_structures(volume, body) if structures == 3 else (BUNDLE, body)
    result = Result.of(volume, labels, bundle, ResultUids.for_job("same"), PROV)
    assert len(result.found) == structures
    with caplog.at_level("WARNING", logger="node.write.seg"):
        fast = _save(build_seg(result, seg_type=seg_type))
    assert not caplog.records, "the fast path fell back to highdicom: " + caplog.text
    reference = _save(build_seg_highdicom(result, seg_type=seg_type))
    assert _comparable(fast) == _comparable(reference)


@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP])
@pytest.mark.parametrize("slices", [1, 2, 3, 9])
def test_seg_of_odd_sized_frames_and_short_series(tmp_path: Path, slices: int, seg_type: SegType) -> None:
    """13×11 frames do not fill whole bytes: BINARY bits run on across frame and segment boundaries."""
    series = write_ct_series(tmp_path, slices=slices, rows=13, columns=11, pixel_spacing=(30.0, 30.0),
                             slice_thickness=7.0, noise_hu=0)
    volume = build_volume(read_series(series.files))
    rng = np.random.default_rng(slices)
    labels = rng.integers(0, 4, size=volume.geometry.shape, dtype=np.uint8)
    bundle, _ = _three_structures(volume, labels)
    result = Result.of(volume, labels, bundle, ResultUids.for_job("odd"), PROV)
    fast = _save(build_seg(result, seg_type=seg_type))
    assert _comparable(fast) == _comparable(_save(build_seg_highdicom(result, seg_type=seg_type)))
    parsed = hd.seg.segread(BytesIO(fast))
    back = parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=True)
    assert np.array_equal(back, labels)


@pytest.mark.parametrize("flaw", ["another series", "orientation off by 1e-5"])
def test_seg_refuses_what_highdicom_refuses_for_the_whole_series(tmp_path: Path, flaw: str) -> None:
    """highdicom sees two slices of the series only; its checks of all source images must still hold."""
    volume, labels = _case(tmp_path, ORIENTATIONS["axial"])
    last = volume.headers[-1]
    if flaw == "another series":
        last.SeriesInstanceUID = "1.2.3.4"
    else:
        last.ImageOrientationPatient = [1, 0, 0, 0, 1, 1e-5]  # build_volume tolerates this, highdicom does not
    result = Result.of(volume, labels, BUNDLE, ResultUids.for_job("flaw"), PROV)
    with pytest.raises(WriteError) as reference:
        build_seg_highdicom(result)
    with pytest.raises(WriteError) as fast:
        build_seg(result)
    assert str(fast.value) == str(reference.value)


def test_seg_falls_back_to_highdicom_when_its_template_disagrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    volume, labels = _case(tmp_path, ORIENTATIONS["axial"])
    result = Result.of(volume, labels, BUNDLE, ResultUids.for_job("fallback"), PROV)
    real = seg_module._pixel_data
    # as if highdicom packed differently
    monkeypatch.setattr(seg_module, "_pixel_data", lambda *args: real(*args)[::-1])
    with caplog.at_level("WARNING", logger="node.write.seg"):
        seg = build_seg(result)
    assert "PixelData differs from highdicom's" in caplog.text
    parsed = hd.seg.segread(BytesIO(_save(seg)))
    assert np.array_equal(parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=True), labels)


@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP])
def test_seg_file_written_in_chunks_is_pydicoms_file(tmp_path: Path, seg_type: SegType,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_dataset passes the pixel data to the file as it is, after pydicom's encoding of the rest."""
    volume, labels = _case(tmp_path, ORIENTATIONS["tilted"])
    seg = build_seg(Result.of(volume, labels, BUNDLE, ResultUids.for_job("chunks"), PROV), seg_type=seg_type)
    monkeypatch.setattr(files_module, "DIRECT_PIXEL_BYTES", 0)  # this SEG's frames are small
    chunks = files_module.encode_dataset(seg)
    assert len(chunks) == 3 and chunks[2] is seg.PixelData
    assert b"".join(chunks) == _save(seg)
    files_module.save_dataset(seg, tmp_path / "seg.dcm")
    assert (tmp_path / "seg.dcm").read_bytes() == _save(seg)


def _rasterise(volume: Volume, rt) -> np.ndarray:
    """Fill each contour back into the slice it references (even-odd), by pixel centres."""
    g = volume.geometry
    index = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    out = np.zeros(g.shape, dtype=bool)
    for contour in rt.ROIContourSequence[0].ContourSequence:
        k = index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3) - g.slice_position(k)
        rows = pts @ g.col_dir / g.spacing[1]
        cols = pts @ g.row_dir / g.spacing[2]
        rr, cc = fill_polygon(rows, cols, shape=g.shape[1:])
        layer = np.zeros(g.shape[1:], dtype=bool)
        layer[rr, cc] = True
        out[k] ^= layer
    return out


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_rtstruct_contours_fill_back_to_the_mask(tmp_path: Path, name: str) -> None:
    volume, labels = _case(tmp_path, ORIENTATIONS[name])
    uids = ResultUids.for_job("key")
    rt = build_rtstruct(Result.of(volume, labels, BUNDLE, uids, PROV))
    path = tmp_path / "rt.dcm"
    path.write_bytes(_save(rt))
    rt = dcmread(path)
    filled = _rasterise(volume, rt)
    mask = labels.astype(bool)
    dice = 2 * (filled & mask).sum() / (filled.sum() + mask.sum())
    assert dice > 0.995, dice
    if not tool_missing_reason("dciodvfy"):
        report = dciodvfy(path)
        assert report.ok, report.errors


def test_contours_of_a_ring_include_the_hole_and_follow_pixel_edges() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    mask[15:25, 15:25] = False
    mask[37:39, 37:39] = True  # a small island
    contours = slice_contours_px(mask)
    assert len(contours) == 3
    layer = np.zeros_like(mask)
    for c in contours:
        rr, cc = fill_polygon(c[:, 0], c[:, 1], shape=mask.shape)
        part = np.zeros_like(mask)
        part[rr, cc] = True
        layer ^= part
    assert np.array_equal(layer, mask)
    outer = max(contours, key=len)
    assert outer[:, 0].min() == pytest.approx(4.5, abs=0.01) and outer[:, 0].max() == pytest.approx(34.5, abs=0.01)


def test_uids_are_deterministic_per_job() -> None:
    a = ResultUids.for_job(job_key("1.2.3", "b@1", ["1.1", "1.2"]))
    b = ResultUids.for_job(job_key("1.2.3", "b@1", ["1.2", "1.1"]))
    c = ResultUids.for_job(job_key("1.2.3", "b@2", ["1.1", "1.2"]))
    assert a == b and a != c
    assert len({a.seg_instance, a.seg_series, a.rtstruct_instance, a.rtstruct_series}) == 4


def test_vectorised_tracing_fills_back_exactly_on_random_masks() -> None:
    """Saddles (pixels touching at a corner), holes, islands, masks touching the border."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    stack = np.stack([rng.uniform(size=(24, 31)) > 0.5 for _ in range(20)]
                     + [ndimage.binary_opening(rng.uniform(size=(24, 31)) > 0.4) for _ in range(20)])
    contours = mask_contours_px(stack)
    filled = np.zeros_like(stack)
    for k, rc in contours:
        rr, cc = fill_polygon(rc[:, 0], rc[:, 1], shape=stack.shape[1:])
        part = np.zeros(stack.shape[1:], dtype=bool)
        part[rr, cc] = True
        filled[k] ^= part
    assert np.array_equal(filled, stack)
    assert all(len(rc) >= 3 for _, rc in contours)


def test_contour_data_over_64_kib_switches_to_implicit_vr(tmp_path: Path) -> None:
    """An outline of ~2,800 points exceeds explicit VR's 2-byte DS length (64 KiB)."""
    series = write_ct_series(tmp_path, slices=2, rows=512, columns=512, pixel_spacing=(0.8, 0.8), noise_hu=0)
    volume = build_volume(read_series(series.files))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    theta = np.arctan2(y - 256, x - 256)
    bumps = rng.integers(-3, 4, size=4096)  # a disc with a ragged rim: ~2,800 points in one contour
    ragged = np.hypot(y - 256, x - 256) < 240 + bumps[((theta + np.pi) / (2 * np.pi) * 4095).astype(int)]
    labels = np.zeros(volume.geometry.shape, dtype=np.uint8)
    labels[1] = ragged
    unsmoothed = dataclasses.replace(BUNDLE, contours=ContourOptions(
        ((1, ContourRule(smoothing=ContourSmoothing.NONE)),)))  # smoothing would thin the rim's points
    rt = build_rtstruct(Result.of(volume, labels, unsmoothed, ResultUids.for_job("k"), PROV))
    assert rt.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # Implicit VR Little Endian
    path = tmp_path / "rt.dcm"
    path.write_bytes(_save(rt))
    back = dcmread(path)
    longest = max(len(c[0x30060050].value) if isinstance(c[0x30060050].value, bytes) else
                  sum(len(str(v)) + 1 for v in c.ContourData) for c in back.ROIContourSequence[0].ContourSequence)
    assert longest > 0xFFFE
    assert np.array_equal(_rasterise(volume, back), labels.astype(bool))
    if not tool_missing_reason("dciodvfy"):
        report = dciodvfy(path)
        assert report.ok, report.errors


def test_several_structures_go_into_one_seg_and_one_rtstruct(tmp_path: Path) -> None:
    volume, body = _case(tmp_path, ORIENTATIONS["tilted"])
    bundle, labels = _three_structures(volume, body)
    found = present_labels(labels, bundle)
    assert [label.name for label in found] == ["BODY", "Lung_L", "Spine"]
    uids = ResultUids.for_job("multi")
    seg_path, rt_path = tmp_path / "seg.dcm", tmp_path / "rt.dcm"
    result = Result(volume, labels, bundle, found, uids, PROV)
    seg_path.write_bytes(_save(build_seg(result)))
    rt_path.write_bytes(_save(build_rtstruct(result)))
    parsed = hd.seg.segread(seg_path)
    assert [parsed.get_segment_description(n).segment_label
            for n in parsed.segment_numbers] == ["BODY", "Lung_L", "Spine"]
    assert np.array_equal(parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=True), labels)
    rt = dcmread(rt_path)
    names = {int(r.ROINumber): r.ROIName for r in rt.StructureSetROISequence}
    assert names == {1: "BODY", 2: "Lung_L", 3: "Spine"}
    assert [int(r.ReferencedROINumber) for r in rt.ROIContourSequence] == [1, 2, 3]
    assert {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in rt.RTROIObservationsSequence} == \
        {1: "EXTERNAL", 2: "ORGAN", 3: "ORGAN"}
    if not tool_missing_reason("dciodvfy"):
        for path in (seg_path, rt_path):
            assert dciodvfy(path).ok


@pytest.mark.parametrize("name", ["axial", "tilted"])
def test_overlapping_structures_body_includes_the_lungs(tmp_path: Path, name: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A label that includes others (BODY ⊃ lungs): its SEG segment and its RTSTRUCT contours cover the
    lungs too (no holes in the External), and the fast SEG still equals highdicom's whole build."""
    volume, body = _case(tmp_path, ORIENTATIONS[name])
    bundle, labels = _three_structures(volume, body)
    body_label = dataclasses.replace(bundle.labels[0], includes=(2, 3))
    bundle = dataclasses.replace(bundle, labels=(body_label, *bundle.labels[1:]))
    result = Result.of(volume, labels, bundle, ResultUids.for_job("overlap"), PROV)
    assert result.overlapping and (labels == 2).any()
    whole_body = labels > 0
    assert np.array_equal(result.mask(body_label), whole_body)
    with caplog.at_level("WARNING", logger="node.write.seg"):
        fast = _save(build_seg(result))
    assert not caplog.records, "the fast path fell back to highdicom: " + caplog.text
    assert _comparable(fast) == _comparable(_save(build_seg_highdicom(result)))
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(fast)
    parsed = hd.seg.segread(seg_path)
    planes = parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=False)
    assert np.array_equal(planes[..., 0] > 0, whole_body)
    assert np.array_equal(planes[..., 1] > 0, labels == 2)
    assert np.array_equal(planes[..., 2] > 0, labels == 3)
    rt_path = tmp_path / "rt.dcm"
    rt_path.write_bytes(_save(build_rtstruct(result)))
    filled = _rasterise(volume, dcmread(rt_path))  # ROI 1 = BODY
    dice = 2 * (filled & whole_body).sum() / (filled.sum() + whole_body.sum())
    assert dice > 0.995, dice
    if not tool_missing_reason("dciodvfy"):
        for path in (seg_path, rt_path):
            assert dciodvfy(path).ok


def test_seg_carries_a_labels_type_modifier_and_rtstruct_its_roi_name(tmp_path: Path) -> None:
    """Laterality as TotalSegmentator codes it (Kidney + Left): the modifier sits inside the segment's type item,
    dciodvfy-clean; the RTSTRUCT names the ROI by ``roi_name`` while the SEG keeps ``name``."""
    volume, labels = _case(tmp_path, ORIENTATIONS[sorted(ORIENTATIONS)[0]])
    left = Code("SCT", "7771000", "Left")
    bundle = dataclasses.replace(BUNDLE, labels=(dataclasses.replace(
        BUNDLE.labels[0], name="kidney_left", roi_name="Kidney_L", type=Code("SCT", "64033007", "Kidney"),
        type_modifier=left, rt_roi_type="ORGAN"),))
    uids = ResultUids.for_job(job_key(str(volume.headers[0].SeriesInstanceUID), bundle.id, volume.sop_instance_uids))
    result = Result.of(volume, labels, bundle, uids, PROV)
    path = tmp_path / "seg.dcm"
    path.write_bytes(_save(build_seg(result, seg_type=SegType.BINARY)))
    segment = dcmread(path).SegmentSequence[0]
    assert segment.SegmentLabel == "kidney_left"
    modifier = segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning) == ("7771000", "SCT", "Left")
    assert hd.seg.segread(path).get_segment_description(1).segmented_property_type.value == "64033007"
    if not tool_missing_reason("dciodvfy"):
        report = dciodvfy(path)
        assert report.ok, report.errors
    rtstruct = build_rtstruct(result)
    assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["Kidney_L"]
