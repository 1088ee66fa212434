"""Commands that change the index's state on an operator's request: ``retry``, ``replay`` and ``review``.

They raise the node's errors (:class:`node.errors.Permanent`) with a sentence that names the bad value
and print nothing, so that the command line, a web page or an API can call them alike. The running
service notices the queued rows and sends them; these functions only queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.config import NodeConfig
from node.errors import Conflict, NotFound, Permanent
from node.model.records import UNFINISHED_JOBS, JobRecord, JobState, ReviewDecision, ReviewRecord, SeriesState
from node.spool.index import Index

#: The last status of a row that ``replay`` queued, until the service's next attempt.
REPLAY_NOTE = "queued again by replay"


#: The longest note a reviewer may record (a reason, not an essay; the audit record stays small).
MAX_REVIEW_NOTE = 2000


def decide_review(index: Index, job_id: int, decision: ReviewDecision, *, reviewer: str, note: str = "",
                  now: float | None = None) -> ReviewRecord:
    """Approve (its held copies are queued for sending) or reject (they are discarded) a job awaiting review.

    A rejection needs a reason. Raises :class:`Permanent` for a missing reason or an overlong note,
    :class:`node.errors.NotFound` for an unknown job, :class:`node.errors.Conflict` for a job not awaiting
    review (already approved or rejected: a decision is final, and nothing is sent twice).
    """
    note = " ".join(note.split())
    if decision is ReviewDecision.REJECTED and not note:
        raise Permanent(f"rejecting job {job_id} needs a reason (what is wrong with the contours)")
    if len(note) > MAX_REVIEW_NOTE:
        raise Permanent(f"the note on job {job_id} is {len(note)} characters; at most {MAX_REVIEW_NOTE} are kept")
    if not reviewer.strip():
        raise Permanent(f"a decision on job {job_id} needs the reviewer's name")
    return index.decide_review(job_id, decision, reviewer=reviewer.strip(), note=note, now=now)


def retry_dead_letters(index: Index, now: float | None = None) -> int:
    """Queue every dead-lettered outbox item for sending again (at ``now``); return how many."""
    return index.retry_dead(now=time.time() if now is None else now)


def retry_jobs(index: Index, job_ids: Sequence[int] = (), series_uid: str | None = None,
               now: float | None = None) -> list[int]:
    """Queue failed jobs to run again from the start (``retry --job ID`` / ``--series UID``); return their ids.

    ``job_ids`` names failed jobs; ``series_uid`` takes, for each bundle, the series' newest job when it
    failed (an older failure that a later job superseded is not run again). Raises :class:`NotFound` for an
    unknown job or series, or a series whose instances retention has deleted, and :class:`Conflict` for a
    job that did not fail (done, queued, running, declined, awaiting or after review) or a series without a
    failed job; nothing is queued then.
    """
    chosen: list[JobRecord] = []
    for job_id in job_ids:
        job = index.job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} is not in the index {index.path}")
        if job.state is not JobState.FAILED:
            raise Conflict(f"job {job_id} is {job.state.value}, not failed: only a failed job can be run again"
                           + (" (a declined bundle does not apply to the series)" if job.state is JobState.DECLINED
                              else ""))
        chosen.append(job)
    if series_uid is not None:
        if index.series(series_uid) is None:
            raise NotFound(f"series {series_uid} is not in the index {index.path}")
        jobs = index.series_jobs(series_uid)
        newest = {j.bundle: j for j in jobs}  # by id, oldest first: the newest job of each bundle wins
        failed = [j for j in newest.values() if j.state is JobState.FAILED]
        if not failed:
            states = ", ".join(f"job {j.id} {j.state.value}" for j in newest.values()) or "no jobs"
            raise Conflict(f"series {series_uid} has no failed job to run again (newest per bundle: {states})")
        chosen.extend(j for j in failed if j.id not in {c.id for c in chosen})
    for job in chosen:
        if not index.instance_paths(job.series_uid):
            raise NotFound(f"job {job.id}: the instances of series {job.series_uid} are no longer stored (retention "
                           "deleted them); the sender must send the series again")
    return index.requeue_failed([j.id for j in chosen], now=time.time() if now is None else now)


@dataclass(frozen=True)
class ReplayObject:
    """One result object of a finished job: what replay queues for each destination."""

    job_id: int
    path: Path
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class ReplayPlan:
    """What replaying a series would queue: every object for every destination."""

    series_uid: str
    jobs: list[JobRecord]  # the newest finished job of each bundle
    objects: list[ReplayObject]
    destinations: list[str]

    @property
    def items(self) -> list[tuple[int, str, Path, str, str]]:
        """Rows for :meth:`Index.requeue_results`: (job id, destination, path, SOP Instance UID, SOP Class UID)."""
        return [(o.job_id, dest, o.path, o.sop_instance_uid, o.sop_class_uid)
                for dest in self.destinations for o in self.objects]


@dataclass(frozen=True)
class ReplayOutcome:
    """What ``replay`` queued."""

    series_uid: str
    queued: int  # outbox rows queued (objects × destinations)
    destinations: list[str]
    job_ids: list[int]


def plan_replay(index: Index, cfg: NodeConfig, series_uid: str,
                destinations: Sequence[str] | None = None) -> ReplayPlan:
    """Check that a series can be replayed and say what would be queued; change nothing.

    The objects are those of the newest finished job of each bundle (as queued in the outbox, or else
    the DICOM files in the job's result folder). ``destinations`` are names the series was sent to or
    that the configuration names; none (None or empty) means every destination the series was sent
    to, or else every configured one. Raises :class:`Permanent` naming the series, destination or
    file when the series is unknown, not finished, has no results, no destination, or missing files.
    """
    uid = series_uid
    series = index.series(uid)
    if series is None:
        raise Permanent(f"series {uid} is not in the index at {cfg.index_path}: it was never received here, or "
                        "retention deleted it (see retention.keep_days and retention.max_spool_gb)")
    jobs = index.series_jobs(uid)
    busy = [j for j in jobs if j.state in UNFINISHED_JOBS]
    if series.state is SeriesState.RECEIVING or busy:
        raise Permanent(f"series {uid} is not finished (series {series.state.value}, "
                        f"{len(busy)} job(s) queued, running or awaiting review); replay it once its jobs "
                        "have ended")
    # The newest finished job of each bundle: a series that was reopened and segmented again has
    # older results that the newer ones replace.
    done = list({j.bundle: j for j in jobs if j.state is JobState.DONE}.values())
    if not done:
        states = ", ".join(f"job {j.id} {j.state.value}" for j in jobs) or f"no jobs: series {series.state.value}"
        raise Permanent(f"series {uid} has no finished job with results to send ({states})")
    objects: list[ReplayObject] = []
    known: set[str] = set()
    for job in done:
        rows = index.job_outbox(job.id)
        known.update(r.destination for r in rows)
        found = {(r.path, r.sop_instance_uid, r.sop_class_uid) for r in rows} or result_files(job.result_dir)
        objects.extend(ReplayObject(job.id, *obj) for obj in sorted(found))
    configured = [d.name for d in cfg.destinations]
    if destinations:
        unknown = [n for n in destinations if n not in known and n not in configured]
        if unknown:
            raise Permanent(f"destination(s) {', '.join(map(repr, unknown))} unknown: this series was sent to "
                            f"{sorted(known) or 'none'}, the configuration names {configured or 'none'}")
        targets = list(dict.fromkeys(destinations))
    else:
        targets = sorted(known) or configured
    if not targets:
        raise Permanent(f"series {uid} was never queued for a destination; name one with --destination NAME "
                        "(a [[destinations]] name of the running service)")
    if not objects:
        raise Permanent(f"series {uid}: its finished job(s) {', '.join(str(j.id) for j in done)} wrote no objects")
    missing = [str(o.path) for o in objects if not o.path.is_file()]
    if missing:
        raise Permanent(f"series {uid}: result file(s) {', '.join(missing)} are missing; nothing was queued")
    return ReplayPlan(series_uid=uid, jobs=done, objects=objects, destinations=targets)


def replay_series(index: Index, cfg: NodeConfig, series_uid: str, destinations: Sequence[str] | None = None,
                  now: float | None = None) -> ReplayOutcome:
    """Queue a finished series' results for sending again: the same files, so the same SOP Instance UIDs.

    Every object goes to every destination (see :func:`plan_replay`, whose errors this raises before
    queueing anything); a row that exists for that destination and UID is reset to pending.
    """
    plan = plan_replay(index, cfg, series_uid, destinations)
    queued = index.requeue_results(plan.items, note=REPLAY_NOTE, now=now)
    return ReplayOutcome(series_uid=plan.series_uid, queued=queued, destinations=plan.destinations,
                         job_ids=[j.id for j in plan.jobs])


def result_files(result_dir: str) -> set[tuple[Path, str, str]]:
    """The DICOM objects in a job's result folder: (path, SOP Instance UID, SOP Class UID)."""
    found: set[tuple[Path, str, str]] = set()
    if not result_dir or not Path(result_dir).is_dir():
        return found
    for path in sorted(Path(result_dir).glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        found.add((path, str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
    return found
