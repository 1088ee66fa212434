from __future__ import annotations

from pathlib import Path

from node.model.records import InstanceMeta, JobState, OutboxState, SeriesState
from node.spool.index import Index
from node.spool.store import Spool


def meta(uid: str, series: str = "1.2.3") -> InstanceMeta:
    return InstanceMeta(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "1.2.840.10008.1.2.1")


def test_duplicate_sop_instance_is_stored_once(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    assert index.add_instance(meta("1.1"), path=tmp_path / "a", size=1, calling_ae="X", quiet_period_s=5, now=100)
    assert not index.add_instance(meta("1.1"), path=tmp_path / "a", size=1, calling_ae="X", quiet_period_s=5, now=101)
    assert index.instance_count() == 1
    assert index.series("1.2.3").instance_count == 1  # type: ignore[union-attr]


def test_series_settles_after_quiet_period_or_release(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.add_instance(meta("1.1"), path=tmp_path / "a", size=1, calling_ae="X", quiet_period_s=10, now=100)
    assert index.settled_series(now=105) == []
    assert [s.series_uid for s in index.settled_series(now=110)] == ["1.2.3"]
    index.settle_sooner({"1.2.3"}, 1, now=101)
    assert [s.series_uid for s in index.settled_series(now=102)] == ["1.2.3"]


def test_job_lifecycle_and_crash_requeue(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.add_instance(meta("1.1"), path=tmp_path / "a", size=1, calling_ae="X", quiet_period_s=0, now=100)
    (job_id,) = index.dispatch("1.2.3", ["b@1"])
    assert index.series("1.2.3").state is SeriesState.DISPATCHED  # type: ignore[union-attr]
    job = index.claim_job("w1")
    assert job is not None and job.id == job_id and job.state is JobState.RUNNING and job.attempts == 1
    assert index.claim_job("w2") is None
    assert index.requeue_running(worker="w1", max_attempts=2, reason="crashed") == [job_id]
    assert index.job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    index.claim_job("w1")
    index.requeue_running(max_attempts=2, reason="crashed")
    failed = index.job(job_id)
    assert failed is not None and failed.state is JobState.FAILED and "gave up after 2 attempts" in failed.error


def test_finish_job_fills_outbox_and_backoff_then_dead_letter(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.dispatch("1.2.3", ["b@1"])
    job = index.claim_job("w")
    assert job is not None
    index.finish_job(job.id, result_dir="r", timings="{}", outbox=[("pacs", tmp_path / "seg.dcm", "9.9", "1.2")],
                     now=50)
    (item,) = index.due_outbox(now=50)
    index.mark_attempt_failed(item.id, "refused", retry_at=80)
    assert index.due_outbox(now=60) == [] and index.next_outbox_time() == 80
    index.mark_attempt_failed(item.id, "refused", retry_at=None)
    (dead,) = index.outbox()
    assert dead.state is OutboxState.DEAD and dead.attempts == 2
    assert index.retry_dead(now=90) == 1
    (again,) = index.due_outbox(now=90)
    index.mark_sent(again.id, "0x0000 SUCCESS")
    assert index.outbox()[0].state is OutboxState.SENT


def test_spool_paths_never_use_the_uid_and_tmp_is_cleaned(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    evil = "../../etc/passwd" + "9" * 200
    path, size = spool.store(evil, [b"abc", b"def"])
    assert path.read_bytes() == b"abcdef" and size == 6
    assert path.resolve().is_relative_to((tmp_path / "spool" / "instances").resolve())
    (spool.tmp / "dead.part").write_bytes(b"x")
    assert spool.clean_tmp() == 1
