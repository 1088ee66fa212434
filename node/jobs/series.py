"""The jobs of one series, claimed together: one volume for all of them, and run at once where cores allow.

A settled series gets one job per bundle (body-lungs, liver, …). Before, each job read the series' files
and assembled its volume again; the worker now claims the queued jobs of a series together
(:meth:`node.spool.index_jobs.JobRows.claim_series_jobs`, each claimed and recorded on its own row),
reads and assembles the series once (:class:`node.jobs.pipeline.SeriesVolume`) and runs every bundle on
that volume. Each job still ends on its own: done, declined or failed with its own reason, retried on its
own after a crash.

On a machine with :data:`PARALLEL_MIN_CPUS` or more CPUs the jobs run at once (two, or one per two CPUs
on a larger machine), in threads of the worker: the engines and most of numpy and scipy release the GIL,
and the volume is shared, read-only. Their memory-heavy steps (a network's run, a built-in bundle's
segmentation, writing) take turns (:data:`node.infer.backends.threads.HEAVY_STEP`), so what overlaps is the
rest: body-lungs' segmentation beside the liver's preprocessing, one job's writing beside the other's
post-processing. On a single CPU they run one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from node.infer.backends.threads import usable_cpus
from node.jobs.pipeline import SeriesVolume
from node.model.records import JobRecord
from node.model.volume import MixedFrames

log = logging.getLogger(__name__)

#: Jobs of one series run at once on a machine with at least this many CPUs (usable by this process).
PARALLEL_MIN_CPUS = 2


class SeriesWorker(Protocol):
    """What runs the claimed jobs (node.jobs.worker._Worker)."""

    def run(self, job: JobRecord, shared: SeriesVolume | None = None) -> None: ...

    def stopping(self) -> bool: ...

    def put_back(self, job: JobRecord, why: str) -> None: ...


def parallel_jobs(count: int, cpus: int | None = None) -> int:
    """How many of ``count`` jobs of one series run at once on ``cpus`` CPUs (this machine's by default)."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(count, max(2, cpus // 2))) if cpus >= PARALLEL_MIN_CPUS else 1


def run_series(worker: SeriesWorker, jobs: Sequence[JobRecord], paths: Sequence[Path] | Callable[[], Sequence[Path]],
               mixed_frames: MixedFrames = MixedFrames.SEGMENT, *, cpus: int | None = None) -> None:
    """Run ``jobs`` (claimed together, all of one series whose files are ``paths``, or what looks them up when
    the volume is first needed) on one volume.

    One after the other, a job not yet started when the worker is told to stop goes back to the queue
    (uncounted), as if it had never been claimed. :class:`node.errors.Superseded` from any job is raised
    once the others have ended.
    """
    if len(jobs) == 1:
        worker.run(jobs[0])
        return
    shared = SeriesVolume(paths, mixed_frames)
    at_once = parallel_jobs(len(jobs), cpus)
    log.info("jobs %s of series %s: one volume for all, %s", ", ".join(str(j.id) for j in jobs), jobs[0].series_uid,
             f"{at_once} at once" if at_once > 1 else "one after the other")
    if at_once > 1:
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="series-job") as pool:
            futures = [pool.submit(worker.run, job, shared) for job in jobs]
        for future in futures:
            future.result()
        return
    for n, job in enumerate(jobs):
        if worker.stopping():
            for waiting in jobs[n:]:
                worker.put_back(waiting, "the worker stopped before it started this job")
            return
        worker.run(job, shared)
