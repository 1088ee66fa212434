"""DCMTK's storescu pushes real CT into the node; the node sends SEG and RTSTRUCT to DCMTK's storescp."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.result_checks import (
    RTSTRUCT_CLASS,
    SEG_CLASS,
    assert_dciodvfy_clean,
    check_rtstruct,
    check_seg,
    read_sources,
)

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HEAD_5MM = SHARED / "ct" / "philips-head-5mm"


@pytest.fixture(autouse=True)
def _tools() -> None:
    reason = tool_missing_reason("storescu", "storescp", "dciodvfy")
    if reason:
        pytest.skip(reason)


def _results(directory: Path) -> dict[str, Path]:
    found = {}
    for f in directory.iterdir():
        ds = dcmread(f, stop_before_pixels=True)
        found[str(ds.SOPClassUID)] = f
    return found


@pytest.mark.skipif(not HEAD_5MM.is_dir(), reason=f"real CT data not found at {HEAD_5MM}")
def test_storescu_to_node_to_storescp(tmp_path: Path) -> None:
    ct_dir = HEAD_5MM / "S2010"
    ct_files = sorted(p for p in ct_dir.iterdir() if p.name.startswith("I"))
    sources = read_sources(ct_files)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"]
    ) as node:
        # The whole study: CT series, Exam Summary (Secondary Capture) and the DICOMDIRs that
        # storescu sends under an image's UIDs, which the node must refuse (no -nh: a refusal
        # would stop storescu, so DICOMDIRs are excluded here and tested separately).
        study_files = [p for p in HEAD_5MM.rglob("I*") if p.is_file()]
        storescu("127.0.0.1", node.port, node.ae_title, study_files)
        files = pacs.wait_for_files(2, timeout=120)
        status = node.status()
    results = _results(pacs.directory)
    assert set(results) == {SEG_CLASS, RTSTRUCT_CLASS}, f"unexpected results {results}"
    check_seg(results[SEG_CLASS], sources, {"BODY"})
    check_rtstruct(results[RTSTRUCT_CLASS], sources, {"BODY"})
    for f in files:
        assert_dciodvfy_clean(f)
    jobs = status["jobs"]
    assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs
    assert {o["last_status"] for o in status["outbox"]} == {"0x0000 SUCCESS"}
    states = {s["series_uid"]: s for s in status["series"]}
    ignored = [s for s in states.values() if s["state"] == "ignored"]
    assert ignored and all("1.2.840.10008.5.1.4.1.1.7" in s["note"] for s in ignored), ignored


@pytest.mark.skipif(not HEAD_5MM.is_dir(), reason=f"real CT data not found at {HEAD_5MM}")
def test_dicomdir_sent_as_an_image_is_refused_and_the_image_still_stored(tmp_path: Path) -> None:
    """storescu sends a DICOMDIR under the UIDs of the first image it lists. The node must refuse it
    (0xA900) rather than let it take that image's UID and drop the real image as a duplicate."""
    dicomdir = HEAD_5MM / "S4010" / "DIRFILE"
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        proc = storescu("127.0.0.1", node.port, node.ae_title, [dicomdir, *sorted((HEAD_5MM / "S4010").glob("I*"))],
                        no_halt=True, check=False, as_is=False, extra_args=["-v"])
        status = node.status()
        log = node.log_text()
    assert "0xA900" in log and "SOPClassUID '(absent)'" in log, log[-3000:]
    assert "Error: DataSetDoesNotMatchSOPClass" in proc.stderr, proc.stderr
    # Every real image arrived, including the one whose UID the DICOMDIR borrowed.
    stored = sum(s["instance_count"] for s in status["series"])
    assert stored == len(list((HEAD_5MM / "S4010").glob("I*")))
