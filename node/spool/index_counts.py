"""What the service's metrics and readiness checks ask the index: rows per state, the oldest queued job,
each destination's last attempt and last delivery, and a write probe.

The service asks these on its own ``Index`` (its own connection and lock, in its HTTP thread), so a
scrape never waits on the lock the receiver takes for every instance; in WAL mode the reads do not
wait on the other processes' writers either.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.model.records import JobState, OutboxState, SeriesState
from node.spool.index_db import IndexDb

#: A path no file has: the row the write probe inserts (and rolls back) in ``pending_deletions``.
_PROBE_PATH = "(readiness probe: never committed)"


@dataclass(frozen=True)
class DestinationReach:
    """When a destination was last tried and last took an object (None: not since its rows exist), and
    the status its latest attempt recorded."""

    destination: str
    last_attempt_at: float | None
    last_sent_at: float | None
    last_status: str = ""


class CountRows(IndexDb):
    """Counts for metrics, destination reach and the write probe for readiness."""

    def series_counts(self) -> dict[SeriesState, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")
        return {SeriesState(r["state"]): int(r["n"]) for r in rows}

    def job_counts(self) -> dict[tuple[str, JobState], int]:
        """Jobs per (bundle id, state)."""
        rows = self._query("SELECT bundle, state, COUNT(*) AS n FROM jobs GROUP BY bundle, state")
        return {(str(r["bundle"]), JobState(r["state"])): int(r["n"]) for r in rows}

    def oldest_queued_job_created(self) -> float | None:
        """When the longest-waiting queued job was created (None: the queue is empty)."""
        rows = self._query("SELECT MIN(created) AS t FROM jobs WHERE state=?", (JobState.QUEUED.value,))
        value = rows[0]["t"]
        return float(value) if value is not None else None

    def outbox_counts(self) -> dict[tuple[str, OutboxState], int]:
        """Outbox rows per (destination name, state)."""
        rows = self._query("SELECT destination, state, COUNT(*) AS n FROM outbox GROUP BY destination, state")
        return {(str(r["destination"]), OutboxState(r["state"])): int(r["n"]) for r in rows}

    def destination_reach(self) -> dict[str, DestinationReach]:
        """Per destination with outbox rows: its last attempt, its last delivery and the latest attempt's status."""
        # SQLite fills a bare column next to MAX() from the row that has the maximum: the latest attempt's status.
        rows = self._query("SELECT destination, MAX(last_attempt_at) AS tried, last_status FROM outbox "
                           "GROUP BY destination")
        sent = {str(r["destination"]): r["sent"] for r in
                self._query("SELECT destination, MAX(sent_at) AS sent FROM outbox GROUP BY destination")}
        return {str(r["destination"]): DestinationReach(str(r["destination"]), r["tried"], sent.get(r["destination"]),
                                                        str(r["last_status"] or "")) for r in rows}

    def probe_write(self, timeout_s: float = 2.0) -> None:
        """Take the write lock, write a row and roll it back; raises ``sqlite3.Error`` when the index cannot be
        written (read-only file or folder, a lock held longer than ``timeout_s``, a damaged file)."""
        with self._lock:
            (previous,) = self._db.execute("PRAGMA busy_timeout").fetchone()
            self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("INSERT OR REPLACE INTO pending_deletions (path, is_dir, queued_at) "
                                     "VALUES (?, 0, 0)", (_PROBE_PATH,))
                finally:
                    self._db.execute("ROLLBACK")
            finally:
                self._db.execute(f"PRAGMA busy_timeout={int(previous)}")
