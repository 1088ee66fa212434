"""Retention policy on a real index, spool and results folder in a temporary state directory."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.config import NodeConfig, load_config
from node.errors import ConfigError
from node.model.records import InstanceMeta, JobState, OutboxState, SeriesState
from node.service.daemon import Service
from node.spool.index import Index
from node.spool.retention import Retention, figures, tree_bytes
from node.spool.store import Spool
from tests.harness.synthetic_ct import write_ct_series

DAY = 86400.0
NOW = 1_700_000_000.0


class State:
    """A state directory with the node's real spool, index and results layout."""

    def __init__(self, root: Path, **retention: float) -> None:
        changes: dict[str, Any] = {f"retention_{k}": v for k, v in retention.items()}
        self.cfg = replace(NodeConfig(state_dir=root), **changes)
        self.spool = Spool(self.cfg.spool_dir)
        self.index = Index(self.cfg.index_path)

    def receive(self, uid: str, *, at: float, n: int = 3, size: int = 2000) -> list[Path]:
        paths = []
        for k in range(n):
            sop = f"{uid}.{k}"
            path, written = self.spool.store(sop, [bytes([k % 256]) * size])
            meta = InstanceMeta(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", uid, "CT", "1.2.840.10008.1.2.1")
            self.index.add_instance(meta, path=path, size=written, calling_ae="T", quiet_period_s=1, now=at)
            paths.append(path)
        return paths

    def segment(self, uid: str, *, at: float, outcome: str = "sent") -> int:
        """Dispatch ``uid`` and take its job to ``outcome``: queued, running, failed, declined, pending,
        dead or sent (the last three: done, with two result files in the outbox for 'pacs')."""
        (job_id,) = self.index.dispatch(uid, ["b@1"], now=at)
        if outcome == "queued":
            return job_id
        job = self.index.claim_job("w", now=at)
        assert job is not None and job.id == job_id
        result_dir = self.cfg.job_result_dir(job_id)
        result_dir.mkdir(parents=True)
        (result_dir / "preview.png").write_bytes(b"p" * 100)
        if outcome == "running":
            return job_id
        if outcome in ("failed", "declined"):
            state = JobState.FAILED if outcome == "failed" else JobState.DECLINED
            self.index.fail_job(job_id, "a reason", now=at, state=state)
            return job_id
        objects: list[tuple[str, Path, str, str]] = []
        for kind in ("seg", "rtstruct"):
            path = result_dir / f"{kind}.dcm"
            path.write_bytes(b"r" * 500)
            objects.append(("pacs", path, f"2.25.{job_id}{len(objects)}", "1.2.840.10008.5.1.4.1.1.66.4"))
        self.index.finish_job(job_id, result_dir=str(result_dir), timings="{}", outbox=objects, now=at)
        for item in self.index.job_outbox(job_id):
            if outcome == "sent":
                self.index.mark_sent(item.id, "0x0000 SUCCESS", now=at)
            elif outcome == "dead":
                self.index.mark_attempt_failed(item.id, "could not associate", retry_at=None)
            else:
                self.index.mark_attempt_failed(item.id, "could not associate", retry_at=at + 60)
        return job_id

    def finished_series(self, uid: str, *, at: float, outcome: str = "sent") -> tuple[list[Path], Path]:
        files = self.receive(uid, at=at)
        job_id = self.segment(uid, at=at, outcome=outcome)
        return files, self.cfg.job_result_dir(job_id)

    def present(self, uid: str) -> bool:
        return self.index.series(uid) is not None


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(tmp_path / "state", keep_days=7.0)


def test_a_finished_series_past_keep_days_goes_with_its_files_rows_and_results(state: State) -> None:
    old_files, old_results = state.finished_series("1.1", at=NOW - 8 * DAY)
    young_files, young_results = state.finished_series("1.2", at=NOW - 1 * DAY)
    old_job = state.index.series_jobs("1.1")[0].id
    assert all(p.is_file() for p in old_files) and old_results.is_dir()

    report = Retention(state.cfg, state.index).run(now=NOW)

    assert report.deleted == ["1.1"] and report.complete
    assert not state.present("1.1")
    assert not any(p.exists() for p in old_files)
    assert not old_results.exists()
    assert state.index.series_jobs("1.1") == [] and state.index.job_outbox(old_job) == []
    assert state.index.referenced_instance_paths(old_files) == set()
    assert state.index.pending_deletions() == ([], [])
    assert report.freed_bytes == sum(2000 for _ in old_files) + 500 * 2 + 100
    # The young series is untouched.
    assert state.present("1.2") and all(p.is_file() for p in young_files) and young_results.is_dir()
    assert state.index.instance_count() == len(young_files)


def test_last_activity_counts_delivery_not_only_reception(state: State) -> None:
    files = state.receive("1.1", at=NOW - 30 * DAY)
    state.segment("1.1", at=NOW - 2 * DAY)  # segmented and delivered two days ago (a retried delivery)
    assert Retention(state.cfg, state.index).run(now=NOW).deleted == []
    assert all(p.is_file() for p in files)


@pytest.mark.parametrize("outcome", ["queued", "running", "pending", "dead"])
def test_unfinished_or_undelivered_series_are_never_deleted_by_age(state: State, outcome: str) -> None:
    files, _ = state.finished_series("1.1", at=NOW - 100 * DAY, outcome=outcome)
    report = Retention(state.cfg, state.index).run(now=NOW)
    assert report.deleted == []
    assert state.present("1.1") and all(p.is_file() for p in files)


def test_a_series_still_receiving_is_never_deleted(state: State) -> None:
    files = state.receive("1.1", at=NOW - 100 * DAY)  # never settled
    assert Retention(state.cfg, state.index).run(now=NOW).deleted == []
    assert all(p.is_file() for p in files)


@pytest.mark.parametrize("outcome", ["failed", "declined", "ignored"])
def test_failed_declined_and_ignored_series_are_deleted_by_age(state: State, outcome: str) -> None:
    files = state.receive("1.1", at=NOW - 8 * DAY)
    if outcome == "ignored":
        state.index.set_series_state("1.1", SeriesState.IGNORED, "no model applies")
    else:
        state.segment("1.1", at=NOW - 8 * DAY, outcome=outcome)
    assert Retention(state.cfg, state.index).run(now=NOW).deleted == ["1.1"]
    assert not any(p.exists() for p in files)


def test_dead_letters_stay_until_retry_delivers_them(state: State) -> None:
    files, results = state.finished_series("1.1", at=NOW - 8 * DAY, outcome="dead")
    retention = Retention(state.cfg, state.index)
    assert retention.run(now=NOW).deleted == []
    assert state.index.retry_dead(now=NOW - 8 * DAY) == 2  # `retry`; the files are still there to send
    assert all(i.path.is_file() for i in state.index.due_outbox(now=NOW))
    for item in state.index.due_outbox(now=NOW):
        state.index.mark_sent(item.id, "0x0000 SUCCESS", now=NOW - 8 * DAY)
    assert retention.run(now=NOW).deleted == ["1.1"]
    assert not results.exists() and not any(p.exists() for p in files)


def test_over_max_spool_gb_the_oldest_finished_series_go_first(tmp_path: Path) -> None:
    state = State(tmp_path / "state", keep_days=365.0)
    held, _ = state.finished_series("1.0", at=NOW - 9 * DAY, outcome="dead")  # oldest, but undelivered
    sizes = {}
    for n, uid in enumerate(["1.1", "1.2", "1.3", "1.4"]):
        state.finished_series(uid, at=NOW - (4 - n) * DAY)
        sizes[uid] = sum(p.stat().st_size for p in state.index.instance_paths(uid)) + tree_bytes(
            state.cfg.job_result_dir(state.index.series_jobs(uid)[0].id))
    total = state.index.spool_bytes() + tree_bytes(state.cfg.results_dir)
    # Room for everything but the two oldest finished series (and half of another, as a margin).
    limit = total - sizes["1.1"] - sizes["1.2"] + sizes["1.3"] // 2
    state.cfg = replace(state.cfg, retention_max_spool_gb=limit / 1e9)

    report = Retention(state.cfg, state.index).run(now=NOW)

    assert report.deleted == ["1.1", "1.2"]
    assert report.total_bytes <= limit and not report.limit_unmet
    assert report.total_bytes == state.index.spool_bytes() + tree_bytes(state.cfg.results_dir)
    assert state.present("1.0") and all(p.is_file() for p in held)
    assert state.present("1.3") and state.present("1.4")


def test_a_limit_that_only_unfinished_series_exceed_is_reported_not_forced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = State(tmp_path / "state", keep_days=365.0, max_spool_gb=1e-9)  # 1 byte
    state.finished_series("1.1", at=NOW - 9 * DAY, outcome="dead")
    state.finished_series("1.2", at=NOW - 8 * DAY, outcome="pending")
    state.finished_series("1.3", at=NOW - 7 * DAY, outcome="sent")
    with caplog.at_level(logging.WARNING, logger="node.spool.retention"):
        report = Retention(state.cfg, state.index).run(now=NOW)
    assert report.deleted == ["1.3"] and report.limit_unmet
    assert state.present("1.1") and state.present("1.2")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "cannot be met" in warning and "1 with dead letters" in warning and "1 with results waiting" in warning


def test_runs_at_the_first_turn_then_every_interval(state: State) -> None:
    state.cfg = replace(state.cfg, retention_interval_s=300.0)
    retention = Retention(state.cfg, state.index)
    assert retention.maybe_run(tick=1000.0) is not None
    assert retention.maybe_run(tick=1299.0) is None
    assert retention.maybe_run(tick=1300.0) is not None


def test_a_pass_out_of_time_goes_on_at_the_next_turn(state: State) -> None:
    state.finished_series("1.1", at=NOW - 8 * DAY)
    state.finished_series("1.2", at=NOW - 8 * DAY)
    retention = Retention(state.cfg, state.index)
    report = retention.run(now=NOW, budget_s=-1.0)
    assert not report.complete and report.deleted == []
    assert retention.run(now=NOW).deleted == ["1.1", "1.2"]


def _store_ct(state: State, tmp_path: Path, *, at: float) -> tuple[str, list[Path]]:
    """Store a real (tiny) CT series, as the receiver would: files that reconcile can read back."""
    ct = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    paths = []
    for f in ct.files:
        ds = dcmread(f, stop_before_pixels=True)
        meta = InstanceMeta(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                            str(ds.SeriesInstanceUID), "CT", str(ds.file_meta.TransferSyntaxUID))
        path, size = state.spool.store(meta.sop_instance_uid, [f.read_bytes()])
        state.index.add_instance(meta, path=path, size=size, calling_ae="T", quiet_period_s=1, now=at)
        paths.append(path)
    state.segment(ct.series_uid, at=at)
    return ct.series_uid, paths


def test_a_crash_between_rows_and_files_is_finished_at_start_not_resurrected(state: State, tmp_path: Path) -> None:
    """The service's real start-up path: pending deletions are finished before reconcile reads the spool."""
    uid, files = _store_ct(state, tmp_path, at=NOW - 8 * DAY)
    results = state.cfg.job_result_dir(state.index.series_jobs(uid)[0].id)
    # The pass's transaction commits, then the node dies before removing a single file.
    deleted = state.index.delete_series(uid, not_after=NOW, result_dir_of=state.cfg.job_result_dir)
    assert deleted is not None and sorted(deleted.files) == sorted(files) and results in deleted.dirs
    assert all(p.is_file() for p in files) and results.is_dir()
    state.index.close()

    service = Service(replace(state.cfg, bundles=("body-threshold",)))
    try:
        service._recover()
        assert service.index.instance_count() == 0  # reconcile found nothing to index again
        assert service.index.series(uid) is None
        assert service.index.pending_deletions() == ([], [])
    finally:
        service.index.close()
        service._lock_file.close()
    assert not any(p.exists() for p in files) and not results.exists()


def test_an_instance_received_again_during_a_deletion_keeps_its_file(state: State, tmp_path: Path) -> None:
    uid, files = _store_ct(state, tmp_path, at=NOW - 8 * DAY)
    state.index.delete_series(uid, not_after=NOW, result_dir_of=state.cfg.job_result_dir)
    # Between the transaction and the removal the modality sends one instance again.
    again = dcmread(files[0], stop_before_pixels=True)
    meta = InstanceMeta(str(again.SOPInstanceUID), str(again.SOPClassUID), str(again.StudyInstanceUID), uid, "CT",
                        str(again.file_meta.TransferSyntaxUID))
    path, size = state.spool.store(meta.sop_instance_uid, [files[0].read_bytes()])
    state.index.add_instance(meta, path=path, size=size, calling_ae="T", quiet_period_s=1, now=NOW)
    assert Retention(state.cfg, state.index).finish_pending() == len(files) + 1
    assert files[0].is_file() and not files[1].exists() and not files[2].exists()
    assert state.index.pending_deletions() == ([], [])
    assert state.index.instance_paths(uid) == [files[0]]


def test_figures_for_status(state: State) -> None:
    state.finished_series("1.1", at=NOW - 8 * DAY)  # deletable now
    state.finished_series("1.2", at=NOW - 9 * DAY, outcome="dead")
    state.finished_series("1.3", at=NOW - 1 * DAY, outcome="pending")
    state.finished_series("1.4", at=NOW - 1 * DAY)
    spooled = sum(p.stat().st_size for p in state.spool.all_files())
    f = figures(state.cfg, state.index, now=NOW)
    assert f.spool_bytes == spooled and f.instance_count == 12
    assert f.results_bytes == tree_bytes(state.cfg.results_dir) > 0
    assert f.series_count == 4 and f.deletable_now == 1
    assert f.held == 2 and f.held_dead_letters == 1
    assert f.oldest_activity_age_s == pytest.approx(9 * DAY) and f.oldest_received_age_s == pytest.approx(9 * DAY)
    assert f.as_dict()["total_bytes"] == f.spool_bytes + f.results_bytes


def test_requeue_results_resets_sent_rows_and_adds_a_destination(state: State) -> None:
    state.finished_series("1.1", at=NOW)
    job_id = state.index.series_jobs("1.1")[0].id
    sent = state.index.job_outbox(job_id)
    assert {o.state for o in sent} == {OutboxState.SENT}
    items = [(job_id, dest, o.path, o.sop_instance_uid, o.sop_class_uid) for dest in ("pacs", "tps") for o in sent]
    assert state.index.requeue_results(items, note="queued again by replay", now=NOW + 5) == 4
    again = state.index.job_outbox(job_id)
    assert len(again) == 4 and {o.state for o in again} == {OutboxState.PENDING}
    assert {o.attempts for o in again} == {0} and {o.last_status for o in again} == {"queued again by replay"}
    assert {(o.destination, o.sop_instance_uid) for o in again} == {(d, o.sop_instance_uid) for d in ("pacs", "tps")
                                                                   for o in sent}
    assert len(state.index.due_outbox(now=NOW + 5)) == 4


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_retention_config_keys(tmp_path: Path) -> None:
    cfg = load_config(_write_config(tmp_path, "[retention]\nkeep_days = 0.0001\nmax_spool_gb = 2\ninterval_s = 1\n"))
    assert (cfg.retention_keep_days, cfg.retention_max_spool_gb, cfg.retention_interval_s) == (0.0001, 2.0, 1.0)
    defaults = load_config(None)
    assert (defaults.retention_keep_days, defaults.retention_max_spool_gb, defaults.retention_interval_s) == (7, 0, 300)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("keep_days = 0\n", "key 'retention.keep_days' is 0.0; expected a positive number"),
        ("max_spool_gb = -1\n", "key 'retention.max_spool_gb' is -1.0; expected a non-negative number"),
        ('interval_s = "5m"\n', "key 'retention.interval_s' is '5m'; expected float"),
        ("keep_day = 3\n", "unknown key(s) 'retention.keep_day'"),
    ],
)
def test_retention_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(_write_config(tmp_path, "[retention]\n" + text))
    assert needle in str(err.value)
