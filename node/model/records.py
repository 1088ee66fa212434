"""Pure data passed between stages: no I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from node.model.enums import JobKind


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances still arriving (or not yet quiet)
    DISPATCHED = "dispatched"  # stable; jobs created for the bundles that apply
    IGNORED = "ignored"  # stable; no bundle applies (recorded with the reason)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # results written and queued in the outbox
    FAILED = "failed"  # ended with a recorded reason
    DECLINED = "declined"  # the bundle does not apply to this series (coverage, anatomy); reason recorded
    AWAITING_REVIEW = "awaiting_review"  # results written; some copies are held until a reviewer approves them
    REJECTED = "rejected"  # a reviewer rejected the results (reason recorded); the held copies were discarded


#: Jobs still to be finished by a worker or a reviewer: retention keeps their series, replay waits for them.
UNFINISHED_JOBS = (JobState.QUEUED, JobState.RUNNING, JobState.AWAITING_REVIEW)


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # gave up after max attempts or a permanent refusal
    HELD = "awaiting_review"  # not sent until a reviewer approves the job (review gate)
    DISCARDED = "rejected"  # a reviewer rejected the job: never sent


class ReviewDecision(enum.StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver learns from one instance's header."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    study_description: str = ""  # for routing rules (node.model.routing); not an identifier
    series_description: str = ""


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    study_uid: str
    modality: str
    sop_class_uid: str
    instance_count: int
    first_received: float
    last_received: float
    state: SeriesState
    note: str
    calling_ae: str = ""  # the AE that sent its first instance
    study_description: str = ""
    series_description: str = ""


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_uid: str
    bundle: str
    state: JobState
    attempts: int
    created: float
    updated: float
    error: str
    result_dir: str
    priority: int = 0  # from the rule that matched the series; higher is taken from the queue first
    calling_ae: str = ""  # the series' sender: the queue is shared round-robin across senders
    note: str = ""  # where the results went and why (routing), or why nowhere
    structures: tuple[StructureVolume, ...] = ()  # what the job found, with volumes (empty until done)
    kind: JobKind = JobKind.SEGMENT  # SEGMENT: run the bundle; QA: compare an edited structure set (node/qa)


@dataclass(frozen=True)
class StructureVolume:
    """One structure a job found, and its volume on the image grid."""

    name: str
    volume_ml: float


@dataclass(frozen=True)
class ReviewRecord:
    """A reviewer's decision on a job held for review: who, when, and their note (the reason of a rejection)."""

    job_id: int
    decision: ReviewDecision
    reviewer: str
    decided_at: float
    note: str
    released: int  # outbox rows queued (approved) or discarded (rejected) by the decision


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    state: OutboxState
    attempts: int
    next_attempt_at: float
    last_status: str
    route: str = ""  # why this destination takes this object (its routing, as a phrase)
    last_attempt_at: float | None = None
    sent_at: float | None = None
    verified_at: float | None = None  # verify = "find": when the destination was seen to hold it
    resends: int = 0  # times the destination did not hold it in time (each then sent again, or the last dead)
    commit_txn: str = ""  # verify = "commitment": the Transaction UID of the storage commitment request
