"""`segment` runs the service's pipeline offline: same objects, a summary table, honest exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import REPO, NodeProcess
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, assert_dciodvfy_clean
from tests.harness.synthetic_ct import write_ct_series

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def run_segment(*args: str, bundles: tuple[str, ...] = ("body-threshold",)) -> subprocess.CompletedProcess[str]:
    """``segment`` with the fast test bundle, or with ``bundles=()`` the node's defaults (body-lungs, liver)."""
    chosen = [a for b in bundles for a in ("--bundle", b)]
    return subprocess.run([sys.executable, "-m", "node", "segment", *chosen, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def by_class(paths: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in paths}


def test_offline_objects_equal_the_services(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp", "dciodvfy"):
        pytest.skip(reason)
    series = write_ct_series(tmp_path / "ct", slices=24, rows=256, columns=256, pixel_spacing=(1.6, 1.6))
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"]
    ) as node:
        storescu("127.0.0.1", node.port, node.ae_title, series.directory)
        service = by_class(pacs.wait_for_files(2, timeout=120))
    out = tmp_path / "offline"
    proc = run_segment(str(series.directory), "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "segment summary" in proc.stdout and "BODY" in proc.stdout
    offline = by_class([p for p in out.rglob("*.dcm")])
    assert set(offline) == set(service) == {SEG_CLASS, RTSTRUCT_CLASS}
    seg_a, seg_b = dcmread(service[SEG_CLASS]), dcmread(offline[SEG_CLASS])
    assert seg_a.SOPInstanceUID == seg_b.SOPInstanceUID  # same job → same UIDs: a resend de-duplicates
    assert np.array_equal(seg_a.pixel_array, seg_b.pixel_array)
    rt_a, rt_b = dcmread(service[RTSTRUCT_CLASS]), dcmread(offline[RTSTRUCT_CLASS])
    assert rt_a.SOPInstanceUID == rt_b.SOPInstanceUID
    contours_a = [c.ContourData for c in rt_a.ROIContourSequence[0].ContourSequence]
    contours_b = [c.ContourData for c in rt_b.ROIContourSequence[0].ContourSequence]
    assert contours_a == contours_b
    for path in offline.values():
        assert_dciodvfy_clean(path)


@pytest.mark.skipif(not (SHARED / "ct").is_dir(), reason=f"real CT data not found at {SHARED / 'ct'}")
def test_20_slice_series_gets_body_and_liver_is_declined_with_the_reason(tmp_path: Path) -> None:
    # The 20-slice J2K abdomen (40 mm) has empty Study/Series Instance UIDs in its datasets: offline, the
    # results carry derived UIDs (said in the table); the liver model declines the slab.
    out = tmp_path / "out"
    proc = run_segment(str(SHARED / "ct" / "totalseg-abdomen-20-j2k"), "-o", str(out), bundles=())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())  # the table wraps long cells
    assert "declined: liver needs at least 75 mm along the slices; this series covers 40 mm" in text, text
    assert "results carry derived UIDs" in text, text
    segs = sorted(out.rglob("SEG_*.dcm"))
    assert len(segs) == 1 and "body-lungs" in str(segs[0])
    seg = dcmread(segs[0])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["BODY"]
    assert seg.StudyInstanceUID.startswith("2.25.")
    for path in [*segs, *out.rglob("RTSTRUCT_*.dcm")]:
        assert_dciodvfy_clean(path)


def test_no_dicom_input_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM")
    proc = run_segment(str(tmp_path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no DICOM series found" in proc.stderr
