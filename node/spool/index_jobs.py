"""The index's jobs: dispatched per settled series and bundle, claimed by workers, ended.

Every start of the service records a row in ``service_runs`` (inside the state directory's lock); its number,
the *generation*, is stamped on the jobs its workers claim. A worker that names its generation (its
:class:`JobOwner`) can neither claim nor end a job once a later start owns the index: an orphan of a killed
service writes nothing (:class:`node.errors.Superseded`). At a start, the jobs an earlier start left running
go back to the queue without counting against their limit (the service stopping is not the job's fault);
only a crash of the worker that ran the job counts (``crashes``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import Superseded
from node.model.enums import JobKind
from node.model.records import JobRecord, JobState, OutboxState, SeriesState, StructureVolume
from node.spool.index_db import IndexDb

#: One row per start of the service on this index; created by the first start that knows of it.
SERVICE_RUNS = """CREATE TABLE IF NOT EXISTS service_runs (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    started REAL NOT NULL
)"""


@dataclass(frozen=True)
class JobOwner:
    """Who holds a running job: a worker (by name) of one start of the service (its generation)."""

    worker: str
    generation: int


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

    def begin_generation(self, pid: int, now: float | None = None) -> int:
        """Record a start of the service (made while it holds the state directory's lock); return its generation."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(SERVICE_RUNS)
            cur = db.execute("INSERT INTO service_runs (pid, started) VALUES (?,?)", (pid, now))
        return int(cur.lastrowid or 0)

    def current_generation(self) -> int:
        """The generation of the latest start of the service on this index (0 before the first)."""
        with self._lock:
            return _generation(self._db)

    def claim_job(self, worker: str, now: float | None = None, *, generation: int | None = None) -> JobRecord | None:
        """Take the next job: the highest priority first; within it, the sender (calling AE) whose jobs
        were least recently taken, so a long queue from one sender does not starve another; then the
        oldest job of that sender. A job put back for lack of resources waits until its backoff has passed.

        With ``generation`` (the start of the service the worker belongs to), a worker of an earlier start
        claims nothing: :class:`Superseded` is raised, and the worker should exit.
        """
        claimed = self.claim_series_jobs(worker, now, generation=generation, limit=1)
        return claimed[0] if claimed else None

    def claim_series_jobs(self, worker: str, now: float | None = None, *, generation: int | None = None,
                          limit: int = 8) -> list[JobRecord]:
        """Take the next job (as :meth:`claim_job` chooses it) and, with it, up to ``limit`` − 1 other queued
        jobs of the same series, so that one worker reads and assembles the series once for all of them.

        Each job is claimed on its own row, as :meth:`claim_job` claims one (running, this worker and
        generation, an attempt counted): a crash of the worker returns every one of them to the queue and
        counts against each. Only segmentation jobs that have never crashed their worker, due now, join
        one another: a job whose worker crashed while it ran is claimed alone from then on, so a job that
        brings its worker down cannot use up the attempts of the other bundles of its series. Returns the
        claimed jobs, the first one first; [] when none is due.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            if generation is not None:
                current = _generation(db)
                if current != generation:
                    raise Superseded(f"worker {worker} belongs to start {generation} of the service, but start "
                                     f"{current} now owns the index {self.path}; it claims nothing more")
            row = db.execute(
                """SELECT q.* FROM jobs q
                   LEFT JOIN (SELECT calling_ae, MAX(claimed_at) AS served FROM jobs
                              WHERE claimed_at IS NOT NULL GROUP BY calling_ae) s ON s.calling_ae = q.calling_ae
                   WHERE q.state=? AND q.not_before <= ?
                   ORDER BY q.priority DESC, COALESCE(s.served, 0), q.id LIMIT 1""",
                (JobState.QUEUED.value, now),
            ).fetchone()
            if row is None:
                return []
            ids = [int(row["id"])]
            if limit > 1 and int(row["crashes"]) == 0 and row["kind"] == JobKind.SEGMENT.value:
                ids += [int(r["id"]) for r in db.execute(
                    "SELECT id FROM jobs WHERE series_uid=? AND state=? AND not_before <= ? AND crashes=0 AND kind=? "
                    "AND id<>? ORDER BY priority DESC, id LIMIT ?",
                    (row["series_uid"], JobState.QUEUED.value, now, JobKind.SEGMENT.value, row["id"], limit - 1))]
            rows = []
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state=?, worker=?, attempts=attempts+1, updated=?, claimed_at=?, generation=? "
                    "WHERE id=?",
                    (JobState.RUNNING.value, worker, now, now, generation or 0, job_id),
                )
                rows.append(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
        return [_job(r) for r in rows]

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
        owner: JobOwner | None = None,
    ) -> JobState:
        """Mark a job done and queue its results for each destination, in one transaction.

        ``outbox`` holds (destination name, file path, SOP Instance UID, SOP Class UID[, route: why the
        destination takes the object]); ``note`` says where the results went, or why nowhere. The rows of
        the destinations in ``held`` wait for a reviewer (:class:`OutboxState.HELD`), and the job then
        ends ``awaiting_review`` instead of ``done``; the state it ended in is returned. With ``owner``, a
        worker that no longer holds the job (a later start of the service took it over) records nothing and
        queues nothing: :class:`Superseded` is raised.
        """
        now = time.time() if now is None else now
        holding = any(entry[0] in held for entry in outbox)
        state = JobState.AWAITING_REVIEW if holding else JobState.DONE
        found = json.dumps([[s.name, s.volume_ml] for s in structures])
        with self._tx() as db:
            _check_owner(db, job_id, owner)
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
                 state: JobState = JobState.FAILED, *, owner: JobOwner | None = None, retryable: bool = False) -> None:
        """End a job failed (or ``state=DECLINED``: the bundle does not apply) with its reason; ``retryable``
        marks a failure that running the job again could fix (``status`` says so). ``owner``: as
        :meth:`finish_job`."""
        now = time.time() if now is None else now
        with self._tx() as db:
            _check_owner(db, job_id, owner)
            db.execute(
                "UPDATE jobs SET state=?, error=?, updated=?, retryable=? WHERE id=?",
                (state.value, error, now, int(retryable), job_id),
            )

    def defer_job(self, job_id: int, reason: str, *, ran: bool, backoff_s: float, max_backoff_s: float,
                  give_up_after: int, owner: JobOwner | None = None,
                  now: float | None = None) -> tuple[JobState, float]:
        """Put a running job back in the queue for lack of resources (a full disk, memory), to be claimed
        again no sooner than a backoff from ``now``: ``backoff_s`` doubled for each earlier such run, at
        most ``max_backoff_s``.

        ``ran``: the job ran and met the shortage; it counts as a step of the backoff, and after
        ``give_up_after`` such runs the job ends failed, marked retryable. Otherwise it never started (free
        space below the watermark): neither its attempts nor its backoff count this claim, and it waits
        ``backoff_s``. Returns the state the job is left in and the time it may run again (0 once failed).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            _check_owner(db, job_id, owner)
            row = db.execute("SELECT deferrals FROM jobs WHERE id=?", (job_id,)).fetchone()
            deferrals = int(row["deferrals"]) if row is not None else 0
            if ran and deferrals + 1 >= give_up_after:
                db.execute(
                    "UPDATE jobs SET state=?, error=?, updated=?, deferrals=?, retryable=1 WHERE id=?",
                    (JobState.FAILED.value, f"{reason}; gave up after {deferrals + 1} runs that met it",
                     now, deferrals + 1, job_id),
                )
                return JobState.FAILED, 0.0
            wait = min(max_backoff_s, backoff_s * 2 ** deferrals) if ran else backoff_s
            at = time.strftime("%H:%M:%S", time.localtime(now + wait))
            db.execute(
                "UPDATE jobs SET state=?, worker='', error=?, updated=?, not_before=?, deferrals=deferrals+?, "
                "attempts=attempts-? WHERE id=?",
                (JobState.QUEUED.value, f"{reason}; tries again at {at}", now, now + wait, int(ran),
                 int(not ran), job_id),
            )
        return JobState.QUEUED, now + wait

    def requeue_running(self, *, worker: str | None = None, max_attempts: int, reason: str) -> list[int]:
        """Return running jobs (of one worker, or all) to the queue after their worker crashed.

        A crash while the job ran may be the job's own doing (memory, a fault in its engine): it counts,
        and a job whose worker has crashed ``max_attempts`` times ends failed with ``reason``.
        """
        now = time.time()
        with self._tx() as db:
            sql = "SELECT id, crashes FROM jobs WHERE state=?"
            args: tuple[object, ...] = (JobState.RUNNING.value,)
            if worker is not None:
                sql += " AND worker=?"
                args += (worker,)
            rows = db.execute(sql, args).fetchall()
            for row in rows:
                crashes = int(row["crashes"]) + 1
                if crashes >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state=?, error=?, updated=?, crashes=?, retryable=1 WHERE id=?",
                        (JobState.FAILED.value, f"{reason}; gave up after {crashes} attempts that ended in a crash "
                         "of their worker", now, crashes, row["id"]),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state=?, worker='', error=?, updated=?, crashes=? WHERE id=?",
                        (JobState.QUEUED.value, reason, now, crashes, row["id"]),
                    )
        return [int(r["id"]) for r in rows]

    def requeue_abandoned(self, generation: int, reason: str, now: float | None = None) -> list[int]:
        """At a start of the service (``generation``): return the jobs an earlier start left running to the
        queue. The service stopping or crashing is not the job's fault: it counts against no limit."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state=? AND generation<>?",
                              (JobState.RUNNING.value, generation)).fetchall()
            db.execute("UPDATE jobs SET state=?, worker='', error=?, updated=? WHERE state=? AND generation<>?",
                       (JobState.QUEUED.value, reason, now, JobState.RUNNING.value, generation))
        return [int(r["id"]) for r in rows]

    def requeue_failed(self, job_ids: Collection[int], now: float | None = None) -> list[int]:
        """Queue failed jobs to run again from the start (``retry --job``); return the ids that were failed."""
        now = time.time() if now is None else now
        done: list[int] = []
        with self._tx() as db:
            for job_id in job_ids:
                cur = db.execute(
                    "UPDATE jobs SET state=?, worker='', error='', updated=?, crashes=0, deferrals=0, not_before=0, "
                    "retryable=0 WHERE id=? AND state=?",
                    (JobState.QUEUED.value, now, job_id, JobState.FAILED.value),
                )
                if cur.rowcount:
                    done.append(job_id)
        return done

    def retryable_jobs(self, job_ids: Collection[int]) -> set[int]:
        """Those of ``job_ids`` that failed in a way running them again could fix."""
        ids = list(job_ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT id FROM jobs WHERE retryable=1 AND state=? AND id IN ({marks})",
                           (JobState.FAILED.value, *ids))
        return {int(r["id"]) for r in rows}

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


def _generation(db: sqlite3.Connection) -> int:
    try:
        row = db.execute("SELECT MAX(generation) AS g FROM service_runs").fetchone()
    except sqlite3.OperationalError:  # no such table: no start of the service has recorded itself yet
        return 0
    return int(row["g"] or 0)


def _check_owner(db: sqlite3.Connection, job_id: int, owner: JobOwner | None) -> None:
    """Raise :class:`Superseded` unless ``owner`` (when given) still holds job ``job_id``."""
    if owner is None:
        return
    row = db.execute("SELECT state, worker, generation FROM jobs WHERE id=?", (job_id,)).fetchone()
    held = row is not None and (row["state"], row["worker"], row["generation"]) == (
        JobState.RUNNING.value, owner.worker, owner.generation)
    if not held:
        now_held = "gone" if row is None else (f"{row['state']}, held by {row['worker'] or 'no worker'} of start "
                                               f"{row['generation']}")
        raise Superseded(f"job {job_id} is no longer held by worker {owner.worker} of start {owner.generation} of "
                         f"the service (it is {now_held}); its outcome is not recorded")


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
        kind=JobKind(r["kind"]),
    )
