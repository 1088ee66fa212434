"""The queries and commands behind ``status``, ``retry`` and ``replay``, on a real index in a temporary state dir."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.config import Destination, NodeConfig
from node.errors import NodeError, Permanent, Retryable
from node.model.records import InstanceMeta, JobState, OutboxState, SeriesState
from node.spool.commands import plan_replay, replay_series, result_files, retry_dead_letters
from node.spool.index import Index
from node.spool.queries import open_index, status_report

NOW = 1_700_000_000.0
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _dicom(path: Path, sop_uid: str, sop_class: str = SEG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.save_as(path, enforce_file_format=True)
    return path


class State:
    """A state directory with the node's real index and results layout."""

    def __init__(self, root: Path, destinations: tuple[str, ...] = ()) -> None:
        dests = tuple(Destination(name, name.upper(), "127.0.0.1", 4242) for name in destinations)
        self.cfg = replace(NodeConfig(state_dir=root), destinations=dests)
        self.index = Index(self.cfg.index_path)

    def receive(self, uid: str, n: int = 2, at: float = NOW - 100) -> None:
        for k in range(n):
            meta = InstanceMeta(f"{uid}.{k}", "1.2.840.10008.5.1.4.1.1.2", "1.2", uid, "CT", "1.2.840.10008.1.2.1")
            self.index.add_instance(meta, path=self.cfg.spool_dir / f"{uid}.{k}", size=1000, calling_ae="T",
                                    quiet_period_s=0, now=at + k)

    def finish(self, uid: str, bundle: str = "liver@1", *, sent_to: tuple[str, ...] = ("pacs",),
               outcome: str = "sent") -> int:
        """Dispatch ``uid`` to one job that ends done with a SEG and an RTSTRUCT in its result folder,
        queued for ``sent_to`` and taken to ``outcome`` there (sent, pending or dead)."""
        (job_id,) = self.index.dispatch(uid, [bundle], now=NOW - 90)
        job = self.index.claim_job("w", now=NOW - 90)
        assert job is not None and job.id == job_id
        folder = self.cfg.job_result_dir(job_id)
        seg = _dicom(folder / "seg.dcm", f"9.{job_id}.1")
        rt = _dicom(folder / "rt.dcm", f"9.{job_id}.2", RTSTRUCT)
        outbox = [(d, p, u, c) for d in sent_to for p, u, c in ((seg, f"9.{job_id}.1", SEG), (rt, f"9.{job_id}.2",
                                                                                                 RTSTRUCT))]
        self.index.finish_job(job_id, result_dir=str(folder), timings='{"infer_s": 1.5}', outbox=outbox,
                              now=NOW - 80)
        for item in self.index.job_outbox(job_id):
            if outcome == "sent":
                self.index.mark_sent(item.id, "0x0000 SUCCESS", now=NOW - 70)
            elif outcome == "dead":
                self.index.mark_attempt_failed(item.id, "could not associate", retry_at=None)
        return job_id


# ---------------------------------------------------------------------------------------- status
def test_open_index_never_creates_one(tmp_path: Path) -> None:
    cfg = NodeConfig(state_dir=tmp_path / "state")
    assert open_index(cfg) is None
    assert not (tmp_path / "state").exists()
    Index(cfg.index_path).close()
    index = open_index(cfg)
    assert index is not None and index.path == cfg.index_path


