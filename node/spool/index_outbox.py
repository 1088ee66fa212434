"""The index's outbox: results to send per destination, their attempts, dead letters and replays."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from node.model.records import OutboxItem, OutboxState
from node.spool.index_db import IndexDb


class OutboxRows(IndexDb):
    """Outbox items: due, sent, failed (retry or dead), retried, queued again."""

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
                "UPDATE outbox SET state=?, last_status=?, sent_at=?, last_attempt_at=?, attempts=attempts+1 "
                "WHERE id=?",
                (OutboxState.SENT.value, status, now, now, item_id),
            )

    def mark_attempt_failed(self, item_id: int, status: str, *, retry_at: float | None,
                            now: float | None = None) -> None:
        """Record a failed attempt; ``retry_at=None`` gives up (dead letter)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            if retry_at is None:
                db.execute(
                    "UPDATE outbox SET state=?, last_status=?, last_attempt_at=?, attempts=attempts+1 WHERE id=?",
                    (OutboxState.DEAD.value, status, now, item_id),
                )
            else:
                db.execute(
                    "UPDATE outbox SET last_status=?, last_attempt_at=?, attempts=attempts+1, next_attempt_at=? "
                    "WHERE id=?",
                    (status, now, retry_at, item_id),
                )

    # ------------------------------------------------------------------ verification
    def unverified(self, destination: str, sent_before: float, limit: int = 200) -> list[OutboxItem]:
        """Objects sent to ``destination`` before ``sent_before`` and not yet seen there, oldest first."""
        rows = self._query(
            "SELECT * FROM outbox WHERE destination=? AND state=? AND verified_at IS NULL AND sent_at <= ? "
            "ORDER BY sent_at LIMIT ?", (destination, OutboxState.SENT.value, sent_before, limit))
        return [_outbox(r) for r in rows]

    def mark_commitment_requested(self, item_ids: list[int], transaction_uid: str) -> None:
        with self._tx() as db:
            db.executemany("UPDATE outbox SET commit_txn=? WHERE id=?", [(transaction_uid, i) for i in item_ids])

    def transaction_items(self, transaction_uid: str) -> list[OutboxItem]:
        """The outbox rows a storage commitment request asked about (empty for an unknown transaction)."""
        return [_outbox(r) for r in self._query("SELECT * FROM outbox WHERE commit_txn=? AND commit_txn != ''",
                                                 (transaction_uid,))]

    def mark_verified(self, item_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE outbox SET verified_at=? WHERE id=? AND state=?", (now, item_id, OutboxState.SENT.value))

    def resend_unverified(self, item_id: int, status: str, *, give_up: bool, now: float | None = None) -> None:
        """A sent object was not found at the destination in time: send it again (same file, same UIDs), or
        (``give_up``) dead-letter it with ``status``."""
        now = time.time() if now is None else now
        state = OutboxState.DEAD if give_up else OutboxState.PENDING
        with self._tx() as db:
            db.execute("UPDATE outbox SET state=?, resends=resends+1, next_attempt_at=?, last_status=?, commit_txn='' "
                       "WHERE id=? AND state=?", (state.value, now, status, item_id, OutboxState.SENT.value))

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
        route=r["route"],
        last_attempt_at=r["last_attempt_at"],
        sent_at=r["sent_at"],
        verified_at=r["verified_at"],
        resends=r["resends"],
        commit_txn=r["commit_txn"],
    )
