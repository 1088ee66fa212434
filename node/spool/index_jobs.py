"""The index's jobs: dispatched per settled series and bundle, claimed by workers, ended."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from node.model.records import JobRecord, JobState, OutboxState, SeriesState, StructureVolume
from node.spool.index_db import IndexDb


class JobRows(IndexDb):
    """Jobs: queue, claim, finish (queueing the results in the outbox), fail, requeue, read."""

    def dispatch(self, series_uid: str, bundles: list[str], note: str = "", now: float | None = None, *,
                 priority: int = 0) -> list[int]:
        """Mark a settled series dispatched and queue one job per bundle, atomically; the jobs carry the
        series' sender (for round-robin) and ``priority`` (from the rule that matched it)."""
        now = time.time() if now is None else now
        ids: list[int] = []
        with self._tx() as db:
            db.execute(
                "UPDATE series SET state=?, note=? WHERE series_uid=?",
                (SeriesState.DISPATCHED.value, note, series_uid),
            )
            sender = db.execute("SELECT calling_ae FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            calling_ae = sender["calling_ae"] if sender is not None else ""
            for bundle in bundles:
                cur = db.execute(
                    "INSERT INTO jobs (series_uid, bundle, state, created, updated, priority, calling_ae) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (series_uid, bundle, JobState.QUEUED.value, now, now, priority, calling_ae),
                )
                ids.append(int(cur.lastrowid or 0))
        return ids

    def claim_job(self, worker: str, now: float | None = None) -> JobRecord | None:
        """Take the next job: the highest priority first; within it, the sender (calling AE) whose jobs
        were least recently taken, so a long queue from one sender does not starve another; then the
        oldest job of that sender."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                """SELECT q.* FROM jobs q
                   LEFT JOIN (SELECT calling_ae, MAX(claimed_at) AS served FROM jobs
                              WHERE claimed_at IS NOT NULL GROUP BY calling_ae) s ON s.calling_ae = q.calling_ae
                   WHERE q.state=?
                   ORDER BY q.priority DESC, COALESCE(s.served, 0), q.id LIMIT 1""",
                (JobState.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state=?, worker=?, attempts=attempts+1, updated=?, claimed_at=? WHERE id=?",
                (JobState.RUNNING.value, worker, now, now, row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return _job(row)

    def finish_job(
        self,
        job_id: int,
        *,
        result_dir: str,
        timings: str,
        outbox: list[tuple[str, Path, str, str]] | list[tuple[str, Path, str, str, str]],
        note: str = "",
        now: float | None = None,
        held: Collection[str] = (),
        structures: Sequence[StructureVolume] = (),
    ) -> JobState:
        """Mark a job done and queue its results for each destination, in one transaction.

        ``outbox`` holds (destination name, file path, SOP Instance UID, SOP Class UID[, route: why the
        destination takes the object]); ``note`` says where the results went, or why nowhere. The rows of
        the destinations in ``held`` wait for a reviewer (:class:`OutboxState.HELD`), and the job then
        ends ``awaiting_review`` instead of ``done``; the state it ended in is returned.
        """
        now = time.time() if now is None else now
        holding = any(entry[0] in held for entry in outbox)
        state = JobState.AWAITING_REVIEW if holding else JobState.DONE
        found = json.dumps([[s.name, s.volume_ml] for s in structures])
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, result_dir=?, timings=?, error='', note=?, updated=?, structures=? "
                "WHERE id=?",
                (state.value, result_dir, timings, note, now, found, job_id),
            )
            for entry in outbox:
                destination, path, sop_uid, sop_class = entry[:4]
                route = entry[4] if len(entry) > 4 else ""
                row_state = OutboxState.HELD if destination in held else OutboxState.PENDING
                db.execute(
                    """INSERT INTO outbox (job_id, destination, path, sop_instance_uid, sop_class_uid,
                           state, next_attempt_at, route) VALUES (?,?,?,?,?,?,?,?)
                       ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET
                           job_id=excluded.job_id, path=excluded.path, state=excluded.state,
                           attempts=0, next_attempt_at=excluded.next_attempt_at, route=excluded.route""",
                    (job_id, destination, str(path), sop_uid, sop_class, row_state.value, now, route),
                )
        return state

    def fail_job(self, job_id: int, error: str, now: float | None = None,
                 state: JobState = JobState.FAILED) -> None:
        """End a job failed (or ``state=DECLINED``: the bundle does not apply) with its reason."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, error=?, updated=? WHERE id=?",
                (state.value, error, now, job_id),
            )

    def requeue_running(self, *, worker: str | None = None, max_attempts: int, reason: str) -> list[int]:
        """Return running jobs (of one worker, or all) to the queue after a crash.

        A job that has already been attempted ``max_attempts`` times ends failed with ``reason``.
        """
        now = time.time()
        with self._tx() as db:
            sql = "SELECT id, attempts FROM jobs WHERE state=?"
            args: tuple[object, ...] = (JobState.RUNNING.value,)
            if worker is not None:
                sql += " AND worker=?"
                args += (worker,)
            rows = db.execute(sql, args).fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state=?, error=?, updated=? WHERE id=?",
                        (JobState.FAILED.value, f"{reason}; gave up after {row['attempts']} attempts", now, row["id"]),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state=?, worker='', error=?, updated=? WHERE id=?",
                        (JobState.QUEUED.value, reason, now, row["id"]),
                    )
        return [int(r["id"]) for r in rows]

    def job(self, job_id: int) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, limit: int = 100) -> list[JobRecord]:
        return [_job(r) for r in self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def job_timings(self, job_id: int) -> str:
        rows = self._query("SELECT timings FROM jobs WHERE id=?", (job_id,))
        return str(rows[0]["timings"]) if rows else ""

    # ------------------------------------------------------------------ replay
    def series_jobs(self, series_uid: str) -> list[JobRecord]:
        return [_job(r) for r in self._query("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))]


def _job(r: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=r["id"],
        series_uid=r["series_uid"],
        bundle=r["bundle"],
        state=JobState(r["state"]),
        attempts=r["attempts"],
        created=r["created"],
        updated=r["updated"],
        error=r["error"],
        result_dir=r["result_dir"],
        priority=r["priority"],
        calling_ae=r["calling_ae"],
        note=r["note"],
        structures=tuple(StructureVolume(str(n), float(v)) for n, v in json.loads(r["structures"] or "[]")),
    )
