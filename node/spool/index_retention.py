"""What retention asks of the index: each series' usage, deleting a finished series' rows, and the
files still to remove (``pending_deletions``)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.model.records import UNFINISHED_JOBS, OutboxState, SeriesState
from node.spool.index_db import IndexDb

#: One row per series: how much it holds and whether anything about it is unfinished (retention).
_SERIES_USAGE = """
WITH j AS (
    SELECT series_uid, MAX(updated) AS updated, SUM(state IN (?, ?, ?)) AS active
    FROM jobs GROUP BY series_uid
), o AS (
    SELECT jobs.series_uid AS series_uid, MAX(outbox.sent_at) AS sent_at,
           SUM(outbox.state = ?) AS pending, SUM(outbox.state = ?) AS dead
    FROM outbox JOIN jobs ON outbox.job_id = jobs.id GROUP BY jobs.series_uid
), i AS (
    SELECT series_uid, SUM(size) AS bytes FROM instances GROUP BY series_uid
), q AS (  -- edit QA: an edited set that came back keeps the CT it was compared on (and our result) as long as itself
    SELECT ct_series_uid AS series_uid, MAX(compared_at) AS compared_at FROM qa_sets GROUP BY ct_series_uid
)
SELECT s.series_uid, s.state, s.instance_count,
       MAX(s.last_received, COALESCE(j.updated, 0), COALESCE(o.sent_at, 0), COALESCE(q.compared_at, 0))
           AS last_activity,
       COALESCE(j.active, 0) AS active_jobs, COALESCE(o.pending, 0) AS pending,
       COALESCE(o.dead, 0) AS dead, COALESCE(i.bytes, 0) AS bytes
FROM series s LEFT JOIN j ON j.series_uid = s.series_uid LEFT JOIN o ON o.series_uid = s.series_uid
     LEFT JOIN i ON i.series_uid = s.series_uid LEFT JOIN q ON q.series_uid = s.series_uid
"""
_USAGE_ARGS = (*(s.value for s in UNFINISHED_JOBS), OutboxState.PENDING.value, OutboxState.DEAD.value)


@dataclass(frozen=True)
class SeriesUsage:
    """What retention needs to know about one series."""

    series_uid: str
    state: SeriesState
    instance_count: int
    last_activity: float  # latest of: last instance received, a job's last update, a result's delivery
    active_jobs: int  # queued, running or awaiting review
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


class RetentionRows(IndexDb):
    """Series usage, deletion of finished series, pending file deletions."""

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
