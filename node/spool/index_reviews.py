"""The index's review gate: jobs held for review, and each reviewer's decision (approve or reject).

A decision is one transaction: the job must still be awaiting review (so a job is approved once, and a
rejected job is never approved), its held outbox rows become pending (approved: the sender delivers
them) or discarded (rejected), and the decision is recorded with who made it, when and why.
"""

from __future__ import annotations

import sqlite3
import time

from node.errors import Conflict, NotFound
from node.model.records import JobRecord, JobState, OutboxState, ReviewDecision, ReviewRecord
from node.spool.index_db import IndexDb
from node.spool.index_jobs import _job


class ReviewRows(IndexDb):
    """Jobs awaiting review, the decisions, and the figures /readyz and the metrics show."""

    def awaiting_review(self) -> list[JobRecord]:
        """Jobs held for review, oldest first."""
        rows = self._query("SELECT * FROM jobs WHERE state=? ORDER BY updated, id", (JobState.AWAITING_REVIEW.value,))
        return [_job(r) for r in rows]

    def review(self, job_id: int) -> ReviewRecord | None:
        rows = self._query("SELECT * FROM reviews WHERE job_id=?", (job_id,))
        return _review(rows[0]) if rows else None

    def reviews(self, job_ids: list[int] | None = None, limit: int = 200) -> list[ReviewRecord]:
        """The decisions on ``job_ids`` (or the newest ``limit``), newest first."""
        if job_ids is None:
            rows = self._query("SELECT * FROM reviews ORDER BY decided_at DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(job_ids))
            rows = self._query(f"SELECT * FROM reviews WHERE job_id IN ({marks}) ORDER BY decided_at DESC",
                               tuple(job_ids)) if job_ids else []
        return [_review(r) for r in rows]

    def review_counts(self) -> dict[ReviewDecision, int]:
        counts = dict.fromkeys(ReviewDecision, 0)
        for r in self._query("SELECT decision, COUNT(*) AS n FROM reviews GROUP BY decision"):
            counts[ReviewDecision(r["decision"])] = int(r["n"])
        return counts

    def decide_review(self, job_id: int, decision: ReviewDecision, *, reviewer: str, note: str = "",
                      now: float | None = None) -> ReviewRecord:
        """Approve (queue the held copies) or reject (discard them) a job awaiting review; record who did it.

        Raises :class:`NotFound` for a job the index does not hold and :class:`Conflict` for one that is not
        awaiting review (already decided, or never held); nothing changes then.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} is not in the index: it never existed, or retention deleted its series")
            if row["state"] != JobState.AWAITING_REVIEW.value:
                earlier = db.execute("SELECT * FROM reviews WHERE job_id=?", (job_id,)).fetchone()
                if earlier is not None:
                    done = _review(earlier)
                    raise Conflict(f"job {job_id} was already {done.decision.value} by {done.reviewer} at "
                                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(done.decided_at))}; "
                                   "a decision is final")
                raise Conflict(f"job {job_id} is {row['state']}, not awaiting review; only a held result is "
                               "approved or rejected")
            approved = decision is ReviewDecision.APPROVED
            released = db.execute(
                "UPDATE outbox SET state=?, next_attempt_at=?, last_status=? WHERE job_id=? AND state=?",
                (OutboxState.PENDING.value if approved else OutboxState.DISCARDED.value, now,
                 f"{decision.value} by {reviewer}", job_id, OutboxState.HELD.value),
            ).rowcount
            db.execute("UPDATE jobs SET state=?, updated=? WHERE id=?",
                       (JobState.DONE.value if approved else JobState.REJECTED.value, now, job_id))
            if not approved:
                db.execute("UPDATE jobs SET error=? WHERE id=?", (f"rejected by {reviewer}: {note}", job_id))
            db.execute("INSERT INTO reviews (job_id, decision, reviewer, decided_at, note, released) "
                       "VALUES (?,?,?,?,?,?)", (job_id, decision.value, reviewer, now, note, int(released)))
        return ReviewRecord(job_id, decision, reviewer, now, note, int(released))


def _review(r: sqlite3.Row) -> ReviewRecord:
    return ReviewRecord(job_id=int(r["job_id"]), decision=ReviewDecision(r["decision"]), reviewer=r["reviewer"],
                        decided_at=float(r["decided_at"]), note=r["note"], released=int(r["released"]))
