"""Tests for the synthetic CT series generator (tests/harness/synthetic_ct.py)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(_REPO_ROOT))

from tests.harness.synthetic_ct import (  # noqa: E402
    HU_AIR,
    HU_TABLE,
    PATIENT_POSITIONS,
    TABLE_GAP_MM,
    SyntheticSeries,
    body_mask_lps,
    phantom_hu,
    phantom_landmarks,
    write_ct_series,
)

SMALL: dict[str, Any] = {"slices": 10, "rows": 128, "columns": 128, "pixel_spacing": (3.2, 3.2)}
CHEST_ORIGIN = (-204.8, -204.8, 0.0)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _rot_x_orientation(degrees: float) -> tuple[float, ...]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (1.0, 0.0, 0.0, 0.0, c, s)


class Volume:
    """A series read back the way a receiver would: sorted by geometry."""

    def __init__(self, files: list[Path]) -> None:
        datasets = [pydicom.dcmread(f) for f in files]
        iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        self.row_dir, self.col_dir = iop[:3], iop[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        datasets.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], self.normal)))
        self.datasets = datasets
        self.ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
        self.ps = tuple(float(v) for v in datasets[0].PixelSpacing)
        self.hu = np.stack(
            [d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
        )

    def pixel_positions(self, k: int) -> np.ndarray:
        """LPS position of every pixel of slice k, shape (rows, columns, 3)."""
        rows, cols = self.hu.shape[1:]
        r = np.arange(rows)[:, None, None]
        c = np.arange(cols)[None, :, None]
        return self.ipp[k] + c * self.ps[1] * self.row_dir + r * self.ps[0] * self.col_dir

    def nearest_hu(self, point: tuple[float, float, float]) -> float:
        p = np.asarray(point, dtype=np.float64)
        dist = (p - self.ipp[0]) @ self.normal
        spacing = float(np.linalg.norm(self.ipp[1] - self.ipp[0])) if len(self.ipp) > 1 else 1.0
        k = int(round(dist / spacing))
        d = p - self.ipp[k]
        r = int(round(float(d @ self.col_dir) / self.ps[0]))
        c = int(round(float(d @ self.row_dir) / self.ps[1]))
        assert 0 <= k < self.hu.shape[0] and 0 <= r < self.hu.shape[1] and 0 <= c < self.hu.shape[2], point
        return float(self.hu[k, r, c])


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSeries:
    return write_ct_series(tmp_path_factory.mktemp("axial"), origin=CHEST_ORIGIN, noise_hu=0.0, **SMALL)


def test_files_are_complete_ct_objects(small_series: SyntheticSeries) -> None:
    assert len(small_series.files) == len(set(small_series.files)) == 10
    assert sorted(small_series.files) == small_series.files
    assert set(small_series.files_in_slice_order) == set(small_series.files)
    assert len(set(small_series.sop_instance_uids)) == 10
    required = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
        "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "PatientPosition",
        "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "InstanceNumber",
        "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SliceLocation",
        "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
        "HighBit", "PixelRepresentation", "PixelData", "ImageType", "RescaleIntercept", "RescaleSlope",
        "RescaleType", "KVP", "AcquisitionNumber", "SOPClassUID", "SOPInstanceUID",
    ]
    for k, path in enumerate(small_series.files_in_slice_order):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_LE
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == small_series.sop_instance_uids[k]
        missing = [name for name in required if name not in ds]
        assert not missing, missing
        assert ds.Modality == "CT"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.StudyInstanceUID == small_series.study_uid
        assert ds.SeriesInstanceUID == small_series.series_uid
        assert ds.FrameOfReferenceUID == small_series.frame_of_reference_uid
        assert int(ds.InstanceNumber) == k + 1
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (128, 128, 16, 0)
        assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
        assert ds.PatientPosition == "HFS"


def test_axial_geometry_and_shuffled_file_order(small_series: SyntheticSeries) -> None:
    vol = Volume(small_series.files)
    # Sorting by geometry recovers slice order.
    assert [d.SOPInstanceUID for d in vol.datasets] == small_series.sop_instance_uids
    np.testing.assert_allclose(vol.normal, [0.0, 0.0, 1.0], atol=1e-12)
    expected = np.array(CHEST_ORIGIN) + np.arange(10)[:, None] * 2.5 * vol.normal
    np.testing.assert_allclose(vol.ipp, expected, atol=1e-6)
    np.testing.assert_allclose(np.diff(vol.ipp @ vol.normal), 2.5, atol=1e-6)
    np.testing.assert_allclose([float(d.SliceLocation) for d in vol.datasets], expected[:, 2], atol=1e-6)
    assert all(float(d.SliceThickness) == 2.5 for d in vol.datasets)
    assert vol.ps == (3.2, 3.2)
    np.testing.assert_allclose(small_series.image_positions, expected, atol=1e-9)
    # File-name order must not be slice order (receivers must sort by geometry).
    by_name = [pydicom.dcmread(f).SOPInstanceUID for f in sorted(small_series.directory.iterdir())]
    assert by_name != small_series.sop_instance_uids
    assert sorted(by_name) == sorted(small_series.sop_instance_uids)


def test_unshuffled_files_follow_slice_order(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, shuffle_files=False, slices=4, rows=32, columns=32)
    assert series.files == series.files_in_slice_order


def test_dciodvfy_reports_no_errors(small_series: SyntheticSeries, tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    tilted = write_ct_series(tmp_path, orientation=_rot_x_orientation(17.0), slices=2, rows=32, columns=32)
    for path in (small_series.files[0], tilted.files[-1]):
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        errors = [line for line in report.splitlines() if line.lstrip().startswith("Error")]
        assert not errors, report
        assert "CTImage" in report, report


def test_pixels_match_analytic_phantom(small_series: SyntheticSeries) -> None:
    vol = Volume(small_series.files)
    for k in (0, 5, 9):
        truth = phantom_hu(vol.pixel_positions(k))
        np.testing.assert_array_equal(vol.hu[k], np.rint(truth))
    landmarks = phantom_landmarks(11.25)
    assert {"air", "soft_tissue", "fat", "lung_left", "lung_right", "spine", "canal", "table"} <= set(landmarks)
    for name, (point, expected_hu) in landmarks.items():
        assert float(phantom_hu(np.array(point))) == expected_hu, name
        assert vol.nearest_hu(point) == expected_hu, name
    # Table present below the body, and not part of the ground-truth body.
    table_point = np.array(landmarks["table"][0])
    assert not body_mask_lps(table_point)
    assert body_mask_lps(np.array(landmarks["spine"][0]))


def test_noise_level_and_determinism(tmp_path: Path) -> None:
    kwargs = dict(SMALL, slices=3, origin=CHEST_ORIGIN)
    a = write_ct_series(tmp_path / "a", seed=7, **kwargs)
    b = write_ct_series(tmp_path / "b", seed=7, **kwargs)
    c = write_ct_series(tmp_path / "c", seed=8, **kwargs)
    assert (a.study_uid, a.series_uid, a.sop_instance_uids) == (b.study_uid, b.series_uid, b.sop_instance_uids)
    assert a.study_uid != c.study_uid and a.series_uid != c.series_uid
    assert not set(a.sop_instance_uids) & set(c.sop_instance_uids)
    for fa, fb in zip(a.files, b.files, strict=True):
        assert pydicom.dcmread(fa).PixelData == pydicom.dcmread(fb).PixelData
    vol = Volume(a.files)
    truth = phantom_hu(vol.pixel_positions(1))
    residual = (vol.hu[1] - truth)[(truth > -900) & (truth < 500)]
    assert 7.0 < residual.std() < 13.0
    assert abs(residual.mean()) < 1.0
    # Same seed, other geometry: same study and frame of reference, new series.
    d = write_ct_series(tmp_path / "d", seed=7, **dict(kwargs, orientation=_rot_x_orientation(17.0)))
    assert (d.study_uid, d.frame_of_reference_uid) == (a.study_uid, a.frame_of_reference_uid)
    assert d.series_uid != a.series_uid


def test_tilted_orientation_geometry_and_anatomy(tmp_path: Path) -> None:
    angle = 17.0
    series = write_ct_series(
        tmp_path, orientation=_rot_x_orientation(angle), origin=CHEST_ORIGIN, noise_hu=0.0, **dict(SMALL, slices=24)
    )
    vol = Volume(series.files)
    assert [d.SOPInstanceUID for d in vol.datasets] == series.sop_instance_uids
    s, c = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    np.testing.assert_allclose(vol.normal, [0.0, -s, c], atol=1e-9)
    np.testing.assert_allclose(series.normal, vol.normal, atol=1e-12)
    steps = np.diff(vol.ipp, axis=0)
    np.testing.assert_allclose(steps, np.tile(2.5 * vol.normal, (23, 1)), atol=1e-6)
    np.testing.assert_allclose(steps @ vol.row_dir, 0.0, atol=1e-6)
    np.testing.assert_allclose(steps @ vol.col_dir, 0.0, atol=1e-6)
    np.testing.assert_allclose(vol.ipp[0], CHEST_ORIGIN, atol=1e-9)
    # Pixel content is the phantom sampled at each pixel's patient position.
    for k in (0, 11, 23):
        np.testing.assert_array_equal(vol.hu[k], np.rint(phantom_hu(vol.pixel_positions(k))))
    # The same anatomy appears where the analytic phantom says: put each landmark in the
    # middle of the tilted slab (its height is re-solved so that it lies on the mid plane).
    mid = float(vol.ipp[0] @ vol.normal) + 0.5 * 23 * 2.5
    names = phantom_landmarks(20.0).keys()
    checked = 0
    for name in names:
        z = 20.0
        for _ in range(20):
            entry = phantom_landmarks(z).get(name)
            if entry is None:
                break
            (x, y, _z), _hu = entry
            z = (mid - vol.normal[1] * y) / vol.normal[2]
        if entry is None:
            continue
        point, expected_hu = entry
        if abs((np.asarray(point) - vol.ipp[0]) @ vol.normal - 0.5 * 23 * 2.5) > 25.0:
            continue  # e.g. the spine landmark snaps to a vertebra centre outside the slab
        assert vol.nearest_hu(point) == expected_hu, name
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize(
    ("orientation", "origin"),
    [
        ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (30.0, -204.8, 200.0)),  # sagittal
        ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), (-204.8, 0.0, 200.0)),  # coronal
        ((0.96, 0.28, 0.0, -0.2352, 0.8064, 0.5424), (-150.0, -180.0, -20.0)),  # double oblique
    ],
)
def test_other_orientations_sample_the_same_phantom(
    tmp_path: Path, orientation: tuple[float, ...], origin: tuple[float, float, float]
) -> None:
    series = write_ct_series(
        tmp_path, orientation=orientation, origin=origin, noise_hu=0.0,
        slices=4, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_thickness=3.0,
    )
    vol = Volume(series.files)
    assert [d.SOPInstanceUID for d in vol.datasets] == series.sop_instance_uids
    np.testing.assert_allclose(np.diff(vol.ipp, axis=0), np.tile(3.0 * vol.normal, (3, 1)), atol=1e-6)
    for k in range(4):
        np.testing.assert_array_equal(vol.hu[k], np.rint(phantom_hu(vol.pixel_positions(k))))
    assert (vol.hu > 0).any() and (vol.hu == HU_AIR).any()


@pytest.mark.parametrize("patient_position", sorted(PATIENT_POSITIONS))
def test_table_is_separated_from_body(patient_position: str) -> None:
    step = 0.5
    axis = np.arange(-230.0, 230.0, step)
    for z in (-100.0, 0.0, 60.0, 150.0, 260.0, 400.0):
        yy, xx = np.meshgrid(axis, axis, indexing="ij")
        pts = np.stack([xx, yy, np.full_like(xx, z)], axis=-1)
        hu = phantom_hu(pts, patient_position=patient_position)
        body = body_mask_lps(pts)
        table = hu == HU_TABLE
        assert table.any() and body.any()
        assert not (table & body).any()
        np.testing.assert_array_equal(body, (hu != HU_AIR) & ~table)
        gap = ndimage.distance_transform_edt(~body) * step
        assert gap[table].min() >= TABLE_GAP_MM - step
        for name, (point, expected_hu) in phantom_landmarks(z, patient_position=patient_position).items():
            assert float(phantom_hu(np.array(point), patient_position=patient_position)) == expected_hu, name


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_ct_series(tmp_path, orientation=(1, 0, 0, 0.5, 1, 0), slices=1, rows=8, columns=8)
    with pytest.raises(ValueError):
        write_ct_series(tmp_path, patient_position="XYZ", slices=1, rows=8, columns=8)
    with pytest.raises(ValueError):
        phantom_hu(np.zeros((4, 2)))


def test_benchmark_size_series_write_time(tmp_path: Path) -> None:
    start = time.perf_counter()
    series = write_ct_series(tmp_path, slices=300)
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in series.files)
    print(f"\nwrite_ct_series(slices=300, 512x512): {elapsed:.2f} s, {size / 2**20:.0f} MiB")
    assert len(series.files) == 300
    ds = pydicom.dcmread(series.files_in_slice_order[-1], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns, int(ds.InstanceNumber)) == (512, 512, 300)
