"""The qa job: compare each edited structure set of a settled series with the node's own result.

A worker runs it like a segmentation job but with no bundle and no engine (``_Worker.run`` dispatches on
:class:`~node.model.enums.JobKind`). Each instance of the series not compared before gets a qa record
(``node.spool.index_qa``), whatever is wrong with it; the job ends done with a summary as its note, or
declined when ``[qa] enabled = false``. Nothing is sent anywhere: the edited sets stay in the spool, kept and
deleted by retention like the results they were compared with.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from node import telemetry
from node.config import NodeConfig
from node.errors import Declined
from node.model.enums import EditVerdict, QaOutcome
from node.model.qa_records import QaSet
from node.model.records import JobRecord, JobState
from node.qa.assess import assess
from node.spool.index import Index
from node.spool.index_jobs import JobOwner

log = logging.getLogger(__name__)

T = TypeVar("T")


class QaHost(Protocol):
    """What a qa job needs of the worker that runs it (``node.jobs.worker._Worker``)."""

    index: Index
    cfg: NodeConfig
    owner: JobOwner | None

    def record(self, job_id: int, what: str, write: Callable[[], T]) -> T | None: ...

    def failed(self, job: JobRecord, exc: Exception) -> None: ...


def summary(sets: list[QaSet]) -> str:
    """One line for the job's note: per set, its outcome, or each structure's verdict."""
    parts = []
    for qa in sets:
        if qa.outcome is QaOutcome.COMPARED:
            verdicts = ", ".join(f"{s.name} {s.verdict.value}" for s in qa.structures) or "no structures"
            parts.append(f"{qa.label or qa.sop_instance_uid} vs job(s) {', '.join(map(str, qa.result_jobs))}: "
                         f"{verdicts}")
        else:
            parts.append(f"{qa.label or qa.sop_instance_uid}: {qa.outcome.value} ({qa.reason})")
    return "edit QA: " + ("; ".join(parts) if parts else "every structure set of the series was compared before")


def run_qa_job(host: QaHost, job: JobRecord) -> None:
    """Assess every edited set of the job's series not assessed yet; record the outcome on the job."""
    index, cfg, owner = host.index, host.cfg, host.owner
    started = time.time()
    try:
        if not cfg.qa.enabled:
            raise Declined("edit QA is off ([qa] enabled = false); the structure set is stored, not compared")
        instances = index.edited_instances(job.series_uid)
        done = index.qa_recorded([i.sop_instance_uid for i in instances])
        sets = []
        for instance in instances:
            if instance.sop_instance_uid in done:
                continue
            qa = assess(index, cfg, instance, job.series_uid)
            index.record_qa(job.id, qa)
            telemetry.qa_set(qa.outcome.value, [(s.bundle, s.verdict.value, s.surface_dice_2mm)
                                                for s in qa.structures if s.verdict is not EditVerdict.NOT_COMPARED])
            sets.append(qa)
    except Declined as exc:
        why = str(exc)
        host.record(job.id, "was declined", lambda: index.fail_job(job.id, why, state=JobState.DECLINED, owner=owner))
        return
    except Exception as exc:  # every failure is recorded; the worker stays alive
        host.failed(job, exc)
        return
    note = summary(sets)
    timings = json.dumps({"total": round(time.time() - started, 3)})
    host.record(job.id, "is done", lambda: index.finish_job(job.id, result_dir="", timings=timings, outbox=[],
                                                            note=note, owner=owner))
    log.info("job %d: %s", job.id, note)
