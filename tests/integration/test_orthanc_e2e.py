"""End to end, the way a hospital sees it: Orthanc pushes a CT study to the node, results come back.

A private Orthanc (``tests.harness.orthanc``) declares the node as modality ``segnode``; the node runs
as ``python -m node serve`` with Orthanc as its destination.  The real Philips head study
(``../shared/data/ct/philips-head-5mm``: 28 axial CT slices plus a 6-image "Exam Summary" Secondary
Capture series whose Modality is also CT) is uploaded into Orthanc and sent to the node through
Orthanc's REST API.  We then wait for the node's DICOM-SEG and RTSTRUCT to arrive back in the same
study and check them: references, geometry, highdicom readability, dciodvfy, and the node's own
``status --json`` bookkeeping.

Skipped (with the reason) when Orthanc, DCMTK, dicom3tools or the shared real-data folder is absent.
Everything listens and connects on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.harness.dcmtk import dciodvfy, echoscu, tool_missing_reason
from tests.harness.orthanc import OrthancServer, free_port, orthanc_missing_reason, wait_for

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CT_FOLDER = DATA / "ct" / "philips-head-5mm"

LOOPBACK = "127.0.0.1"
NODE_AET = "SEGNODE"
ORTHANC_AET = "ORTHANC"
MODALITY_NAME = "segnode"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

EXPECTED_CT_SLICES = 28
RESULTS_TIMEOUT_S = 120.0
NODE_START_TIMEOUT_S = 60.0
NODE_STOP_TIMEOUT_S = 30.0
PLANE_TOLERANCE_MM = 0.01


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
class NodeProcess:
    """``python -m node serve`` as a child process, logging to a file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on pytest does not reach it; we stop it ourselves
        )
        self.returncode: int | None = None
        self.stop_seconds: float | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, max_chars: int = 30_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, wait up to 30 s, then SIGKILL.  Idempotent; returns the exit status."""
        if self.returncode is None and self.proc.returncode is None:
            began = time.monotonic()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # this pid only
                try:
                    self.proc.wait(timeout=NODE_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.stop_seconds = time.monotonic() - began
        self.returncode = self.proc.returncode
        if not self._log.closed:
            self._log.close()
        return self.returncode


@dataclass
class E2E:
    """What the module fixture did and fetched; tests only assert on it."""

    tmp: Path
    orthanc: OrthancServer
    node: NodeProcess
    node_port: int
    config_path: Path
    state_dir: Path
    ct: dict[str, pydicom.Dataset] = field(default_factory=dict)  # SOPInstanceUID -> header
    sc: dict[str, pydicom.Dataset] = field(default_factory=dict)
    uploaded_ids: list[str] = field(default_factory=list)
    study_uid: str = ""
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
        return self.results[SEG_STORAGE][0]

    def rtstruct(self) -> pydicom.Dataset:
        return self.results[RTSTRUCT_STORAGE][0]

    def dump_logs(self) -> None:
        print("=" * 30, "node log", self.node.log_path, "=" * 30)
        print(self.node.log_text())
        print("=" * 30, "Orthanc log (tail)", "=" * 30)
        print(self.orthanc.log_text(12_000))
        if self.status:
            print("=" * 30, "node status --json", "=" * 30)
            print(json.dumps(self.status, indent=2)[:12_000])

    @contextlib.contextmanager
    def explain_failure(self) -> Iterator[None]:
        """Print the node and Orthanc logs when the block fails (pytest shows them)."""
        try:
            yield
        except BaseException:
            self.dump_logs()
            raise


def node_status(config_path: Path, state_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "node", "status", "-c", str(config_path), "--state-dir", str(state_dir), "--json"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"node status failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(out.stdout))


def _node_settled(status: dict[str, Any]) -> bool:
    """No series still receiving, no job queued/running, nothing pending in the outbox."""
    return (
        bool(status.get("series"))
        and all(s["state"] != "receiving" for s in status["series"])
        and all(j["state"] in ("done", "failed") for j in status["jobs"])
        and all(o["state"] != "pending" for o in status["outbox"])
    )


def _read_headers(folder: Path) -> tuple[dict[str, pydicom.Dataset], dict[str, pydicom.Dataset]]:
    ct: dict[str, pydicom.Dataset] = {}
    sc: dict[str, pydicom.Dataset] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DIRFILE"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == CT_IMAGE_STORAGE:
            ct[str(ds.SOPInstanceUID)] = ds
        elif ds.SOPClassUID == SC_IMAGE_STORAGE:
            sc[str(ds.SOPInstanceUID)] = ds
    return ct, sc


# --------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    began = time.monotonic()
    tmp = tmp_path_factory.mktemp("orthanc-e2e")
    state_dir = tmp / "state"
    config_path = tmp / "node.toml"
    config_path.write_text("[assemble]\nquiet_period_s = 5\nrelease_settle_s = 1\n", encoding="utf-8")
    node_port = free_port()

    orthanc = OrthancServer(
        aet=ORTHANC_AET,
        modalities={MODALITY_NAME: (NODE_AET, LOOPBACK, node_port)},
        workdir=tmp / "orthanc",
    )
    orthanc.start()  # exports TCP_NODELAY=1 to Orthanc (DCMTK) itself
    node: NodeProcess | None = None
    run: E2E | None = None
    try:
        node = NodeProcess(
            [
                sys.executable, "-m", "node", "serve",
                "-c", str(config_path),
                "--state-dir", str(state_dir),
                "--port", str(node_port),
                "--bind", LOOPBACK,
                "--ae-title", NODE_AET,
                "--destination", f"{ORTHANC_AET}@{LOOPBACK}:{orthanc.dicom_port}",
            ],
            tmp / "node.log",
        )
        run = E2E(tmp=tmp, orthanc=orthanc, node=node, node_port=node_port,
                  config_path=config_path, state_dir=state_dir)
        with run.explain_failure():
            _drive(run)
        run.timings["fixture_s"] = time.monotonic() - began
        yield run
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def _drive(run: E2E) -> None:
    orthanc, node = run.orthanc, run.node
    t0 = time.monotonic()

    # 1. the node answers C-ECHO (DCMTK's echoscu: an independent implementation)
    def echo_ok() -> bool:
        if not node.alive():
            raise AssertionError(f"the node exited with status {node.proc.returncode} before answering C-ECHO")
        try:
            result = echoscu(LOOPBACK, run.node_port, NODE_AET, calling_aet=ORTHANC_AET, timeout=3, check=False)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    wait_for(echo_ok, NODE_START_TIMEOUT_S, 0.25)
    run.timings["node_up_s"] = time.monotonic() - t0
    # Orthanc can reach the node too (its own C-ECHO through the declared modality)
    orthanc.post(f"/modalities/{MODALITY_NAME}/echo", {}, timeout=30)

    # 2. the study goes into Orthanc
    run.ct, run.sc = _read_headers(CT_FOLDER)
    assert len(run.ct) == EXPECTED_CT_SLICES, f"expected {EXPECTED_CT_SLICES} CT slices in {CT_FOLDER}"
    assert run.sc, "expected the Exam Summary Secondary Capture series in the study"
    run.uploaded_ids = orthanc.upload(CT_FOLDER)
    assert len(run.uploaded_ids) == len(run.ct) + len(run.sc)
    run.study_uid = str(next(iter(run.ct.values())).StudyInstanceUID)
    study_id = orthanc.find_study(run.study_uid)
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
        if not node.alive():
            raise AssertionError(f"the node exited with status {node.proc.returncode} while working")
        modalities = {
            s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series?expand")
        }
        return {"SEG", "RTSTRUCT"} <= modalities

    wait_for(results_arrived, RESULTS_TIMEOUT_S, 0.5)
    run.timings["results_s"] = time.monotonic() - t1

    # 5. let the node settle (both series stable, jobs ended, outbox empty), so that a late or
    #    duplicate result would show in the counts below
    def settled() -> dict[str, Any] | None:
        run.status = node_status(run.config_path, run.state_dir)
        return run.status if _node_settled(run.status) else None

    wait_for(settled, 60, 0.5)
    time.sleep(1.0)  # an object sent in the very last instant is indexed by Orthanc by now

    # 6. fetch every result object in the study
    run.instances = orthanc.study_instances(study_id, tags=True)
    results: dict[str, list[pydicom.Dataset]] = {}
    paths: dict[str, list[Path]] = {}
    out = run.tmp / "results"
    out.mkdir(exist_ok=True)
    for item in run.instances:
        sop_class = item["Tags"].get("SOPClassUID")
        if sop_class in (SEG_STORAGE, RTSTRUCT_STORAGE):
            data = orthanc.instance_file(item["ID"])
            path = out / f"{'seg' if sop_class == SEG_STORAGE else 'rtstruct'}-{item['ID']}.dcm"
            path.write_bytes(data)
            results.setdefault(sop_class, []).append(pydicom.dcmread(io.BytesIO(data)))
            paths.setdefault(sop_class, []).append(path)
    run.results, run.result_paths = results, paths


# ----------------------------------------------------------------------------------------- tests
def test_orthanc_pushed_the_whole_study(e2e: E2E) -> None:
    with e2e.explain_failure():
        assert e2e.send_answer.get("FailedInstancesCount", 0) == 0
        assert len(e2e.ct) == EXPECTED_CT_SLICES
        print(f"timings: {json.dumps({k: round(v, 2) for k, v in e2e.timings.items()})}")


def test_exactly_one_seg_and_one_rtstruct_in_the_study(e2e: E2E) -> None:
    with e2e.explain_failure():
        classes = [i["Tags"].get("SOPClassUID") for i in e2e.instances]
        assert classes.count(SEG_STORAGE) == 1, classes
        assert classes.count(RTSTRUCT_STORAGE) == 1, classes
        # nothing else was added: the Exam Summary SC series produced no results
        assert len(classes) == len(e2e.ct) + len(e2e.sc) + 2, classes


def test_results_sit_in_the_ct_study_and_patient(e2e: E2E) -> None:
    with e2e.explain_failure():
        ct = next(iter(e2e.ct.values()))
        for ds in (e2e.seg(), e2e.rtstruct()):
            assert ds.StudyInstanceUID == ct.StudyInstanceUID
            assert ds.PatientID == ct.PatientID
            assert str(ds.PatientName) == str(ct.PatientName)
            assert ds.get("PatientBirthDate", "") == ct.get("PatientBirthDate", "")
            assert ds.get("PatientSex", "") == ct.get("PatientSex", "")
            assert ds.SeriesInstanceUID not in {ct.SeriesInstanceUID, *(s.SeriesInstanceUID for s in e2e.sc.values())}
        # Orthanc filed them under the same patient resource, too
        patients = {i["Tags"].get("PatientID") for i in e2e.instances}
        assert patients == {ct.PatientID}
        parents = {e2e.orthanc.get(f"/instances/{i['ID']}/patient")["ID"] for i in e2e.instances}
        assert len(parents) == 1


def test_seg_references_only_pushed_ct_instances(e2e: E2E) -> None:
    with e2e.explain_failure():
        seg = e2e.seg()
        referenced = []
        for series in seg.ReferencedSeriesSequence:
            assert series.SeriesInstanceUID == e2e.ct_series_uid
            for inst in series.ReferencedInstanceSequence:
                assert inst.ReferencedSOPClassUID == CT_IMAGE_STORAGE
                referenced.append(str(inst.ReferencedSOPInstanceUID))
        assert referenced, "SEG ReferencedSeriesSequence lists no instances"
        assert set(referenced) <= set(e2e.ct), set(referenced) - set(e2e.ct)


def test_rtstruct_references_only_pushed_ct_instances(e2e: E2E) -> None:
    with e2e.explain_failure():
        rt = e2e.rtstruct()
        referenced: list[str] = []
        for frame in rt.ReferencedFrameOfReferenceSequence:
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    assert series.SeriesInstanceUID == e2e.ct_series_uid
                    referenced += [str(c.ReferencedSOPInstanceUID) for c in series.ContourImageSequence]
        for roi in rt.ROIContourSequence:
            for contour in roi.get("ContourSequence", []):
                referenced += [str(c.ReferencedSOPInstanceUID) for c in contour.get("ContourImageSequence", [])]
        assert referenced, "RTSTRUCT references no contour images"
        assert set(referenced) <= set(e2e.ct), set(referenced) - set(e2e.ct)
        names = [r.ROIName for r in rt.StructureSetROISequence]
        assert "BODY" in names, names


def test_rtstruct_contours_lie_in_their_slice_planes(e2e: E2E) -> None:
    with e2e.explain_failure():
        rt = e2e.rtstruct()
        n_contours = 0
        worst = 0.0
        for roi in rt.ROIContourSequence:
            for contour in roi.get("ContourSequence", []):
                images = contour.get("ContourImageSequence", [])
                assert len(images) == 1, "each planar contour should reference exactly one CT slice"
                ct = e2e.ct[str(images[0].ReferencedSOPInstanceUID)]
                origin = np.asarray(ct.ImagePositionPatient, dtype=float)
                iop = np.asarray(ct.ImageOrientationPatient, dtype=float)
                normal = np.cross(iop[:3], iop[3:])
                normal /= np.linalg.norm(normal)
                points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
                assert len(points) == int(contour.NumberOfContourPoints)
                distance = np.abs((points - origin) @ normal)
                worst = max(worst, float(distance.max()))
                assert distance.max() < PLANE_TOLERANCE_MM, (
                    f"contour on {ct.SOPInstanceUID} is {distance.max():.4f} mm off the slice plane"
                )
                n_contours += 1
        assert n_contours > 0, "the RTSTRUCT holds no contours"
        print(f"{n_contours} contours, worst distance from slice plane {worst:.2e} mm")


def test_seg_reads_with_highdicom(e2e: E2E) -> None:
    import highdicom

    with e2e.explain_failure():
        seg = highdicom.seg.segread(e2e.result_paths[SEG_STORAGE][0])
        labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
        assert "BODY" in labels, labels
        assert seg.get_segment_numbers(segment_label="BODY")
        # every frame is derived from a pushed CT slice
        frames = seg.PerFrameFunctionalGroupsSequence
        assert len(frames) == int(seg.NumberOfFrames) > 0
        for item in frames:
            sources = [
                str(src.ReferencedSOPInstanceUID)
                for derivation in item.DerivationImageSequence
                for src in derivation.SourceImageSequence
            ]
            assert sources and set(sources) <= set(e2e.ct), sources
        source_uids = {sop for _study, _series, sop in seg.get_source_image_uids()}
        assert source_uids and source_uids <= set(e2e.ct)


@pytest.mark.parametrize("kind", [SEG_STORAGE, RTSTRUCT_STORAGE], ids=["seg", "rtstruct"])
def test_dciodvfy_reports_no_errors(e2e: E2E, kind: str) -> None:
    with e2e.explain_failure():
        report = dciodvfy(e2e.result_paths[kind][0])
        assert report.ok, report.summary()


def test_node_status_shows_job_done_and_results_sent(e2e: E2E) -> None:
    with e2e.explain_failure():
        status = e2e.status = node_status(e2e.config_path, e2e.state_dir)
        series = {s["series_uid"]: s for s in status["series"]}
        assert series[e2e.ct_series_uid]["state"] == "dispatched"
        sc_series = {str(s.SeriesInstanceUID) for s in e2e.sc.values()}
        for uid in sc_series:
            assert series[uid]["state"] == "ignored", series[uid]
        jobs = status["jobs"]
        assert len(jobs) == 1, jobs
        assert jobs[0]["state"] == "done" and jobs[0]["series_uid"] == e2e.ct_series_uid, jobs[0]
        outbox = status["outbox"]
        assert sorted(o["sop_class_uid"] for o in outbox) == sorted([SEG_STORAGE, RTSTRUCT_STORAGE]), outbox
        for item in outbox:
            assert item["state"] == "sent", item
            assert item["last_status"].startswith("0x0000"), item
            assert item["job_id"] == jobs[0]["id"]
        sent_uids = {o["sop_instance_uid"] for o in outbox}
        assert sent_uids == {str(e2e.seg().SOPInstanceUID), str(e2e.rtstruct().SOPInstanceUID)}


def test_node_stops_cleanly_on_sigterm(e2e: E2E) -> None:
    with e2e.explain_failure():
        code = e2e.node.stop()
        print(f"node stopped with status {code} in {e2e.node.stop_seconds:.2f} s")
        assert e2e.node.stop_seconds is not None and e2e.node.stop_seconds < NODE_STOP_TIMEOUT_S
        assert code == 0, f"exit status {code}"
