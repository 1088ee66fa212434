"""Read-only questions about the index, answered with typed records.

What ``status`` shows (series, jobs, outbox, retention figures) comes from here, so that the command
line, a web page or a metrics endpoint read the same thing the same way. Nothing here writes to the
index; the commands that change its state are in :mod:`node.spool.commands`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from node.config import NodeConfig
from node.model.records import JobRecord, JobState, OutboxItem, OutboxState, ReviewDecision, ReviewRecord, SeriesRecord
from node.spool.index import Index
from node.spool.retention import RetentionFigures, figures

#: Rows per table when the caller does not say (``status --limit``).
DEFAULT_LIMIT = 50


def open_index(cfg: NodeConfig) -> Index | None:
    """The service's index, or None when the service has not run with this state directory.

    Unlike ``Index(path)``, this never creates an index (nor the state directory) that is not there.
    """
    if not cfg.index_path.exists():
        return None
    return Index(cfg.index_path)


@dataclass(frozen=True)
class JobStatus:
    """One job with its recorded timings (JSON text; empty until the job is done)."""

    job: JobRecord
    timings: str
    review: ReviewRecord | None = None  # the reviewer's decision, for a job that was held for review
    retryable: bool = False  # failed in a way that running it again could fix (a shortage, crashes, no bundle)
    superseded_by: int | None = None  # a failed job: a later job of its series and bundle that succeeded

    @property
    def detail(self) -> str:
        """What went wrong, or else how long the steps took: the ``error / timings`` column (with the
        review's decision, or that one is awaited; for a failure, whether a later job superseded it or a
        retry could fix it)."""
        if self.job.state is JobState.AWAITING_REVIEW:
            return "awaiting review (dicom-seg-node review approve|reject JOB); " + self.timings
        if self.review is not None and self.review.decision is ReviewDecision.APPROVED:
            return f"{review_phrase(self.review)}; {self.timings}"
        if self.superseded_by is not None:
            return f"superseded by job {self.superseded_by}, which succeeded; was: {self.job.error}"
        if self.retryable:
            return f"{self.job.error} (a retry could fix this: dicom-seg-node retry --job {self.job.id})"
        return self.job.error or self.timings


def superseding(jobs: list[JobRecord]) -> dict[int, int]:
    """Failed job id → the id of a later job of the same series and bundle that succeeded (done or held for
    review): a failure it made good, such as a series dispatched before all its instances had arrived."""
    found: dict[int, int] = {}
    later: dict[tuple[str, str], int] = {}
    for job in sorted(jobs, key=lambda j: j.id, reverse=True):
        key = (job.series_uid, job.bundle)
        if job.state in (JobState.DONE, JobState.AWAITING_REVIEW):
            later.setdefault(key, job.id)
        elif job.state is JobState.FAILED and key in later:
            found[job.id] = later[key]
    return found


def review_phrase(review: ReviewRecord) -> str:
    """"approved by NAME at TIME: NOTE" (the note only when there is one)."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(review.decided_at))
    return f"{review.decision.value} by {review.reviewer} at {at}" + (f": {review.note}" if review.note else "")


