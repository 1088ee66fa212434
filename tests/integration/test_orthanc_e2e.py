"""End to end, the way a hospital sees it: Orthanc pushes a CT study to the node, results come back.

A private Orthanc (``tests.harness.orthanc``) declares the node as modality ``segnode``; the node runs
as ``python -m node serve`` (``tests.harness.node_process``) with Orthanc as its destination.  The real
Philips head study (``../shared/data/ct/philips-head-5mm``: 28 axial CT slices plus a 6-image "Exam
Summary" Secondary Capture series whose Modality is also CT) is uploaded into Orthanc and sent to the
node through Orthanc's REST API.  We then wait for the node's DICOM-SEG and RTSTRUCT to arrive back in
the same study and check them (``tests.harness.result_checks``: references, geometry, highdicom
readability, dciodvfy) along with the node's own ``status --json`` bookkeeping.

Skipped (with the reason) when Orthanc, DCMTK, dicom3tools or the shared real-data folder is absent.
Everything listens and connects on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.harness.dcmtk import echoscu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.orthanc import OrthancServer, free_port, orthanc_missing_reason, wait_for
from tests.harness.result_checks import (
    RTSTRUCT_CLASS,
    SEG_CLASS,
    assert_dciodvfy_clean,
    check_rtstruct,
    check_seg,
    contour_plane_distance,
    read_sources,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CT_FOLDER = DATA / "ct" / "philips-head-5mm"

LOOPBACK = "127.0.0.1"
NODE_AET = "SEGNODE"
ORTHANC_AET = "ORTHANC"
MODALITY_NAME = "segnode"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

EXPECTED_CT_SLICES = 28
EXPECTED_LABELS = {"BODY"}
RESULTS_TIMEOUT_S = 120.0
NODE_START_TIMEOUT_S = 60.0
NODE_STOP_TIMEOUT_S = 30.0


def _skip_reason() -> str | None:
    reasons = [
        r
        for r in (
            orthanc_missing_reason(),
            tool_missing_reason("echoscu", "dciodvfy"),
            None if CT_FOLDER.is_dir() else f"shared real-data folder {CT_FOLDER} absent",
        )
        if r
    ]
    return "; ".join(reasons) or None


_SKIP = _skip_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP)),
    pytest.mark.timeout(400),
]


# --------------------------------------------------------------------------------------- helpers
@dataclass
class E2E:
    """What the module fixture did and fetched; tests only assert on it."""

    tmp: Path
    orthanc: OrthancServer
    node: NodeProcess
    ct: dict[str, pydicom.Dataset] = field(default_factory=dict)  # SOPInstanceUID -> header
    sc: dict[str, pydicom.Dataset] = field(default_factory=dict)
    uploaded_ids: list[str] = field(default_factory=list)
    study_id: str = ""
    send_answer: dict[str, Any] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)  # Orthanc instances with Tags
    results: dict[str, list[pydicom.Dataset]] = field(default_factory=dict)  # SOPClassUID -> datasets
    result_paths: dict[str, list[Path]] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ct_series_uid(self) -> str:
        return str(next(iter(self.ct.values())).SeriesInstanceUID)

    def seg(self) -> pydicom.Dataset:
        return self.results[SEG_CLASS][0]

    def rtstruct(self) -> pydicom.Dataset:
        return self.results[RTSTRUCT_CLASS][0]

    @contextlib.contextmanager
    def explain_failure(self) -> Iterator[None]:
        """Print the node and Orthanc logs (and the last status) when the block fails; pytest shows them."""
        try:
            yield
        except BaseException:
            print("=" * 30, "node log", self.node.log_path, "=" * 30)
            print(self.node.log_text()[-30_000:])
            print("=" * 30, "Orthanc log (tail)", "=" * 30)
            print(self.orthanc.log_text(12_000))
            if self.status:
                print("=" * 30, "node status --json", "=" * 30)
                print(json.dumps(self.status, indent=2)[:12_000])
            raise


def _alive(node: NodeProcess) -> bool:
    return node.proc is not None and node.proc.poll() is None


def _node_settled(status: dict[str, Any]) -> bool:
    """No series still receiving, no job queued/running, nothing pending in the outbox."""
    return (
        bool(status.get("series"))
        and all(s["state"] != "receiving" for s in status["series"])
        and all(j["state"] in ("done", "failed") for j in status["jobs"])
        and all(o["state"] != "pending" for o in status["outbox"])
    )


# --------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    began = time.monotonic()
    tmp = tmp_path_factory.mktemp("orthanc-e2e")
    node_port = free_port()
    orthanc = OrthancServer(
        aet=ORTHANC_AET,
        modalities={MODALITY_NAME: (NODE_AET, LOOPBACK, node_port)},
        workdir=tmp / "orthanc",
    )
    orthanc.start()  # exports TCP_NODELAY=1 to Orthanc (DCMTK) itself
    node = NodeProcess(
        tmp / "node", ae_title=NODE_AET, destinations=[f"{ORTHANC_AET}@{LOOPBACK}:{orthanc.dicom_port}"],
        quiet_period_s=5, release_settle_s=1, port=node_port, startup_timeout=NODE_START_TIMEOUT_S,
    )
    try:
        run = E2E(tmp=tmp, orthanc=orthanc, node=node)
        with run.explain_failure():
            _drive(run)
        run.timings["fixture_s"] = time.monotonic() - began
        yield run
    finally:
        node.stop()
        orthanc.stop()


def _drive(run: E2E) -> None:
    orthanc, node = run.orthanc, run.node

    # 1. the node starts (its 'ready:' line comes after the listener is bound) and answers C-ECHO
    #    from DCMTK's echoscu, an independent implementation
    t0 = time.monotonic()
    node.start()
    echo = echoscu(LOOPBACK, node.port, NODE_AET, calling_aet=ORTHANC_AET, timeout=10, check=False)
    assert echo.returncode == 0, f"echoscu to the node failed ({echo.returncode}):\n{echo.stdout}{echo.stderr}"
    run.timings["node_up_s"] = time.monotonic() - t0
    # Orthanc can reach the node too (its own C-ECHO through the declared modality)
    orthanc.post(f"/modalities/{MODALITY_NAME}/echo", {}, timeout=30)

    # 2. the study goes into Orthanc
    headers = read_sources(p for p in sorted(CT_FOLDER.rglob("*")) if p.is_file() and p.name.upper() != "DIRFILE")
    run.ct = {uid: ds for uid, ds in headers.items() if ds.SOPClassUID == CT_IMAGE_STORAGE}
    run.sc = {uid: ds for uid, ds in headers.items() if ds.SOPClassUID == SC_IMAGE_STORAGE}
    assert len(run.ct) == EXPECTED_CT_SLICES, f"expected {EXPECTED_CT_SLICES} CT slices in {CT_FOLDER}"
    assert run.sc, "expected the Exam Summary Secondary Capture series in the study"
    run.uploaded_ids = orthanc.upload(CT_FOLDER)
    assert len(run.uploaded_ids) == len(run.ct) + len(run.sc)
    study_id = orthanc.find_study(str(next(iter(run.ct.values())).StudyInstanceUID))
    assert study_id is not None
    run.study_id = study_id

    # 3. Orthanc pushes it to the node (C-STORE, one association)
    t1 = time.monotonic()
    run.send_answer = orthanc.send_study_to_modality(study_id, MODALITY_NAME, synchronous=True, timeout=120)
    run.timings["push_s"] = time.monotonic() - t1
    assert run.send_answer.get("FailedInstancesCount", 0) == 0, run.send_answer
    assert run.send_answer.get("InstancesCount") == len(run.uploaded_ids), run.send_answer

    # 4. results come back into the same study
    def results_arrived() -> bool:
        if not _alive(node):
            raise AssertionError(f"the node exited with status {node.proc and node.proc.returncode} while working")
        modalities = {
            s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series?expand")
        }
        return {"SEG", "RTSTRUCT"} <= modalities

    wait_for(results_arrived, RESULTS_TIMEOUT_S, 0.5)
    run.timings["results_s"] = time.monotonic() - t1

    # 5. let the node settle (both series stable, jobs ended, outbox empty), so that a late or
    #    duplicate result would show in the counts below
    run.status = node.wait_status(_node_settled, 60)
    time.sleep(1.0)  # an object sent in the very last instant is indexed by Orthanc by now

    # 6. fetch every result object in the study
    run.instances = orthanc.study_instances(study_id, tags=True)
    out = run.tmp / "results"
    out.mkdir(exist_ok=True)
    for item in run.instances:
        sop_class = item["Tags"].get("SOPClassUID")
        if sop_class in (SEG_CLASS, RTSTRUCT_CLASS):
            data = orthanc.instance_file(item["ID"])
            path = out / f"{'seg' if sop_class == SEG_CLASS else 'rtstruct'}-{item['ID']}.dcm"
            path.write_bytes(data)
            run.results.setdefault(sop_class, []).append(pydicom.dcmread(io.BytesIO(data)))
            run.result_paths.setdefault(sop_class, []).append(path)


# ----------------------------------------------------------------------------------------- tests
def test_orthanc_pushed_the_whole_study(e2e: E2E) -> None:
    with e2e.explain_failure():
        assert e2e.send_answer.get("FailedInstancesCount", 0) == 0
        assert len(e2e.ct) == EXPECTED_CT_SLICES
        print(f"timings: {json.dumps({k: round(v, 2) for k, v in e2e.timings.items()})}")


def test_exactly_one_seg_and_one_rtstruct_in_the_study(e2e: E2E) -> None:
    with e2e.explain_failure():
        classes = [i["Tags"].get("SOPClassUID") for i in e2e.instances]
        assert classes.count(SEG_CLASS) == 1, classes
        assert classes.count(RTSTRUCT_CLASS) == 1, classes
        # nothing else was added: the Exam Summary SC series produced no results
        assert len(classes) == len(e2e.ct) + len(e2e.sc) + 2, classes


def test_results_sit_in_the_ct_patient(e2e: E2E) -> None:
    """Study and Patient ID are checked by check_seg/check_rtstruct; here the rest of the patient module."""
    with e2e.explain_failure():
        ct = next(iter(e2e.ct.values()))
        for ds in (e2e.seg(), e2e.rtstruct()):
            assert str(ds.PatientName) == str(ct.PatientName)
            assert ds.get("PatientBirthDate", "") == ct.get("PatientBirthDate", "")
            assert ds.get("PatientSex", "") == ct.get("PatientSex", "")
            assert ds.SeriesInstanceUID not in {ct.SeriesInstanceUID, *(s.SeriesInstanceUID for s in e2e.sc.values())}
        # Orthanc filed them under the same patient resource, too
        patients = {i["Tags"].get("PatientID") for i in e2e.instances}
        assert patients == {ct.PatientID}
        parents = {e2e.orthanc.get(f"/instances/{i['ID']}/patient")["ID"] for i in e2e.instances}
        assert len(parents) == 1


def test_seg_matches_the_pushed_ct(e2e: E2E) -> None:
    import highdicom

    with e2e.explain_failure():
        path = e2e.result_paths[SEG_CLASS][0]
        seg = check_seg(path, e2e.ct, EXPECTED_LABELS)
        # beyond check_seg: only the CT series and CT Image Storage are referenced ...
        for series in seg.ReferencedSeriesSequence:
            assert series.SeriesInstanceUID == e2e.ct_series_uid
            for inst in series.ReferencedInstanceSequence:
                assert inst.ReferencedSOPClassUID == CT_IMAGE_STORAGE
        # ... every frame, through every derivation item, is derived from pushed CT slices ...
        frames = seg.PerFrameFunctionalGroupsSequence
        assert len(frames) == int(seg.NumberOfFrames) > 0
        for item in frames:
            sources = [
                str(src.ReferencedSOPInstanceUID)
                for derivation in item.DerivationImageSequence
                for src in derivation.SourceImageSequence
            ]
            assert sources and set(sources) <= set(e2e.ct), sources
        # ... and highdicom finds the BODY segment and only pushed CT slices as sources
        parsed = highdicom.seg.segread(path)
        assert parsed.get_segment_numbers(segment_label="BODY")
        source_uids = {sop for _study, _series, sop in parsed.get_source_image_uids()}
        assert source_uids and source_uids <= set(e2e.ct)


def test_rtstruct_matches_the_pushed_ct(e2e: E2E) -> None:
    with e2e.explain_failure():
        # references, ROI names, closed planar contours within 0.01 mm of their slice planes
        rt = check_rtstruct(e2e.result_paths[RTSTRUCT_CLASS][0], e2e.ct, EXPECTED_LABELS)
        # beyond check_rtstruct: every referenced series (not only the first) is the CT series ...
        for frame in rt.ReferencedFrameOfReferenceSequence:
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    assert series.SeriesInstanceUID == e2e.ct_series_uid
                    listed = {str(c.ReferencedSOPInstanceUID) for c in series.ContourImageSequence}
                    assert listed <= set(e2e.ct), listed - set(e2e.ct)
        # ... and each planar contour references exactly one CT slice
        n_contours, worst = 0, 0.0
        for roi in rt.ROIContourSequence:
            for contour in roi.ContourSequence:
                images = contour.ContourImageSequence
                assert len(images) == 1, "each planar contour should reference exactly one CT slice"
                points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
                ct = e2e.ct[str(images[0].ReferencedSOPInstanceUID)]
                worst = max(worst, contour_plane_distance(points, ct))
                n_contours += 1
        print(f"{n_contours} contours, worst distance from slice plane {worst:.2e} mm")


@pytest.mark.parametrize("kind", [SEG_CLASS, RTSTRUCT_CLASS], ids=["seg", "rtstruct"])
def test_dciodvfy_reports_no_errors(e2e: E2E, kind: str) -> None:
    with e2e.explain_failure():
        assert_dciodvfy_clean(e2e.result_paths[kind][0])


def test_node_status_shows_job_done_and_results_sent(e2e: E2E) -> None:
    with e2e.explain_failure():
        status = e2e.status = e2e.node.status()
        series = {s["series_uid"]: s for s in status["series"]}
        assert series[e2e.ct_series_uid]["state"] == "dispatched"
        sc_series = {str(s.SeriesInstanceUID) for s in e2e.sc.values()}
        for uid in sc_series:
            assert series[uid]["state"] == "ignored", series[uid]
        jobs = status["jobs"]
        assert len(jobs) == 1, jobs
        assert jobs[0]["state"] == "done" and jobs[0]["series_uid"] == e2e.ct_series_uid, jobs[0]
        outbox = status["outbox"]
        assert sorted(o["sop_class_uid"] for o in outbox) == sorted([SEG_CLASS, RTSTRUCT_CLASS]), outbox
        for item in outbox:
            assert item["state"] == "sent", item
            assert item["last_status"].startswith("0x0000"), item
            assert item["job_id"] == jobs[0]["id"]
        sent_uids = {o["sop_instance_uid"] for o in outbox}
        assert sent_uids == {str(e2e.seg().SOPInstanceUID), str(e2e.rtstruct().SOPInstanceUID)}


def test_node_stops_cleanly_on_sigterm(e2e: E2E) -> None:
    with e2e.explain_failure():
        assert _alive(e2e.node), "the node was no longer running before SIGTERM"
        began = time.monotonic()
        code = e2e.node.stop(timeout=NODE_STOP_TIMEOUT_S)  # SIGTERM; SIGKILL after the timeout
        seconds = time.monotonic() - began
        print(f"node stopped with status {code} in {seconds:.2f} s")
        assert seconds < NODE_STOP_TIMEOUT_S
        assert code == 0, f"exit status {code}"
