"""PixelMed's validator on what we write (a second opinion beside dciodvfy).

What it says, for the record: on our SEG one error, "GeneralSeriesModule/Laterality/: Missing
conditional attribute". PixelMed requires Laterality whenever Image/Frame Laterality is absent; the
standard requires it only for paired body parts (PS3.3 C.7.3.1), and dciodvfy warns when it is
present but empty on an unpaired part. We follow the standard: Laterality is copied from the source
when it has one. RT Structure Set is an IOD PixelMed's validator does not know ("IOD (SOP Class)
unrecognized").
"""

from __future__ import annotations

import datetime as dt
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from node.assemble.volume import build_volume, read_series
from node.infer.manifest import discover_bundles
from node.write.provenance import Provenance
from node.write.result import Result, present_labels
from node.write.rtstruct import build_rtstruct
from node.write.seg import build_seg
from node.write.uids import ResultUids
from tests.harness.pixelmed import pixelmed_missing_reason, validate
from tests.harness.synthetic_ct import write_ct_series

KNOWN_FALSE_POSITIVES = {"Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if reason := pixelmed_missing_reason():
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("pixelmed")
    series = write_ct_series(tmp / "ct", slices=8, rows=64, columns=64, pixel_spacing=(6.4, 6.4))
    volume = build_volume(read_series(series.files))
    bundle = discover_bundles(Path(__file__).resolve().parents[2] / "engines", ("body-threshold",))[0]
    labels = (volume.voxels > -300).astype(np.uint8)
    found = present_labels(labels, bundle)
    prov = Provenance(created=dt.datetime(2026, 1, 1))
    out = {}
    result = Result(volume, labels, bundle, found, ResultUids.for_job("p"), prov)
    for kind, ds in (("SEG", build_seg(result)), ("RTSTRUCT", build_rtstruct(result))):
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out[kind] = tmp / f"{kind}.dcm"
        out[kind].write_bytes(buffer.getvalue())
    return out


def test_pixelmed_on_seg(written: dict[str, Path]) -> None:
    report = validate(written["SEG"])
    print(report.raw)
    assert report.recognised and "Found Segmentation IOD" in report.raw
    assert set(report.errors) <= KNOWN_FALSE_POSITIVES, report.errors


def test_pixelmed_on_rtstruct(written: dict[str, Path]) -> None:
    report = validate(written["RTSTRUCT"])
    print(report.raw)
    assert not report.recognised or not report.errors, report.errors
