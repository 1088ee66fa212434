"""The index: SQLite in WAL mode. This module holds the only SQL in the node.

One ``Index`` object per process; its methods are thread-safe (one connection behind a lock), which
suits the receiver's association threads. Worker processes open their own ``Index`` on the same file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.model.records import (
    InstanceMeta,
    JobRecord,
    JobState,
    OutboxItem,
    OutboxState,
    SeriesRecord,
    SeriesState,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    settle_at REAL NOT NULL,
    open_associations INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    bundle TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    result_dir TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    UNIQUE(destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);
-- Files and result folders whose index rows retention has deleted (node.spool.retention): written in
-- the transaction that deletes the rows, cleared once the files are gone, finished at start.
CREATE TABLE IF NOT EXISTS pending_deletions (
    path TEXT PRIMARY KEY,
    is_dir INTEGER NOT NULL,
    queued_at REAL NOT NULL
);
"""

#: One row per series: how much it holds and whether anything about it is unfinished (retention).
_SERIES_USAGE = """
WITH j AS (
    SELECT series_uid, MAX(updated) AS updated, SUM(state IN (?, ?)) AS active
    FROM jobs GROUP BY series_uid
), o AS (
    SELECT jobs.series_uid AS series_uid, MAX(outbox.sent_at) AS sent_at,
           SUM(outbox.state = ?) AS pending, SUM(outbox.state = ?) AS dead
    FROM outbox JOIN jobs ON outbox.job_id = jobs.id GROUP BY jobs.series_uid
), i AS (
    SELECT series_uid, SUM(size) AS bytes FROM instances GROUP BY series_uid
)
SELECT s.series_uid, s.state, s.instance_count,
       MAX(s.last_received, COALESCE(j.updated, 0), COALESCE(o.sent_at, 0)) AS last_activity,
       COALESCE(j.active, 0) AS active_jobs, COALESCE(o.pending, 0) AS pending,
       COALESCE(o.dead, 0) AS dead, COALESCE(i.bytes, 0) AS bytes
FROM series s LEFT JOIN j ON j.series_uid = s.series_uid LEFT JOIN o ON o.series_uid = s.series_uid
     LEFT JOIN i ON i.series_uid = s.series_uid
"""
_USAGE_ARGS = (JobState.QUEUED.value, JobState.RUNNING.value, OutboxState.PENDING.value, OutboxState.DEAD.value)


@dataclass(frozen=True)
class SeriesUsage:
    """What retention needs to know about one series."""

    series_uid: str
    state: SeriesState
    instance_count: int
    last_activity: float  # latest of: last instance received, a job's last update, a result's delivery
    active_jobs: int  # queued or running
    pending: int  # outbox items still to send
    dead: int  # dead letters (kept for ``retry``)
    spool_bytes: int

    @property
    def finished(self) -> bool:
        """Settled, every job ended, every result delivered: retention may delete it."""
        return (self.state is not SeriesState.RECEIVING and self.active_jobs == 0
                and self.pending == 0 and self.dead == 0)


@dataclass(frozen=True)
class DeletedSeries:
    """The rows of one series are gone; these files and folders are still to be removed."""

    series_uid: str
    last_activity: float
    instance_count: int
    spool_bytes: int
    files: list[Path]
    dirs: list[Path]


