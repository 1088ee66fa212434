"""Read-only questions about the index, answered with typed records.

What ``status`` shows (series, jobs, outbox, retention figures) comes from here, so that the command
line, a web page or a metrics endpoint read the same thing the same way. Nothing here writes to the
index; the commands that change its state are in :mod:`node.spool.commands`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from node.config import NodeConfig
from node.model.records import JobRecord, OutboxItem, OutboxState, SeriesRecord
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

    @property
    def detail(self) -> str:
        """What went wrong, or else how long the steps took: the ``error / timings`` column."""
        return self.job.error or self.timings


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
            "jobs": [j.job.__dict__ | {"state": j.job.state.value} for j in self.jobs],
            "outbox": [o.__dict__ | {"state": o.state.value, "path": str(o.path)} for o in self.outbox],
            "retention": self.retention.as_dict(),
        }


def status_report(cfg: NodeConfig, index: Index, limit: int = DEFAULT_LIMIT, now: float | None = None) -> StatusReport:
    """Series, the newest ``limit`` jobs and outbox items, and the retention figures, as of ``now``."""
    now = time.time() if now is None else now
    kept = figures(cfg, index, now=now)
    jobs = [JobStatus(job=j, timings=index.job_timings(j.id)) for j in index.jobs(limit)]
    return StatusReport(
        instance_count=index.instance_count(),
        series=index.all_series(),
        jobs=jobs,
        outbox=index.outbox(limit),
        retention=kept,
        limit=limit,
    )
