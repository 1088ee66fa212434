"""Issue 16, items 3 and 4, through the running node: DCMTK's storescu pushes two quirky copies of a real
head CT (``../shared/data/ct/philips-head-5mm``, made in tmp_path) and DCMTK's storescp receives the results.

- one FrameOfReferenceUID per instance (de-identified research data): BODY is segmented; the SEG and the
  RTSTRUCT (its FrameOfReferenceUID, ReferencedFrameOfReferenceSequence and every ROI's reference) carry
  the one chosen by the stated rule, and the job's note says which and why;
- uneven slices (13 gaps of 4 mm, one of 1.08 mm, 13 of 7 mm: a GE head protocol): BODY is segmented,
  every SEG frame and RTSTRUCT contour on its own slice's real position; the liver declines, naming the gaps.

Both once failed every job. Every result passes dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.quirks import per_instance_frames, read_in_slice_order, uneven_stack, write_series
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, assert_dciodvfy_clean

pytestmark = pytest.mark.integration

HEAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct" / "philips-head-5mm" / "S2010"


@pytest.fixture(autouse=True)
def _tools() -> None:
    reason = tool_missing_reason("storescu", "storescp", "dciodvfy")
    if reason:
        pytest.skip(reason)


@pytest.mark.skipif(not HEAD.is_dir(), reason=f"real CT data not found at {HEAD}")
def test_quirky_real_series_are_segmented_through_the_node(tmp_path: Path) -> None:
    framed = read_in_slice_order(HEAD)
    frames = per_instance_frames(framed)
    framed_files = write_series(framed, tmp_path / "frames", new_series="issue16-frames")
    framed_series = str(framed[0].SeriesInstanceUID)
    stacked = read_in_slice_order(HEAD)
    positions = uneven_stack(stacked)
    uneven_files = write_series(stacked, tmp_path / "uneven", new_series="issue16-uneven")
    uneven_series = str(stacked[0].SeriesInstanceUID)
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(stacked)}

    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], bundles=("body-lungs", "liver")
    ) as node:
        storescu("127.0.0.1", node.port, node.ae_title, framed_files + uneven_files)
        files = pacs.wait_for_files(4, timeout=240)
        status = node.wait_status(lambda s: len(s.get("jobs", [])) == 4 and all(
            j["state"] in ("done", "declined", "failed") for j in s["jobs"]), timeout=240)
        log = node.log_text()

    jobs = {(j["series_uid"], j["bundle"].split("@")[0]): j for j in status["jobs"]}
    assert {k: j["state"] for k, j in jobs.items()} == {
        (framed_series, "body-lungs"): "done", (framed_series, "liver"): "declined",
        (uneven_series, "body-lungs"): "done", (uneven_series, "liver"): "declined"}, jobs
    chosen = frames[0]  # each instance its own: the first slice's along the normal
    assert f"one frame of reference, {chosen}, the first slice's along the normal" in \
        jobs[(framed_series, "body-lungs")]["note"]
    assert chosen in log
    assert "gaps of up to 7.00 mm (13 gaps of 4.0 mm, 13 of 7.0 mm, 1 of 1.08 mm)" in \
        jobs[(uneven_series, "liver")]["error"]

    results: dict[tuple[str, str], Path] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        source = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) if ds.SOPClassUID == SEG_CLASS else str(
            ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0].SeriesInstanceUID)
        results[(source, str(ds.SOPClassUID))] = f
        assert_dciodvfy_clean(f)
    assert set(results) == {(s, c) for s in (framed_series, uneven_series) for c in (SEG_CLASS, RTSTRUCT_CLASS)}

    seg = dcmread(results[(framed_series, SEG_CLASS)], stop_before_pixels=True)
    rt = dcmread(results[(framed_series, RTSTRUCT_CLASS)])
    assert seg.FrameOfReferenceUID == rt.FrameOfReferenceUID == chosen
    assert [str(f.FrameOfReferenceUID) for f in rt.ReferencedFrameOfReferenceSequence] == [chosen]
    assert {str(r.ReferencedFrameOfReferenceUID) for r in rt.StructureSetROISequence} == {chosen}

    seg = dcmread(results[(uneven_series, SEG_CLASS)], stop_before_pixels=True)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        k = slice_of[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        placed = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(placed, positions[k], atol=1e-3)
    rt = dcmread(results[(uneven_series, RTSTRUCT_CLASS)])
    contoured = set()
    for roi in rt.ROIContourSequence:
        for contour in roi.ContourSequence:
            k = slice_of[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            z = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)[:, 2]
            assert np.abs(z - positions[k][2]).max() < 1e-2
            contoured.add(k)
    assert len(contoured) >= 20, sorted(contoured)
