"""Two CT series of one study pushed to the node (DCMTK storescu → node → storescp): each result series
is numbered and described after its own source series, and each job's record (``status --json``) carries
the RTSTRUCT's contour check (issue 16, items 1 and 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.write.series import bundle_slot
from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.result_checks import assert_dciodvfy_clean
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration


def _two_done(status: dict[str, Any]) -> bool:
    jobs = status.get("jobs", [])
    return len(jobs) == 2 and all(j["state"] in ("done", "declined", "failed") for j in jobs)


def test_each_source_series_gets_its_own_result_series_and_a_contour_check(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp", "dciodvfy"):
        pytest.skip(reason)
    first = write_ct_series(tmp_path / "ct2", slices=20, rows=192, columns=192, pixel_spacing=(2.2, 2.2),
                            slice_thickness=5.0, origin=(-211.2, -211.2, -20.0), noise_hu=0)
    second = tmp_path / "ct3"
    second.mkdir()
    series_uid = generate_uid()
    for n, path in enumerate(first.files):  # the same study, a second series: "3 Lung window"
        ds = dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 3, "Lung window"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(second / f"{n}.dcm")
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], bundles=("body-lungs",)
    ) as node:
        storescu("127.0.0.1", node.port, node.ae_title, first.directory)
        storescu("127.0.0.1", node.port, node.ae_title, second)
        status = node.wait_status(_two_done, timeout=300, interval=2.0)
        assert [j["state"] for j in status["jobs"]] == ["done", "done"], status["jobs"]
        for job in status["jobs"]:
            note = job["note"]
            assert "contours: BODY " in note and "Lung_L " in note, note
            body = next(p for p in note.split("contours: ", 1)[1].split("; ") if p.startswith("BODY "))
            assert body.endswith(", 0 holes, 0 tiny"), note
        files = pacs.wait_for_files(4, timeout=120)
    slot = bundle_slot("body-lungs")
    found = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == first.study_uid
        found.add((int(ds.SeriesNumber), str(ds.SeriesDescription)))
        if ds.Modality == "SEG":
            assert str(ds.ContentCreatorName) == "SEGNODE^"
        assert_dciodvfy_clean(path)
    described = str(dcmread(first.files[0], stop_before_pixels=True).SeriesDescription)
    assert found == {
        (2001 + 10 * slot, f"AI SEG body-lungs of 2 {described}"),
        (2002 + 10 * slot, f"AI RTSTRUCT body-lungs of 2 {described}"),
        (3001 + 10 * slot, "AI SEG body-lungs of 3 Lung window"),
        (3002 + 10 * slot, "AI RTSTRUCT body-lungs of 3 Lung window"),
    }
