"""Who may claim and end a job, what counts against its attempts, what a shortage of resources does to it,
``retry --job/--series`` and what ``status`` says of failures, on a real index in a temporary state dir.

The service itself (kill -9, a full disk) is exercised in tests/integration/test_orphan_workers.py and
tests/integration/test_disk_full.py; here are the index's rules those rest on, the worker's classification of
failures, the main loop's failure log, and the ``retry`` and ``status`` commands run as real processes.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.errors import Conflict, NotFound, Superseded, VolumeError
from node.jobs.worker import MAX_JOB_ATTEMPTS, requeue_after_crash, resource_exhaustion, space_shortage
from node.model.records import InstanceMeta, JobState, SeriesState
from node.service.daemon import StepFailures
from node.spool.commands import retry_jobs
from node.spool.index import Index
from node.spool.index_jobs import JobOwner
from node.spool.queries import status_report

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0


def _index(tmp_path: Path, series: str = "1.2.3", n: int = 3) -> Index:
    index = Index(NodeConfig(state_dir=tmp_path).index_path)
    for k in range(n):
        meta = InstanceMeta(f"{series}.{k}", "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "1.2.840.10008.1.2.1")
        index.add_instance(meta, path=tmp_path / f"{series}.{k}", size=1, calling_ae="X", quiet_period_s=0,
                           now=NOW + k)
    return index


# ------------------------------------------------------------------------------- generations (item 2)
def test_a_worker_of_an_earlier_start_can_neither_claim_nor_end_a_job(tmp_path: Path) -> None:
    index = _index(tmp_path)
    first = index.begin_generation(pid=100)
    (job_id,) = index.dispatch("1.2.3", ["b@1"])
    job = index.claim_job("worker-0-100", generation=first)
    assert job is not None and job.state is JobState.RUNNING
    second = index.begin_generation(pid=100)  # the service restarts (same pid, as in a container)
    assert second > first and index.current_generation() == second
    assert requeue_after_crash(index, second) == [job_id]
    with pytest.raises(Superseded, match=f"start {first} of the service, but start {second}"):
        index.claim_job("worker-0-100", generation=first)
    mine = index.claim_job("worker-0-100", generation=second)
    assert mine is not None and mine.id == job_id and mine.attempts == 2
    stale = JobOwner("worker-0-100", first)  # the orphan finishes its run of the same job
    with pytest.raises(Superseded, match=f"job {job_id} is no longer held by worker worker-0-100 of start {first}"):
        index.finish_job(job_id, result_dir="r", timings="{}", outbox=[("pacs", tmp_path / "s.dcm", "9.9", "1.2")],
                         owner=stale)
    with pytest.raises(Superseded):
        index.fail_job(job_id, "broke", owner=stale)
    assert index.outbox() == [] and index.job(job_id).state is JobState.RUNNING  # type: ignore[union-attr]
    index.finish_job(job_id, result_dir="r", timings="{}", outbox=[("pacs", tmp_path / "s.dcm", "9.9", "1.2")],
                     owner=JobOwner("worker-0-100", second))
    assert index.job(job_id).state is JobState.DONE and len(index.outbox()) == 1  # type: ignore[union-attr]


# --------------------------------------------------------------------------------- attempts (item 5)
def test_crashes_of_the_service_do_not_count_but_crashes_of_the_worker_do(tmp_path: Path) -> None:
    index = _index(tmp_path)
    (job_id,) = index.dispatch("1.2.3", ["b@1"])
    for _ in range(MAX_JOB_ATTEMPTS + 2):  # the service killed while the job ran, again and again
        generation = index.begin_generation(pid=1)
        assert requeue_after_crash(index, generation) in ([], [job_id])
        assert index.claim_job("w", generation=generation) is not None
    generation = index.begin_generation(pid=1)
    requeue_after_crash(index, generation)
    job = index.job(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == MAX_JOB_ATTEMPTS + 2
    for crash in range(1, MAX_JOB_ATTEMPTS + 1):  # now its worker dies while running it
        assert index.claim_job("w", generation=generation) is not None
        index.requeue_running(worker="w", max_attempts=MAX_JOB_ATTEMPTS, reason="worker w died")
        job = index.job(job_id)
        assert job is not None
        assert job.state is (JobState.QUEUED if crash < MAX_JOB_ATTEMPTS else JobState.FAILED)
    assert f"gave up after {MAX_JOB_ATTEMPTS} attempts" in job.error
    assert index.retryable_jobs([job_id]) == {job_id}


# ------------------------------------------------------------------------------ shortages (item 3)
def test_shortages_that_may_pass_are_told_from_failures_of_the_job() -> None:
    assert resource_exhaustion(OSError(errno.ENOSPC, "No space left on device"))
    assert resource_exhaustion(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert resource_exhaustion(MemoryError())
    assert resource_exhaustion(sqlite3.OperationalError("database or disk is full"))
    try:  # a reader that wraps the OS error in the node's own
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise VolumeError("CT0001.dcm: not a readable DICOM file") from exc
    except VolumeError as wrapped:
        assert resource_exhaustion(wrapped)
    assert not resource_exhaustion(VolumeError("slices are missing"))
    assert not resource_exhaustion(OSError(errno.EACCES, "Permission denied"))
    assert not resource_exhaustion(sqlite3.OperationalError("no such table: jobs"))


def test_a_job_put_back_for_a_shortage_waits_its_backoff_and_gives_up_retryable(tmp_path: Path) -> None:
    index = _index(tmp_path)
    (job_id,) = index.dispatch("1.2.3", ["b@1"])

    def defer(at: float) -> tuple[JobState, float]:
        return index.defer_job(job_id, "resources ran out: [Errno 28] No space left on device", ran=True, now=at,
                               backoff_s=5.0, max_backoff_s=12.0, give_up_after=4)

    waits = []
    t = NOW
    for _ in range(3):
        job = index.claim_job("w", now=t)
        assert job is not None and job.id == job_id
        state, not_before = defer(t)
        assert state is JobState.QUEUED
        waits.append(not_before - t)
        assert index.claim_job("w", now=not_before - 0.1) is None  # not before its time
        t = not_before
    assert waits == [5.0, 10.0, 12.0]  # doubling, capped
    assert index.claim_job("w", now=t) is not None
    state, _ = defer(t)
    job = index.job(job_id)
    assert state is JobState.FAILED and job is not None and job.state is JobState.FAILED
    assert "No space left on device; gave up after 4 runs" in job.error
    assert index.retryable_jobs([job_id]) == {job_id}


def test_waiting_for_space_costs_no_attempt(tmp_path: Path) -> None:
    index = _index(tmp_path)
    (job_id,) = index.dispatch("1.2.3", ["b@1"])
    for k in range(5):
        assert index.claim_job("w", now=NOW + 10 * k) is not None
        index.defer_job(job_id, "waiting for disk space", ran=False, backoff_s=10.0, max_backoff_s=10.0,
                        give_up_after=2, now=NOW + 10 * k)
    job = index.job(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
    assert "waiting for disk space; tries again at" in job.error


def test_the_watermark_is_the_receivers(tmp_path: Path) -> None:
    cfg = NodeConfig(state_dir=tmp_path, min_free_disk_mb=2**40)  # more than any disk has
    shortage = space_shortage(cfg)
    assert shortage is not None and "below the 1099511627776 MB watermark (node.min_free_disk_mb)" in shortage
    assert space_shortage(NodeConfig(state_dir=tmp_path, min_free_disk_mb=0)) is None


def test_a_failing_step_is_logged_once_per_cause_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    failures = StepFailures(logging.getLogger("test.steps"))
    with caplog.at_level(logging.INFO, logger="test.steps"):
        for _ in range(56):
            failures.failed("supervise", sqlite3.OperationalError("database or disk is full"))
        failures.failed("supervise", OSError(errno.ENOSPC, "No space left on device"))
        failures.succeeded("supervise")
        failures.succeeded("supervise")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("supervise step failed") and "database or disk is full" in lines[0]
    assert caplog.records[0].exc_info is not None  # the traceback, once
    assert "then failed for another cause after failing 56 time(s)" in lines[1]
    assert lines[2].startswith("supervise step failed") and "No space left" in lines[2]
    assert "recovered after failing 1 time(s)" in lines[3]


# ------------------------------------------------------------------------------- retry (item 3)
def _failed_jobs(tmp_path: Path) -> tuple[Index, int, int, int]:
    """Series 1.2.3: job a (b@1) failed then job c (b@1) done; job b (k@1) failed. Series 4.5 has no instances."""
    index = _index(tmp_path)
    a, b = index.dispatch("1.2.3", ["b@1", "k@1"])
    for job_id, error in ((a, "slices are missing"), (b, "resources ran out")):
        assert index.claim_job("w") is not None
        index.fail_job(job_id, error, retryable=job_id == b)
    (c,) = index.dispatch("1.2.3", ["b@1"])
    assert index.claim_job("w") is not None
    index.finish_job(c, result_dir="r", timings="{}", outbox=[])
    return index, a, b, c


def test_retry_runs_failed_jobs_again_and_refuses_others(tmp_path: Path) -> None:
    index, a, b, c = _failed_jobs(tmp_path)
    with pytest.raises(NotFound, match="job 99 is not in the index"):
        retry_jobs(index, [99])
    with pytest.raises(Conflict, match=f"job {c} is done, not failed"):
        retry_jobs(index, [a, c])
    assert index.job(a).state is JobState.FAILED  # type: ignore[union-attr]  # nothing queued
    with pytest.raises(NotFound, match="series 9.9 is not in the index"):
        retry_jobs(index, series_uid="9.9")
    assert retry_jobs(index, series_uid="1.2.3") == [b]  # a was superseded by c; b is the newest of k@1
    job = index.job(b)
    assert job is not None and job.state is JobState.QUEUED and job.error == ""
    assert index.retryable_jobs([b]) == set()
    with pytest.raises(Conflict, match="series 1.2.3 has no failed job to run again"):
        retry_jobs(index, series_uid="1.2.3")
    assert retry_jobs(index, [a]) == [a]  # named explicitly, it runs again


def test_retry_refuses_a_job_whose_instances_are_gone(tmp_path: Path) -> None:
    index = Index(NodeConfig(state_dir=tmp_path).index_path)
    (job_id,) = index.dispatch("7.7", ["b@1"])
    index.fail_job(job_id, "broke")
    with pytest.raises(NotFound, match="instances of series 7.7 are no longer stored"):
        retry_jobs(index, [job_id])


def test_status_marks_superseded_and_retryable_failures(tmp_path: Path) -> None:
    index, a, b, c = _failed_jobs(tmp_path)
    report = status_report(NodeConfig(state_dir=tmp_path), index)
    by_id = {j.job.id: j for j in report.jobs}
    assert by_id[a].superseded_by == c and by_id[a].detail.startswith(f"superseded by job {c}, which succeeded")
    assert by_id[b].retryable and f"a retry could fix this: dicom-seg-node retry --job {b}" in by_id[b].detail
    assert not by_id[c].retryable and by_id[c].superseded_by is None
    jobs = {j["id"]: j for j in report.as_dict()["jobs"]}  # type: ignore[attr-defined]
    assert (jobs[a]["superseded_by"], jobs[b]["retryable"]) == (c, True)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args, "--state-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_retry_and_status_commands(tmp_path: Path) -> None:
    index, a, b, c = _failed_jobs(tmp_path)
    index.close()
    status = json.loads(_cli(tmp_path, "status", "--json").stdout)
    marks = {j["id"]: (j["retryable"], j["superseded_by"]) for j in status["jobs"]}
    assert marks == {a: (False, c), b: (True, None), c: (False, None)}
    unknown = _cli(tmp_path, "retry", "--job", "42")
    assert unknown.returncode == 2 and "job 42 is not in the index" in unknown.stderr
    done = _cli(tmp_path, "retry", "--job", str(c))
    assert done.returncode == 2 and f"job {c} is done, not failed" in done.stderr
    ran = _cli(tmp_path, "retry", "--job", str(a), "--series", "1.2.3")
    assert ran.returncode == 0, ran.stderr
    assert f"job(s) {a}, {b} queued to run again" in ran.stdout
    status = json.loads(_cli(tmp_path, "status", "--json").stdout)
    assert {j["id"]: j["state"] for j in status["jobs"]} == {a: "queued", b: "queued", c: "done"}


# -------------------------------------------------------------------------- refused series (item 4)
def test_a_series_with_refused_instances_waits_for_the_rest(tmp_path: Path) -> None:
    index = _index(tmp_path, n=2)
    index.settle_sooner({"1.2.3"}, 1, now=NOW + 2, refused={"1.2.3"})  # the association ended with refusals
    series = index.series("1.2.3")
    assert series is not None and series.state is SeriesState.RECEIVING and "refused" in series.note
    assert index.settled_series(now=NOW + 600, refused_hold_s=3600) == []
    assert [s.series_uid for s in index.settled_series(now=NOW + 3603, refused_hold_s=3600)] == ["1.2.3"]
    index.settle_sooner({"1.2.3"}, 1, now=NOW + 700)  # the sender sent the rest, without refusals
    assert [s.series_uid for s in index.settled_series(now=NOW + 702, refused_hold_s=3600)] == ["1.2.3"]
    index.note_refused({"1.2.3"}, now=NOW + 800)  # a refusal while an association is still open
    assert index.settled_series(now=NOW + 900, refused_hold_s=3600) == []