class Index:
    """Instances, series, jobs and the outbox, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of this process (kill -9) but the last few
        # may roll back on power loss. The spool file itself is fsynced (file and directory) before
        # Success is answered, and the service reconciles the index with the spool at start
        # (``node.spool.recover``), so an acknowledged instance is never lost; it saves one fsync
        # (about 4 ms here) on every received instance.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ instances
    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def add_instance(
        self,
        meta: InstanceMeta,
        *,
        path: Path,
        size: int,
        calling_ae: str,
        quiet_period_s: float,
        now: float | None = None,
    ) -> bool:
        """Record a stored instance and touch its series. Returns False for a duplicate SOP UID."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.sop_instance_uid,
                    meta.sop_class_uid,
                    meta.study_uid,
                    meta.series_uid,
                    meta.modality,
                    meta.transfer_syntax,
                    str(path),
                    size,
                    calling_ae,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                """INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, instance_count,
                       first_received, last_received, settle_at, state)
                   VALUES (?,?,?,?,1,?,?,?,?)
                   ON CONFLICT(series_uid) DO UPDATE SET
                       instance_count = instance_count + 1,
                       last_received = excluded.last_received,
                       settle_at = excluded.settle_at,
                       state = excluded.state,
                       note = ''""",
                (
                    meta.series_uid,
                    meta.study_uid,
                    meta.modality,
                    meta.sop_class_uid,
                    now,
                    now,
                    now + quiet_period_s,
                    SeriesState.RECEIVING.value,
                ),
            )
        return True

    def all_instance_paths(self) -> set[str]:
        return {r["path"] for r in self._query("SELECT path FROM instances")}

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self._query("SELECT path FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))
        return [Path(r["path"]) for r in rows]

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    # ------------------------------------------------------------------ series
    def settle_sooner(self, series_uids: set[str], settle_s: float, now: float | None = None) -> None:
        """An association that sent these series was released: let them settle after ``settle_s``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for uid in series_uids:
                db.execute(
                    "UPDATE series SET settle_at = MIN(settle_at, ?) WHERE series_uid=? AND state=?",
                    (now + settle_s, uid, SeriesState.RECEIVING.value),
                )

    def settled_series(self, now: float | None = None) -> list[SeriesRecord]:
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM series WHERE state=? AND settle_at <= ? ORDER BY last_received",
            (SeriesState.RECEIVING.value, now),
        )
        return [_series(r) for r in rows]

    def set_series_state(self, series_uid: str, state: SeriesState, note: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, note=? WHERE series_uid=?", (state.value, note, series_uid))

    def series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return _series(rows[0]) if rows else None

    def all_series(self) -> list[SeriesRecord]:
        return [_series(r) for r in self._query("SELECT * FROM series ORDER BY last_received")]

    # ------------------------------------------------------------------ jobs
    def dispatch(self, series_uid: str, bundles: list[str], note: str = "", now: float | None = None) -> list[int]:
        """Mark a settled series dispatched and queue one job per bundle, atomically."""
        now = time.time() if now is None else now
        ids: list[int] = []
        with self._tx() as db:
            db.execute(
                "UPDATE series SET state=?, note=? WHERE series_uid=?",
                (SeriesState.DISPATCHED.value, note, series_uid),
            )
            for bundle in bundles:
                cur = db.execute(
                    "INSERT INTO jobs (series_uid, bundle, state, created, updated) VALUES (?,?,?,?,?)",
                    (series_uid, bundle, JobState.QUEUED.value, now, now),
                )
                ids.append(int(cur.lastrowid or 0))
        return ids

    def claim_job(self, worker: str, now: float | None = None) -> JobRecord | None:
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY id LIMIT 1", (JobState.QUEUED.value,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state=?, worker=?, attempts=attempts+1, updated=? WHERE id=?",
                (JobState.RUNNING.value, worker, now, row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return _job(row)

    def finish_job(
        self,
        job_id: int,
        *,
        result_dir: str,
        timings: str,
        outbox: list[tuple[str, Path, str, str]],
        now: float | None = None,
    ) -> None:
        """Mark a job done and queue its results for each destination, in one transaction.

        ``outbox`` holds (destination name, file path, SOP Instance UID, SOP Class UID).
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, result_dir=?, timings=?, error='', updated=? WHERE id=?",
                (JobState.DONE.value, result_dir, timings, now, job_id),
            )
            for destination, path, sop_uid, sop_class in outbox:
                db.execute(
                    """INSERT INTO outbox (job_id, destination, path, sop_instance_uid, sop_class_uid,
                           state, next_attempt_at) VALUES (?,?,?,?,?,?,?)
                       ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET
                           job_id=excluded.job_id, path=excluded.path, state=excluded.state,
                           attempts=0, next_attempt_at=excluded.next_attempt_at""",
                    (job_id, destination, str(path), sop_uid, sop_class, OutboxState.PENDING.value, now),
                )

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

    # ------------------------------------------------------------------ outbox
    def due_outbox(self, now: float | None = None, limit: int = 100) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM outbox WHERE state=? AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (OutboxState.PENDING.value, now, limit),
        )
        return [_outbox(r) for r in rows]

    def next_outbox_time(self) -> float | None:
        rows = self._query(
            "SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state=?", (OutboxState.PENDING.value,)
        )
        value = rows[0]["t"]
        return float(value) if value is not None else None

    def mark_sent(self, item_id: int, status: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state=?, last_status=?, sent_at=?, attempts=attempts+1 WHERE id=?",
                (OutboxState.SENT.value, status, now, item_id),
            )

    def mark_attempt_failed(self, item_id: int, status: str, *, retry_at: float | None) -> None:
        """Record a failed attempt; ``retry_at=None`` gives up (dead letter)."""
        with self._tx() as db:
            if retry_at is None:
                db.execute(
                    "UPDATE outbox SET state=?, last_status=?, attempts=attempts+1 WHERE id=?",
                    (OutboxState.DEAD.value, status, item_id),
                )
            else:
                db.execute(
                    "UPDATE outbox SET last_status=?, attempts=attempts+1, next_attempt_at=? WHERE id=?",
                    (status, retry_at, item_id),
                )

    def outbox(self, limit: int = 200) -> list[OutboxItem]:
        return [_outbox(r) for r in self._query("SELECT * FROM outbox ORDER BY id DESC LIMIT ?", (limit,))]

    def retry_dead(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state=?, attempts=0, next_attempt_at=? WHERE state=?",
                (OutboxState.PENDING.value, now, OutboxState.DEAD.value),
            )
            return int(cur.rowcount)

    # ------------------------------------------------------------------ replay
    def series_jobs(self, series_uid: str) -> list[JobRecord]:
        return [_job(r) for r in self._query("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))]

    def job_outbox(self, job_id: int) -> list[OutboxItem]:
        return [_outbox(r) for r in self._query("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))]

    def requeue_results(self, items: list[tuple[int, str, Path, str, str]], *, note: str,
                        now: float | None = None) -> int:
        """Queue results for sending (again), in one transaction; return how many rows were queued.

        ``items`` holds (job id, destination name, file path, SOP Instance UID, SOP Class UID). A row
        that exists for that destination and UID (sent, pending or dead) is reset to pending with no
        attempts; ``note`` becomes its last status until the next attempt.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            for job_id, destination, path, sop_uid, sop_class in items:
                db.execute(
                    """INSERT INTO outbox (job_id, destination, path, sop_instance_uid, sop_class_uid,
                           state, next_attempt_at, last_status) VALUES (?,?,?,?,?,?,?,?)
                       ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET
                           job_id=excluded.job_id, path=excluded.path, state=excluded.state, attempts=0,
                           next_attempt_at=excluded.next_attempt_at, last_status=excluded.last_status""",
                    (job_id, destination, str(path), sop_uid, sop_class, OutboxState.PENDING.value, now, note),
                )
        return len(items)

    # ------------------------------------------------------------------ retention
    def series_usage(self) -> list[SeriesUsage]:
        """Every series with its last activity, size and unfinished work, least recently active first."""
        rows = self._query(_SERIES_USAGE + " ORDER BY last_activity, s.series_uid", _USAGE_ARGS)
        return [_usage(r) for r in rows]

    def spool_bytes(self) -> int:
        """Bytes of every indexed instance (the spool, as the index knows it)."""
        return int(self._query("SELECT COALESCE(SUM(size), 0) AS n FROM instances")[0]["n"])

    def delete_series(self, series_uid: str, *, not_after: float,
                      result_dir_of: Callable[[int], Path], now: float | None = None) -> DeletedSeries | None:
        """Delete a finished series' rows (instances, series, jobs, outbox) in one transaction.

        Checked again inside the transaction: the series must still be finished (see
        :attr:`SeriesUsage.finished`) and its last activity no later than ``not_after``; otherwise
        nothing changes and None is returned. Its spool files and result folders (``result_dir_of``
        of each job, and the folders of its outbox files) are recorded in ``pending_deletions`` in
        the same transaction; the caller removes them and then calls :meth:`clear_pending_deletions`.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(_SERIES_USAGE + " WHERE s.series_uid = ?", (*_USAGE_ARGS, series_uid)).fetchone()
            if row is None:
                return None
            usage = _usage(row)
            if not usage.finished or usage.last_activity > not_after:
                return None
            files = [Path(r["path"]) for r in
                     db.execute("SELECT path FROM instances WHERE series_uid=?", (series_uid,)).fetchall()]
            jobs = db.execute("SELECT id, result_dir FROM jobs WHERE series_uid=?", (series_uid,)).fetchall()
            job_ids = [int(r["id"]) for r in jobs]
            dirs = {result_dir_of(i) for i in job_ids} | {Path(r["result_dir"]) for r in jobs if r["result_dir"]}
            marks = ",".join("?" * len(job_ids))
            if job_ids:
                for r in db.execute(f"SELECT path FROM outbox WHERE job_id IN ({marks})", job_ids).fetchall():
                    dirs.add(Path(r["path"]).parent)
                db.execute(f"DELETE FROM outbox WHERE job_id IN ({marks})", job_ids)
            db.executemany("INSERT OR REPLACE INTO pending_deletions VALUES (?,?,?)",
                           [(str(p), 0, now) for p in files] + [(str(d), 1, now) for d in sorted(dirs)])
            db.execute("DELETE FROM jobs WHERE series_uid=?", (series_uid,))
            db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
        return DeletedSeries(series_uid=series_uid, last_activity=usage.last_activity,
                             instance_count=len(files), spool_bytes=usage.spool_bytes, files=files,
                             dirs=sorted(dirs))

    def pending_deletions(self) -> tuple[list[Path], list[Path]]:
        """Files and folders whose rows are deleted but which may still be on disk: (files, folders)."""
        rows = self._query("SELECT path, is_dir FROM pending_deletions ORDER BY path")
        return [Path(r["path"]) for r in rows if not r["is_dir"]], [Path(r["path"]) for r in rows if r["is_dir"]]

    def clear_pending_deletions(self, paths: list[Path]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM pending_deletions WHERE path=?", [(str(p),) for p in paths])

    def referenced_instance_paths(self, paths: list[Path]) -> set[str]:
        """Which of these spool paths an instance row refers to (one received again since)."""
        found: set[str] = set()
        names = [str(p) for p in paths]
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            rows = self._query(f"SELECT path FROM instances WHERE path IN ({','.join('?' * len(chunk))})",
                               tuple(chunk))
            found.update(r["path"] for r in rows)
        return found

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this object's lock: no other thread of this process writes the index meanwhile.

        Retention removes a spool file only while holding it, after checking that no instance row
        refers to the path, so that the receiver (same process, same ``Index``) cannot record an
        instance between the check and the removal.
        """
        with self._lock:
            yield


def _usage(r: sqlite3.Row) -> SeriesUsage:
    return SeriesUsage(
        series_uid=r["series_uid"],
        state=SeriesState(r["state"]),
        instance_count=int(r["instance_count"]),
        last_activity=float(r["last_activity"]),
        active_jobs=int(r["active_jobs"]),
        pending=int(r["pending"]),
        dead=int(r["dead"]),
        spool_bytes=int(r["bytes"]),
    )


def _series(r: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(
        series_uid=r["series_uid"],
        study_uid=r["study_uid"],
        modality=r["modality"],
        sop_class_uid=r["sop_class_uid"],
        instance_count=r["instance_count"],
        first_received=r["first_received"],
        last_received=r["last_received"],
        state=SeriesState(r["state"]),
        note=r["note"],
    )


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
    )


def _outbox(r: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=r["id"],
        job_id=r["job_id"],
        destination=r["destination"],
        path=Path(r["path"]),
        sop_instance_uid=r["sop_instance_uid"],
        sop_class_uid=r["sop_class_uid"],
        state=OutboxState(r["state"]),
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        last_status=r["last_status"],
    )
