"""Series → volume: geometry from the headers, decoders for real transfer syntaxes, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.assemble.volume import build_volume, read_series
from node.errors import Declined, VolumeError
from node.model.volume import MixedFrames
from tests.harness.synthetic_ct import phantom_hu, write_ct_series

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TS = SHARED / "transfer-syntaxes"


def test_slices_sorted_by_geometry_not_file_order(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, slices=12, rows=64, columns=64, pixel_spacing=(4.0, 4.0), noise_hu=0)
    volume = build_volume(read_series(series.files))
    assert volume.sop_instance_uids == series.sop_instance_uids
    assert volume.geometry.spacing == pytest.approx((2.5, 4.0, 4.0))
    # Voxel values equal the analytic phantom at each voxel's patient position.
    k, i, j = np.meshgrid(np.arange(12), np.arange(64), np.arange(64), indexing="ij")
    points = volume.geometry.to_patient(np.stack([k, i, j], axis=-1))
    assert np.abs(volume.voxels - np.round(phantom_hu(points))).max() <= 1.0


def test_tilted_series_geometry(tmp_path: Path) -> None:
    a = np.deg2rad(17)
    series = write_ct_series(tmp_path, slices=8, rows=64, columns=64, pixel_spacing=(4.0, 4.0),
                             orientation=(1, 0, 0, 0, np.cos(a), -np.sin(a)), noise_hu=0)
    volume = build_volume(read_series(series.files))
    assert volume.sop_instance_uids == series.sop_instance_uids
    assert np.allclose(volume.geometry.normal, series.normal, atol=1e-6)
    points = volume.geometry.to_patient(np.array([[k, 32, 32] for k in range(8)]))
    assert np.allclose(points[0], volume.headers[0].ImagePositionPatient + 32 * 4.0 * np.array(series.row_direction)
                       + 32 * 4.0 * np.array(series.column_direction), atol=1e-3)
    k, i, j = np.meshgrid(np.arange(8), np.arange(64), np.arange(64), indexing="ij")
    grid = volume.geometry.to_patient(np.stack([k, i, j], axis=-1))
    assert np.abs(volume.voxels - np.round(phantom_hu(grid))).max() <= 1.0


def _series(tmp_path: Path, n: int = 6):
    s = write_ct_series(tmp_path, slices=n, rows=32, columns=32, pixel_spacing=(8.0, 8.0))
    return [dcmread(f) for f in s.files_in_slice_order]


def test_duplicate_position_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    datasets[3].ImagePositionPatient = datasets[2].ImagePositionPatient
    with pytest.raises(VolumeError, match="share the position"):
        build_volume(datasets)


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    del datasets[3]
    with pytest.raises(VolumeError, match="slices are missing"):
        build_volume(datasets)


def test_mixed_orientation_and_size_are_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0.9, -0.43589]
    with pytest.raises(VolumeError, match="mixes orientations"):
        build_volume(datasets)
    datasets = _series(tmp_path / "b")
    datasets[2].Rows = 16
    with pytest.raises(VolumeError, match="mixes image sizes"):
        build_volume(datasets)


def test_missing_position_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    del datasets[0].ImagePositionPatient
    with pytest.raises(VolumeError, match="no valid ImagePositionPatient"):
        build_volume(datasets)


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
@pytest.mark.parametrize(
    "name",
    [
        "CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm",
        "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
        "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm",
        "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
        "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
        "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
        "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
        "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_hu(name: str) -> None:
    reference = build_volume(
        read_series([TS / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"]))
    volume = build_volume(read_series([TS / name]))
    assert np.array_equal(volume.voxels, reference.voxels)


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_no_pixel_spacing_is_a_clear_error() -> None:
    with pytest.raises(VolumeError, match="no valid (ImageOrientationPatient|PixelSpacing)"):
        build_volume(read_series([TS / "no-pixel-spacing.dcm"]))


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
def test_enhanced_multiframe_is_a_clear_error() -> None:
    with pytest.raises(VolumeError, match="multi-frame"):
        build_volume(read_series([TS / "eCT_Supplemental.dcm"]))


def test_gantry_tilt_sheared_stack_keeps_each_slice_position(tmp_path: Path) -> None:
    """Gantry tilt: image planes tilted, table steps along z; each slice keeps its own position."""
    a = np.deg2rad(17)
    s = write_ct_series(tmp_path, slices=6, rows=32, columns=32, pixel_spacing=(8.0, 8.0),
                        orientation=(1, 0, 0, 0, np.cos(a), -np.sin(a)))
    datasets = [dcmread(f) for f in s.files_in_slice_order]
    ipp0 = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp0 + [0, 0, 3.0 * k]]
    volume = build_volume(list(reversed(datasets)))
    g = volume.geometry
    assert g.is_sheared
    assert g.spacing[0] == pytest.approx(3.0 * np.cos(a), abs=1e-3)  # distance between the tilted planes
    for k, ds in enumerate(datasets):
        assert np.allclose(g.slice_position(k), [float(v) for v in ds.ImagePositionPatient], atol=1e-3)


def test_irregular_stack_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    ipp = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [ipp[0] + 20.0, ipp[1], ipp[2]]
    with pytest.raises(VolumeError, match="do not form a regular stack"):
        build_volume(datasets)


def test_absurd_image_size_is_refused_before_allocating(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    for ds in datasets:
        ds.Rows = ds.Columns = 65535  # a header that lies: 6 × 65535² voxels would be ~96 GiB
    with pytest.raises(VolumeError, match="the node handles at most"):
        build_volume(datasets)


def test_implausible_extent_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    for ds in datasets:
        ds.PixelSpacing = [1000.0, 1000.0]  # 32 columns × 1 m: resampling would need ~21,000² voxels
    with pytest.raises(VolumeError, match="more than 3000 mm"):
        build_volume(datasets)


# ------------------------------------------------------------------ bad input: every refusal names what is wrong
def _raw(ds, keyword: str, vr: str, value: bytes) -> None:
    """Put ``value`` under ``keyword`` as a not yet decoded element with ``vr`` (as a reader would find it)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    number = tag_for_keyword(keyword)
    assert number is not None, f"{keyword} is not a DICOM keyword"
    tag = Tag(number)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