def test_status_report_holds_series_jobs_outbox_and_retention(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.receive("1.1", n=3)
    state.receive("1.2", at=NOW - 60)
    state.receive("1.3", n=1, at=NOW - 50)
    sent = state.finish("1.1")
    dead = state.finish("1.2", outcome="dead")
    (failed,) = state.index.dispatch("1.3", ["lung@1"], now=NOW - 40)
    state.index.fail_job(failed, "engine broke", now=NOW - 30)

    report = status_report(state.cfg, state.index, limit=50, now=NOW)

    assert report.instance_count == 6
    assert [s.series_uid for s in report.series] == ["1.1", "1.2", "1.3"]  # least recently received first
    assert [j.job.id for j in report.jobs] == [failed, dead, sent]  # newest first
    by_id = {j.job.id: j for j in report.jobs}
    assert by_id[sent].timings == '{"infer_s": 1.5}' and by_id[sent].detail == '{"infer_s": 1.5}'
    assert by_id[failed].job.state is JobState.FAILED and by_id[failed].detail == "engine broke"
    assert [o.state for o in report.outbox] == [OutboxState.DEAD] * 2 + [OutboxState.SENT] * 2
    assert [o.sop_instance_uid for o in report.dead_letters] == [f"9.{dead}.2", f"9.{dead}.1"]
    assert report.outbox_counts() == dict.fromkeys(OutboxState, 0) | {OutboxState.SENT: 2, OutboxState.DEAD: 2}
    kept = report.retention
    assert (kept.series_count, kept.instance_count, kept.spool_bytes) == (3, 6, 6000)
    assert (kept.held, kept.held_dead_letters, kept.deletable_now) == (1, 1, 0)  # keep_days = 7: none old enough


def test_status_report_limits_rows_and_serialises_as_status_json(tmp_path: Path) -> None:
    state = State(tmp_path)
    for uid in ("1.1", "1.2", "1.3"):
        state.receive(uid)
        state.finish(uid)

    report = status_report(state.cfg, state.index, limit=2, now=NOW)

    assert len(report.series) == 3  # every series (as status --json prints them) ...
    assert [s.series_uid for s in report.recent_series] == ["1.2", "1.3"]  # ... the table shows the newest
    assert [j.job.series_uid for j in report.jobs] == ["1.3", "1.2"]
    assert len(report.outbox) == 2
    data = json.loads(json.dumps(report.as_dict()))  # JSON-ready as it is
    assert list(data) == ["series", "jobs", "outbox", "retention"]
    assert data["series"][0] == {"series_uid": "1.1", "study_uid": "1.2", "modality": "CT",
                                 "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_count": 2,
                                 "first_received": NOW - 100, "last_received": NOW - 99, "state": "dispatched",
                                 "note": "", "calling_ae": "T", "study_description": "", "series_description": ""}
    job = data["jobs"][0]
    assert job["state"] == "done" and job["result_dir"] == str(state.cfg.job_result_dir(3)) and "timings" not in job
    item = data["outbox"][0]
    assert item["state"] == "sent" and item["path"] == str(state.cfg.job_result_dir(3) / "rt.dcm")
    assert data["retention"]["series_count"] == 3 and data["retention"]["instance_count"] == 6


def test_status_report_of_an_empty_index(tmp_path: Path) -> None:
    state = State(tmp_path)
    report = status_report(state.cfg, state.index, now=NOW)
    assert (report.instance_count, report.series, report.jobs, report.outbox) == (0, [], [], [])
    assert report.retention.oldest_activity_age_s is None
    assert report.as_dict()["series"] == []


# ----------------------------------------------------------------------------------------- retry
def test_retry_turns_dead_letters_pending(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.receive("1.1")
    state.receive("1.2")
    sent = state.finish("1.1")
    dead = state.finish("1.2", outcome="dead")

    assert retry_dead_letters(state.index, now=NOW) == 2

    items = {o.id: o for o in state.index.outbox()}
    again = [o for o in items.values() if o.job_id == dead]
    assert [(o.state, o.attempts, o.next_attempt_at) for o in again] == [(OutboxState.PENDING, 0, NOW)] * 2
    assert {o.state for o in items.values() if o.job_id == sent} == {OutboxState.SENT}  # untouched
    assert [o.id for o in state.index.due_outbox(now=NOW)] == sorted(o.id for o in again)
    assert retry_dead_letters(state.index, now=NOW) == 0  # nothing dead any more


# ---------------------------------------------------------------------------------------- replay
def test_replay_of_an_unknown_series_names_it(tmp_path: Path) -> None:
    state = State(tmp_path)
    with pytest.raises(Permanent, match=r"series 1\.2\.3\.4\.5 is not in the index at .*index\.sqlite3"):
        replay_series(state.index, state.cfg, "1.2.3.4.5")


def test_replay_of_a_finished_series_requeues_its_results_to_the_named_destination(tmp_path: Path) -> None:
    state = State(tmp_path, destinations=("pacs", "archive"))
    state.receive("1.1")
    job_id = state.finish("1.1", sent_to=("pacs",))
    before = {o.sop_instance_uid: o for o in state.index.job_outbox(job_id)}

    outcome = replay_series(state.index, state.cfg, "1.1", ["archive"], now=NOW)

    assert (outcome.series_uid, outcome.queued, outcome.destinations, outcome.job_ids) == ("1.1", 2, ["archive"],
                                                                                            [job_id])
    rows = state.index.job_outbox(job_id)
    archive = [o for o in rows if o.destination == "archive"]
    assert sorted((o.sop_instance_uid, o.sop_class_uid, o.path) for o in archive) == sorted(
        (u, o.sop_class_uid, o.path) for u, o in before.items())  # the same files, the same SOP Instance UIDs
    assert {(o.state, o.attempts, o.last_status) for o in archive} == {(OutboxState.PENDING, 0,
                                                                        "queued again by replay")}
    assert {o.state for o in rows if o.destination == "pacs"} == {OutboxState.SENT}  # not named: untouched
    assert len(state.index.jobs()) == 1  # nothing segmented again


def test_replay_by_default_resends_to_where_the_series_went(tmp_path: Path) -> None:
    state = State(tmp_path, destinations=("archive",))
    state.receive("1.1")
    job_id = state.finish("1.1", sent_to=("pacs",))
    outcome = replay_series(state.index, state.cfg, "1.1", now=NOW)
    assert (outcome.queued, outcome.destinations) == (2, ["pacs"])
    assert {(o.destination, o.state) for o in state.index.job_outbox(job_id)} == {("pacs", OutboxState.PENDING)}


def test_replay_without_outbox_rows_reads_the_result_folder_and_uses_the_configured_destinations(
        tmp_path: Path) -> None:
    state = State(tmp_path, destinations=("archive",))
    state.receive("1.1")
    job_id = state.finish("1.1", sent_to=())  # the service had no destination then
    (state.cfg.job_result_dir(job_id) / "preview.png").write_bytes(b"not DICOM")
    (state.cfg.job_result_dir(job_id) / "junk.dcm").write_bytes(b"not DICOM either")
    assert result_files(str(state.cfg.job_result_dir(job_id))) == {
        (state.cfg.job_result_dir(job_id) / "seg.dcm", f"9.{job_id}.1", SEG),
        (state.cfg.job_result_dir(job_id) / "rt.dcm", f"9.{job_id}.2", RTSTRUCT)}
    assert result_files("") == set() and result_files(str(tmp_path / "absent")) == set()

    plan = plan_replay(state.index, state.cfg, "1.1")
    assert plan.destinations == ["archive"] and len(plan.items) == 2
    assert state.index.job_outbox(job_id) == []  # planning changes nothing
    assert replay_series(state.index, state.cfg, "1.1", now=NOW).queued == 2
    assert {o.destination for o in state.index.job_outbox(job_id)} == {"archive"}


def test_replay_uses_the_newest_finished_job_of_each_bundle(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.receive("1.1")
    old = state.finish("1.1")
    # a new instance reopens the series, which is segmented again
    meta = InstanceMeta("1.1.9", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.1", "CT", "1.2.840.10008.1.2.1")
    state.index.add_instance(meta, path=state.cfg.spool_dir / "x", size=1, calling_ae="T", quiet_period_s=0, now=NOW)
    new = state.finish("1.1")
    outcome = replay_series(state.index, state.cfg, "1.1", now=NOW)
    assert outcome.job_ids == [new] and outcome.queued == 2
    assert {o.state for o in state.index.job_outbox(old)} == {OutboxState.SENT}


def test_replay_refusals_name_the_bad_value_and_queue_nothing(tmp_path: Path) -> None:
    state = State(tmp_path, destinations=("archive",))
    state.receive("1.1")
    job_id = state.finish("1.1", sent_to=("pacs",))
    with pytest.raises(Permanent, match=r"destination\(s\) 'nowhere', 'x' unknown: this series was sent to "
                                        r"\['pacs'\], the configuration names \['archive'\]"):
        replay_series(state.index, state.cfg, "1.1", ["pacs", "nowhere", "x"])

    state.receive("1.2")  # still receiving
    with pytest.raises(Permanent, match=r"series 1\.2 is not finished \(series receiving, 0 job\(s\)"):
        replay_series(state.index, state.cfg, "1.2")
    state.index.dispatch("1.2", ["liver@1"], now=NOW)  # a job queued
    with pytest.raises(Permanent, match=r"series 1\.2 is not finished \(series dispatched, 1 job\(s\) queued"):
        replay_series(state.index, state.cfg, "1.2")

    state.receive("1.3")
    (failed,) = state.index.dispatch("1.3", ["liver@1"], now=NOW)
    state.index.claim_job("w", now=NOW)  # the queued job of 1.2 first
    state.index.claim_job("w", now=NOW)
    state.index.fail_job(failed, "broke", now=NOW)
    with pytest.raises(Permanent, match=rf"series 1\.3 has no finished job with results to send \(job {failed} "
                                        r"failed\)"):
        replay_series(state.index, state.cfg, "1.3")

    state.receive("1.4")
    state.index.set_series_state("1.4", SeriesState.IGNORED, "no bundle applies")
    with pytest.raises(Permanent, match=r"series 1\.4 has no finished job .*\(no jobs: series ignored\)"):
        replay_series(state.index, state.cfg, "1.4")

    (state.cfg.job_result_dir(job_id) / "seg.dcm").unlink()
    with pytest.raises(Permanent, match=r"series 1\.1: result file\(s\) .*seg\.dcm are missing; nothing was queued"):
        replay_series(state.index, state.cfg, "1.1")
    assert {o.state for o in state.index.job_outbox(job_id)} == {OutboxState.SENT}  # nothing queued


def test_replay_with_no_destination_anywhere_asks_for_one(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.receive("1.1")
    state.finish("1.1", sent_to=())
    with pytest.raises(Permanent, match=r"series 1\.1 was never queued for a destination; name one with "
                                        r"--destination NAME") as raised:
        replay_series(state.index, state.cfg, "1.1")
    assert isinstance(raised.value, NodeError) and not isinstance(raised.value, Retryable)  # the CLI exits 2
