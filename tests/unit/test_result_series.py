"""Result series say which source series they came from (issue 16, item 7): SeriesNumber from the source's
number, the bundle and the kind; a SeriesDescription naming the source; the same on every resend,
distinct for two source series of one study; the SEG carries ContentCreatorName; both stay dciodvfy-clean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from node.assemble.volume import build_volume, read_series
from node.model.enums import ObjectKind
from node.model.volume import Volume
from node.write.files import write_preview, write_results
from node.write.result import Result
from node.write.series import FALLBACK_BASE, MAX_DESCRIPTION, bundle_slot, result_series
from node.write.uids import ResultUids, job_key
from tests.harness.dcmtk import dciodvfy, tool_missing_reason
from tests.harness.synthetic_ct import write_ct_series
from tests.harness.writing import BUNDLE, PROV


def _source(number: object = None, description: str | None = None, uid: str = "1.2.3.4") -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = uid
    if number is not None:  # as read from a file: converted to IS only when it is used
        ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", len(str(number)), str(number).encode(), 0, True, True)
    if description is not None:
        ds.SeriesDescription = description
    return ds


def test_numbers_come_from_the_source_series_the_bundle_and_the_kind() -> None:
    assert (bundle_slot("body-lungs"), bundle_slot("liver")) == (6, 48)
    numbers = {(n, b, k): result_series(_source(n, "Thorax"), b, k).number
               for n in (2, 3) for b in ("body-lungs", "liver") for k in ObjectKind}
    assert numbers[(2, "body-lungs", ObjectKind.SEG)] == 2061
    assert numbers[(2, "body-lungs", ObjectKind.RTSTRUCT)] == 2062
    assert numbers[(2, "body-lungs", ObjectKind.SC)] == 2063
    assert numbers[(3, "liver", ObjectKind.SEG)] == 3481
    assert len(set(numbers.values())) == len(numbers)  # distinct across series, bundles and kinds
    again = {(n, b, k): result_series(_source(n, "Thorax"), b, k).number for n, b, k in numbers}
    assert again == numbers  # the same on every resend


def test_descriptions_name_the_source_within_64_plain_characters() -> None:
    seg = result_series(_source(2, "Thorax 1.0 B31f"), "body-lungs", ObjectKind.SEG)
    assert seg.description == "AI SEG body-lungs of 2 Thorax 1.0 B31f"
    rt = result_series(_source("7", "Abdomen"), "liver", ObjectKind.RTSTRUCT)
    assert rt.description == "AI RTSTRUCT liver of 7 Abdomen"
    long = result_series(_source(12, "Thorax Lungenfenster Spätphase\\Kontrast " * 4), "body-lungs", ObjectKind.SC)
    assert len(long.description) <= MAX_DESCRIPTION and long.description.isascii() and "\\" not in long.description
    assert long.description == "AI preview body-lungs of 12 Thorax Lungenfen (not for diagnosis)"
    accented = result_series(_source(5, "Spätphase\\Kontrast"), "liver", ObjectKind.SEG)
    assert accented.description == "AI SEG liver of 5 Spatphase Kontrast"


@pytest.mark.parametrize("number", [None, "", -4, 3_000_000, "abc"])
def test_a_source_without_a_usable_number_falls_back_on_its_uid(number: object) -> None:
    a = result_series(_source(number, "Head", uid="1.2.3.4.5"), "body-lungs", ObjectKind.SEG)
    b = result_series(_source(number, "Head", uid="1.2.3.4.6"), "body-lungs", ObjectKind.SEG)
    assert FALLBACK_BASE * 1000 <= a.number < 2**31 and FALLBACK_BASE * 1000 <= b.number < 2**31
    assert a.number != b.number and a.number % 10 == 1
    assert a == result_series(_source(number, "Head", uid="1.2.3.4.5"), "body-lungs", ObjectKind.SEG)
    assert a.description == "AI SEG body-lungs of Head"
    bare = result_series(_source(None, None, uid="1.2.840.99.12345678901234"), "liver", ObjectKind.SEG)
    assert bare.description == "AI SEG liver of series ...345678901234"


def _two_series_of_one_study(tmp_path: Path) -> list[Volume]:
    first = write_ct_series(tmp_path / "a", slices=6, rows=64, columns=64, pixel_spacing=(6.4, 6.4),
                            slice_thickness=5.0, origin=(-204.8, -204.8, 0.0), noise_hu=0)
    second_dir = tmp_path / "b"
    second_dir.mkdir()
    series_uid = generate_uid()
    for n, path in enumerate(first.files):
        ds = dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 3, "Thorax lung window"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(second_dir / f"{n}.dcm")
    return [build_volume(read_series(first.files)), build_volume(read_series(sorted(second_dir.iterdir())))]


def test_two_source_series_of_a_study_get_distinct_valid_result_series(tmp_path: Path) -> None:
    seen: dict[str, tuple[int, str]] = {}
    for n, volume in enumerate(_two_series_of_one_study(tmp_path)):
        labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
        labels[:, 16:48, 12:52] = 1
        source = volume.headers[0]
        uids = ResultUids.for_job(job_key(str(source.SeriesInstanceUID), BUNDLE.id, volume.sop_instance_uids))
        result = Result.of(volume, labels, BUNDLE, uids, PROV)
        objects = write_results(result, tmp_path / f"out{n}")
        objects += write_preview(result, tmp_path / f"out{n}", png=False, secondary_capture=True)
        for obj in objects:
            ds = dcmread(obj.path)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            seen[f"{source.SeriesNumber} {obj.kind}"] = (int(ds.SeriesNumber), str(ds.SeriesDescription))
            if obj.kind == "SEG":
                assert str(ds.ContentCreatorName) == "SEGNODE^"
            if not tool_missing_reason("dciodvfy"):
                report = dciodvfy(obj.path)
                assert report.ok, report.errors
                assert not [w for w in report.warnings if "ContentCreatorName" in w], report.warnings
    slot = bundle_slot(BUNDLE.name)
    assert seen == {
        "2 SEG": (2001 + 10 * slot, f"AI SEG {BUNDLE.name} of 2 Phantom 5mm"),
        "2 RTSTRUCT": (2002 + 10 * slot, f"AI RTSTRUCT {BUNDLE.name} of 2 Phantom 5mm"),
        "2 PREVIEW": (2003 + 10 * slot, f"AI preview {BUNDLE.name} of 2 Phantom 5mm (not for diagnosis)"),
        "3 SEG": (3001 + 10 * slot, f"AI SEG {BUNDLE.name} of 3 Thorax lung window"),
        "3 RTSTRUCT": (3002 + 10 * slot, f"AI RTSTRUCT {BUNDLE.name} of 3 Thorax lung window"),
        "3 PREVIEW": (3003 + 10 * slot, f"AI preview {BUNDLE.name} of 3 Thorax lung w (not for diagnosis)"),  # 64
    }