@dataclass(frozen=True)
class StatusReport:
    """What the index holds: the answer to ``status``.

    ``series`` is every series (least recently received first); ``jobs`` and ``outbox`` are the
    newest ``limit`` rows of each, newest first.
    """

    instance_count: int
    series: list[SeriesRecord]
    jobs: list[JobStatus]
    outbox: list[OutboxItem]
    retention: RetentionFigures
    limit: int

    @property
    def recent_series(self) -> list[SeriesRecord]:
        """The ``limit`` most recently received series (least recent first), as the table shows them."""
        return self.series[-self.limit:]

    @property
    def dead_letters(self) -> list[OutboxItem]:
        """The dead-lettered items among :attr:`outbox` (the newest ``limit`` rows), which ``retry`` resends."""
        return [o for o in self.outbox if o.state is OutboxState.DEAD]

    def outbox_counts(self) -> dict[OutboxState, int]:
        """Items per state among :attr:`outbox` (the newest ``limit`` rows), every state present."""
        counts = dict.fromkeys(OutboxState, 0)
        for item in self.outbox:
            counts[item.state] += 1
        return counts

    def as_dict(self) -> dict[str, object]:
        """The report as ``status --json`` prints it: JSON-ready (enums as values, paths as text)."""
        return {
            "series": [s.__dict__ | {"state": s.state.value} for s in self.series],
            "jobs": [j.job.__dict__ | {"state": j.job.state.value, "retryable": j.retryable,
                                       "superseded_by": j.superseded_by,
                                       "structures": [s.__dict__ for s in j.job.structures],
                                       "review": None if j.review is None else
                                       j.review.__dict__ | {"decision": j.review.decision.value}}
                     for j in self.jobs],
            "outbox": [o.__dict__ | {"state": o.state.value, "path": str(o.path)} for o in self.outbox],
            "retention": self.retention.as_dict(),
        }


def status_report(cfg: NodeConfig, index: Index, limit: int = DEFAULT_LIMIT, now: float | None = None) -> StatusReport:
    """Series, the newest ``limit`` jobs and outbox items, and the retention figures, as of ``now``."""
    now = time.time() if now is None else now
    kept = figures(cfg, index, now=now)
    recent = index.jobs(limit)
    reviews = {r.job_id: r for r in index.reviews([j.id for j in recent])}
    retryable = index.retryable_jobs([j.id for j in recent])
    superseded = superseding(recent)
    jobs = [JobStatus(job=j, timings=index.job_timings(j.id), review=reviews.get(j.id), retryable=j.id in retryable,
                      superseded_by=superseded.get(j.id)) for j in recent]
    return StatusReport(
        instance_count=index.instance_count(),
        series=index.all_series(),
        jobs=jobs,
        outbox=index.outbox(limit),
        retention=kept,
        limit=limit,
    )


@dataclass(frozen=True)
class ReviewQueue:
    """Jobs awaiting review (oldest first) and the age of the oldest, for /readyz, the metrics and the pages."""

    jobs: list[JobRecord]
    oldest_age_s: float | None

    def as_dict(self) -> dict[str, object]:
        return {"awaiting": len(self.jobs), "oldest_age_s": self.oldest_age_s,
                "jobs": [{"job": j.id, "bundle": j.bundle, "series": j.series_uid} for j in self.jobs]}


def review_queue(index: Index, now: float | None = None) -> ReviewQueue:
    now = time.time() if now is None else now
    jobs = index.awaiting_review()
    oldest = round(now - min(j.updated for j in jobs), 1) if jobs else None
    return ReviewQueue(jobs=jobs, oldest_age_s=oldest)


@dataclass(frozen=True)
class JobDetail:
    """One job of a series as its page shows it: the job, its timings (parsed), where each result went, the review."""

    job: JobRecord
    timings: dict[str, float]
    outbox: list[OutboxItem]
    review: ReviewRecord | None


@dataclass(frozen=True)
class SeriesDetail:
    series: SeriesRecord
    jobs: list[JobDetail]


def series_detail(index: Index, series_uid: str) -> SeriesDetail | None:
    """A series with each of its jobs (oldest first); None when the index does not hold it."""
    series = index.series(series_uid)
    if series is None:
        return None
    jobs = index.series_jobs(series_uid)
    reviews = {r.job_id: r for r in index.reviews([j.id for j in jobs])}
    details = []
    for job in jobs:
        text = index.job_timings(job.id)
        timings = {str(k): float(v) for k, v in json.loads(text).items()} if text else {}
        details.append(JobDetail(job, timings, index.job_outbox(job.id), reviews.get(job.id)))
    return SeriesDetail(series, details)