@pytest.mark.parametrize(
    ("keyword", "vr", "value", "needle"),
    [
        ("ImagePositionPatient", "DS", b"0\\0\\nan ", "ImagePositionPatient that is not finite"),
        ("ImageOrientationPatient", "DS", b"1\\0\\0\\0\\inf\\0 ", "ImageOrientationPatient that is not finite"),
        ("PixelSpacing", "DS", b"6.0 ", r"no valid PixelSpacing \(got \['6.0'\]: 1 values, 2 needed\)"),
        ("PixelSpacing", "DS", b"six\\six ", "non-numeric PixelSpacing"),
        ("RescaleSlope", "US", b"1 ", "RescaleSlope with VR US where DICOM defines DS"),
        ("RescaleIntercept", "DS", b"abc ", "non-numeric RescaleIntercept"),
        ("Rows", "DS", b"32", "Rows with VR DS where DICOM defines US"),
        ("NumberOfFrames", "IS", b"x2", "non-numeric NumberOfFrames"),
        ("BitsAllocated", "DS", b"16", "BitsAllocated with VR DS"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's own warning about the same value
def test_unreadable_attribute_is_named(tmp_path: Path, keyword: str, vr: str, value: bytes, needle: str) -> None:
    datasets = _series(tmp_path)
    _raw(datasets[2], keyword, vr, value)
    with pytest.raises(VolumeError, match=needle):
        build_volume(datasets)


@pytest.mark.parametrize(
    ("iop", "needle"),
    [
        ([0, 0, 0, 0, 0, 0], "row direction has length 0.000"),
        ([1, 0, 0, 1, 0, 0], "not orthogonal .cosine 1.000, parallel"),
        ([1, 0, 0, 0.5, 0.866, 0], "not orthogonal"),
        ([2, 0, 0, 0, 2, 0], "length 2.000"),
    ],
)
def test_broken_orientation_is_refused(tmp_path: Path, iop: list[float], needle: str) -> None:
    datasets = _series(tmp_path)
    for ds in datasets:
        ds.ImageOrientationPatient = iop
    with pytest.raises(VolumeError, match=needle):
        build_volume(datasets)


def test_rescale_slope_zero_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    datasets[4].RescaleSlope = 0
    with pytest.raises(VolumeError, match="RescaleSlope 0: every voxel would be the intercept"):
        build_volume(datasets)


def test_mixed_patients_are_refused_counting_not_naming_them(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    first = str(datasets[0].PatientID)
    for ds in datasets[4:]:
        ds.PatientID = "PID-OTHER-77"
    with pytest.raises(VolumeError, match=r"mixes PatientID 2 different values \(4 and 2 instances\)") as caught:
        build_volume(datasets)
    assert first not in str(caught.value) and "PID-OTHER-77" not in str(caught.value)  # no patient data in errors


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "Modality"])
def test_mixed_series_is_refused_naming_the_values(tmp_path: Path, keyword: str) -> None:
    datasets = _series(tmp_path)
    first = str(datasets[0].get(keyword))
    for ds in datasets[4:]:
        setattr(ds, keyword, "1.2.3.4" if keyword.endswith("UID") else "OTHER")
    other = "1.2.3.4" if keyword.endswith("UID") else "OTHER"
    with pytest.raises(VolumeError,
                       match=rf"mixes {keyword} values '{first}' \(4 instances\), '{other}' \(2 instances\)"):
        build_volume(datasets)


def test_mixed_frames_of_reference_in_a_regular_stack_take_the_majority(tmp_path: Path) -> None:
    """Several FrameOfReferenceUIDs in one regular stack (issue 16, item 3): one is chosen by the stated
    rule, every header carries it, the volume's notes say which and why; "decline" declines instead."""
    datasets = _series(tmp_path)
    first = str(datasets[0].FrameOfReferenceUID)
    for ds in datasets[4:]:
        ds.FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(Declined, match=r"carry 2 different FrameOfReferenceUID values .*\"decline\""):
        build_volume(datasets, mixed_frames=MixedFrames.DECLINE)
    volume = build_volume(datasets)
    assert {str(h.FrameOfReferenceUID) for h in volume.headers} == {first}
    assert len(volume.notes) == 1 and f"{first}, the one most instances carry (4 of 6)" in volume.notes[0]


def test_every_instance_its_own_frame_of_reference_takes_the_first_slice(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    for k, ds in enumerate(datasets):
        ds.FrameOfReferenceUID = f"1.2.3.{k + 10}"
    shuffled = [datasets[i] for i in (3, 5, 0, 2, 4, 1)]  # arrival order does not decide
    volume = build_volume(shuffled)
    assert {str(h.FrameOfReferenceUID) for h in volume.headers} == {"1.2.3.10"}
    assert "the first slice's along the normal" in volume.notes[0]


def test_mixed_frames_of_reference_in_an_uneven_stack_are_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    z = float(datasets[0].ImagePositionPatient[2])
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z + (2.5 * k if k < 3 else 5.0 + 4.0 * (k - 2))]
        ds.FrameOfReferenceUID = f"1.2.3.{k + 10}"
    with pytest.raises(VolumeError, match="mixes FrameOfReferenceUID values .* not evenly spaced"):
        build_volume(datasets)


def test_series_without_frame_of_reference_is_refused(tmp_path: Path) -> None:
    datasets = _series(tmp_path)
    for ds in datasets:
        del ds.FrameOfReferenceUID
    with pytest.raises(VolumeError, match="no FrameOfReferenceUID"):
        build_volume(datasets)


def test_lossy_compression_is_refused_before_decoding(tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSNearLossless

    datasets = _series(tmp_path)
    datasets[1].compress(JPEGLSNearLossless, jls_error=2, generate_instance_uid=False)
    with pytest.raises(VolumeError,
                       match=r"lossy-compressed \(transfer syntax 1.2.840.10008.1.2.4.81 \(JPEG-LS near-lossless\)\)"):
        build_volume(datasets)
    datasets = _series(tmp_path / "b")
    datasets[2].LossyImageCompression = "01"
    with pytest.raises(VolumeError, match="LossyImageCompression 01"):
        build_volume(datasets)
    # JPEG 2000 (.91) may be lossless or lossy: only LossyImageCompression 00 says which
    reference = build_volume(_series(tmp_path / "c"))
    datasets = _series(tmp_path / "c")
    for ds in datasets:  # a lossless codestream under the lossy-or-lossless syntax, as some senders do
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = JPEG2000
    with pytest.raises(VolumeError, match="lossy unless LossyImageCompression is 00; it is absent"):
        build_volume(datasets)
    for ds in datasets:
        ds.LossyImageCompression = "00"
    assert np.array_equal(build_volume(datasets).voxels, reference.voxels)


@pytest.mark.skipif(not TS.is_dir(), reason=f"real transfer-syntax samples not found at {TS}")
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                                    "1.2.840.10008.1.2.4.91"])
def test_real_lossy_ct_is_refused(syntax: str) -> None:
    path = next(TS.glob(f"CTImage.dcm_*_{syntax}.dcm"))
    with pytest.raises(VolumeError, match=f"lossy-compressed \\(transfer syntax {syntax}"):
        build_volume(read_series([path]))
