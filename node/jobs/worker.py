"""Worker processes: claim a queued job, run the pipeline, record the outcome.

Segmentation runs here, in separate processes, so the receiver's association threads never wait
behind it. Each worker opens its own index connection; the parent supervises (``WorkerPool``),
restarts a worker that dies and returns its running job to the queue.

A worker dies with the service: Linux kills it when its parent dies (``PR_SET_PDEATHSIG``), and before
every claim it checks that its parent is still the service that started it. Its claims carry the
service's start (its generation, :class:`node.spool.index_jobs.JobOwner`): once a later start owns the
index, the worker of an earlier one can neither claim nor end a job. A job that meets a shortage that
may pass (a full disk, memory, file handles, a full index) goes back to the queue with a backoff instead
of failing; one claimed while free space is below ``node.min_free_disk_mb`` waits without starting.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TypeVar

from node import telemetry
from node.config import NodeConfig
from node.errors import Declined, NodeError, Retryable, Superseded
from node.infer.backends.loader import EngineLoader
from node.infer.backends.registry import LAST_RESORT
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import SeriesVolume, run_job
from node.jobs.qa import run_qa_job
from node.jobs.series import run_series
from node.model.bundle import Bundle
from node.model.enums import EngineBackend, JobKind
from node.model.records import JobRecord, JobState
from node.model.routing import SourceFacts
from node.send.routing import held_destinations, route_results
from node.spool.index import Index
from node.spool.index_jobs import JobOwner
from node.write.provenance import Provenance

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A job whose worker has crashed this many times while running it ends failed instead of being retried.
#: The service stopping or crashing while the job ran does not count (``requeue_after_crash``).
MAX_JOB_ATTEMPTS = 3
#: A job that met a shortage that may pass goes back to the queue this long after its first such run,
#: doubling each time up to the maximum; after RESOURCE_RUN_LIMIT such runs it ends failed (retryable).
RESOURCE_BACKOFF_S = 5.0
RESOURCE_BACKOFF_MAX_S = 300.0
RESOURCE_RUN_LIMIT = 10
#: A job claimed while free space is below ``node.min_free_disk_mb`` does not start; it is claimed again this
#: much later, counting neither as an attempt nor as a step of the backoff.
SPACE_WAIT_S = 10.0
#: OS errors of a shortage that may pass: a full disk or quota, memory, file handles.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
#: SQLite's words for the same (SQLITE_FULL, SQLITE_NOMEM, SQLITE_BUSY past the busy timeout).
RESOURCE_SQLITE = ("disk is full", "out of memory", "database is locked")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: A worker that dies this many times in a row while loading its engines (a TensorRT build that
#: crashes the process, a driver fault) is restarted without the GPU under engines.backend = "auto";
#: under "cpu" or "tensorrt" the service stops with the reason.
LOAD_CRASH_LIMIT = 2


def restart_config(cfg: NodeConfig, load_crashes: int, last_exit: int | None) -> tuple[NodeConfig, str | None]:
    """The configuration a restarted worker gets, and the fatal reason when there is no way on."""
    if load_crashes < LOAD_CRASH_LIMIT:
        return cfg, None
    what = f"died {load_crashes} times while loading its engines (last exit code {last_exit})"
    if cfg.engine_backend is EngineBackend.AUTO:
        log.error("a worker %s; restarting it on %r (engines.backend 'auto' → %r)", what, str(LAST_RESORT),
                  str(LAST_RESORT))
        return dataclasses.replace(cfg, engine_backend=LAST_RESORT), None
    return cfg, f"a worker {what} under engines.backend = {str(cfg.engine_backend)!r}"


@dataclass(frozen=True)
class WorkerSpec:
    cfg: NodeConfig
    name: str
    log_level: int
    parent_pid: int = 0  # the service's pid: a worker whose parent is no longer this process exits (0: unchecked)
    generation: int = 0  # the start of the service it belongs to, stamped on its claims (0: unchecked)


def resource_exhaustion(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from or while handling, is a shortage that may pass:
    a full disk or quota, memory, file handles, or an index that is full or locked."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError):
            return True
        if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS:
            return True
        if isinstance(cause, sqlite3.OperationalError) and any(w in str(cause) for w in RESOURCE_SQLITE):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def space_shortage(cfg: NodeConfig) -> str | None:
    """Why a job may not start writing now: less free space where results go than the receiver's watermark
    (``node.min_free_disk_mb``); None when there is enough."""
    if cfg.min_free_disk_mb <= 0:
        return None
    where = cfg.results_dir if cfg.results_dir.is_dir() else cfg.state_dir
    try:
        free_mb = shutil.disk_usage(where).free // 2**20
    except OSError:
        return None
    if free_mb >= cfg.min_free_disk_mb:
        return None
    return (f"waiting for disk space: {free_mb} MB free in {where}, below the {cfg.min_free_disk_mb} MB watermark "
            "(node.min_free_disk_mb)")


def die_with_parent(parent_pid: int) -> bool:
    """Have Linux kill this process when its parent dies (``PR_SET_PDEATHSIG``); return whether the parent is
    still ``parent_pid`` (it may have died before the request was made; 0 checks nothing)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:  # the parent-identity check before each claim remains
            log.warning("this worker cannot ask to be killed with the service (prctl PR_SET_PDEATHSIG): %s", exc)
    return parent_pid == 0 or os.getppid() == parent_pid


@dataclass(frozen=True)
class EngineReport:
    """What a worker loaded at start: per bundle id, the engine's description or why it failed."""

    worker: str
    engines: dict[str, str]
    failed: dict[str, str]


def load_engines(factory: EngineLoader, bundles: dict[str, Bundle], worker: str) -> EngineReport:
    """Load (deserialise, or build first) every bundle's engine, so jobs never wait for one and the
    service reports ready only once they are loaded."""
    loaded: dict[str, str] = {}
    failed: dict[str, str] = {}
    for bundle_id, bundle in bundles.items():
        try:
            loaded[bundle_id] = factory.get(bundle).description
            log.info("%s: %s", bundle_id, loaded[bundle_id])
        except NodeError as exc:
            failed[bundle_id] = str(exc)
            log.error("%s: no engine: %s", bundle_id, exc)
    return EngineReport(worker, loaded, failed)


def _worker_main(spec: WorkerSpec, stop: mp.synchronize.Event,
                 reports: mp.Queue[EngineReport]) -> None:
    orphaned = not die_with_parent(spec.parent_pid)  # first: the service may be killed at any moment
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s {spec.name} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if orphaned:
        log.error("the service (pid %d) that started this worker is gone; exiting", spec.parent_pid)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # SIGTERM (for example a signal to the whole process group) only raises a flag: setting the
    # multiprocessing Event from a signal handler can deadlock on the lock that stop.wait() holds.
    terminating: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: terminating.append(True))
    cfg = spec.cfg
    telemetry.attach(telemetry.metrics_dir(cfg))
    index = Index(cfg.index_path)
    bundles = {b.id: b for b in discover_bundles(cfg.bundles_dir, cfg.bundles)}
    factory = EngineLoader.from_config(cfg)
    reports.put(load_engines(factory, bundles, spec.name))
    worker = _Worker(spec, index, bundles, factory, lambda: stop.is_set() or bool(terminating))
    claim_failure = ""
    while not worker.stopping():
        try:
            jobs = index.claim_series_jobs(spec.name, generation=spec.generation or None)
        except Superseded as exc:
            log.error("%s; exiting", exc)
            break
        except sqlite3.OperationalError as exc:  # a full or locked index: no job is lost by waiting
            if str(exc) != claim_failure:
                log.error("cannot claim a job: %s; trying again every second (logged once)", exc)
                claim_failure = str(exc)
            stop.wait(1.0)
            continue
        claim_failure = ""
        if not jobs:
            stop.wait(0.2)
            continue
        try:  # the jobs of one series, claimed together, run on one volume (node/jobs/series.py)
            run_series(worker, jobs, functools.partial(index.instance_paths, jobs[0].series_uid),
                       cfg.mixed_frames_of_reference)
        except Superseded as exc:
            log.error("%s; exiting", exc)
            break
    factory.close()
    index.close()


class _Worker:
    """Runs claimed jobs in a worker process and records their outcomes."""

    def __init__(self, spec: WorkerSpec, index: Index, bundles: dict[str, Bundle], factory: EngineLoader,
                 told_to_stop: Callable[[], bool]) -> None:
        self.spec = spec
        self.cfg = spec.cfg
        self.index = index
        self.bundles = bundles
        self.factory = factory
        self._told_to_stop = told_to_stop
        self.owner = JobOwner(spec.name, spec.generation) if spec.generation else None
        self._orphaned = False

    def stopping(self) -> bool:
        """Told to stop, or orphaned: the service that started this worker is no longer its parent."""
        if self.spec.parent_pid and os.getppid() != self.spec.parent_pid:
            if not self._orphaned:
                log.error("the service (pid %d) that started this worker is gone; exiting", self.spec.parent_pid)
            self._orphaned = True
            return True
        return self._told_to_stop()

    def record(self, job_id: int, what: str, write: Callable[[], T]) -> T | None:
        """Write a job's outcome to the index. While the index cannot be written (a full disk, a lock held
        past the busy timeout), try again with a growing pause, logged once; None when told to stop first
        (the next start requeues the job, uncounted)."""
        pause, failure = 0.5, ""
        while True:
            try:
                result = write()
            except sqlite3.OperationalError as exc:
                if not resource_exhaustion(exc):  # a fault, not a shortage: the supervisor sees the worker die
                    raise
                if not failure:
                    log.error("job %d: cannot record that it %s: %s; trying again until the index can be "
                              "written (logged once)", job_id, what, exc)
                failure = str(exc)
                if self.stopping():
                    return None
                time.sleep(pause)
                pause = min(2 * pause, 10.0)
                continue
            if failure:
                log.info("job %d: recorded that it %s, after %s", job_id, what, failure)
            return result

    def run(self, job: JobRecord, shared: SeriesVolume | None = None) -> None:
        if job.kind is JobKind.QA:  # an edited structure set back: no bundle, no engine (node/jobs/qa.py)
            return run_qa_job(self, job)
        index, cfg, owner = self.index, self.cfg, self.owner
        bundle = self.bundles.get(job.bundle)
        if bundle is None:
            why = f"bundle {job.bundle} is not installed in {cfg.bundles_dir}"
            self.record(job.id, "failed", lambda: index.fail_job(job.id, why, owner=owner, retryable=True))
            return
        if (short := space_shortage(cfg)) is not None:
            log.warning("job %d does not start: %s", job.id, short)
            self.record(job.id, "waits for disk space", lambda: index.defer_job(
                job.id, short, ran=False, backoff_s=SPACE_WAIT_S, max_backoff_s=SPACE_WAIT_S,
                give_up_after=RESOURCE_RUN_LIMIT, owner=owner))
            return
        started = time.time()
        log.info("job %d: %s on series %s (attempt %d)", job.id, bundle.id, job.series_uid, job.attempts)
        try:
            engine = self.factory.get(bundle).engine
            outcome = run_job(
                shared if shared is not None else index.instance_paths(job.series_uid),
                bundle,
                engine,
                cfg.job_result_dir(job.id),
                provenance=Provenance.now(cfg.ae_title),
                write_seg=cfg.write_seg,
                write_rtstruct=cfg.write_rtstruct,
                # the web page shows the preview: drawn whenever the page is served or a reviewer will look
                preview_png=cfg.preview_png or cfg.web_served or any(
                    cfg.held_for_review(d, bundle.name) for d in cfg.destinations),
                preview_sc=cfg.preview_sc,
                seg_type=cfg.seg_type,
                mixed_frames=cfg.mixed_frames_of_reference,
                output=cfg.output_plan(),  # [output] structures and roi_names, destinations' own structures
            )
        except Declined as exc:
            log.info("job %d declined: %s", job.id, exc)
            why = str(exc)
            self.record(job.id, "was declined", lambda: index.fail_job(job.id, why, state=JobState.DECLINED,
                                                                       owner=owner))
            return
        except Exception as exc:  # every failure is recorded; the worker stays alive
            self.failed(job, exc)
            return
        timings = dict(outcome.timings, total=round(time.time() - started, 3))
        series = index.series(job.series_uid)
        facts = SourceFacts.of(series) if series is not None else SourceFacts("", "", "", "")
        routed = route_results(cfg.destinations, bundle.name, outcome.objects, facts)
        held = held_destinations(cfg, bundle.name, routed.outbox)
        note = routed.note + (f"; held for review: {', '.join(sorted(held))}" if held else "")
        note = f"{outcome.note}; {note}" if outcome.note else note  # e.g. which frame of reference, and why
        note += f"; contours: {outcome.contours}" if outcome.contours else ""
        ended = self.record(job.id, "is done", lambda: index.finish_job(
            job.id,
            result_dir=str(outcome.objects[0].path.parent) if outcome.objects else "",
            timings=json.dumps(timings),
            outbox=routed.outbox,
            note=note,
            held=held,
            structures=outcome.volumes,
            owner=owner,
        ))
        if ended is None:
            return
        telemetry.job_timings(bundle.id, timings)
        log.info("job %d: %s", job.id, note)
        if ended is JobState.AWAITING_REVIEW:
            log.info("job %d awaits review: the copies for %s are held until a reviewer approves them",
                     job.id, ", ".join(sorted(held)))
        log.info(
            "job %d done: %s → %s in %.1f s %s",
            job.id,
            ", ".join(outcome.structures),
            ", ".join(o.kind for o in outcome.objects),
            timings["total"],
            timings,
        )

    def put_back(self, job: JobRecord, why: str) -> None:
        """Return a claimed job that did not start to the queue, uncounted, due at once."""
        index, owner = self.index, self.owner
        self.record(job.id, "went back to the queue", lambda: index.defer_job(
            job.id, why, ran=False, backoff_s=0.0, max_backoff_s=0.0, give_up_after=RESOURCE_RUN_LIMIT, owner=owner))

    def failed(self, job: JobRecord, exc: Exception) -> None:
        """Record a failed run: back to the queue with a backoff for a shortage that may pass, else failed."""
        index, owner = self.index, self.owner
        if isinstance(exc, Retryable) or resource_exhaustion(exc):
            reason = f"resources ran out: {exc}" if not isinstance(exc, NodeError) else str(exc)
            ended = self.record(job.id, "met a shortage", lambda: index.defer_job(
                job.id, reason, ran=True, backoff_s=RESOURCE_BACKOFF_S, max_backoff_s=RESOURCE_BACKOFF_MAX_S,
                give_up_after=RESOURCE_RUN_LIMIT, owner=owner))
            if ended is not None and ended[0] is JobState.QUEUED:
                log.warning("job %d: %s; back in the queue, tries again in %.0f s", job.id, reason,
                            ended[1] - time.time())
            elif ended is not None:
                log.error("job %d failed: %s; gave up after %d runs (`retry --job %d` runs it again)", job.id,
                          reason, RESOURCE_RUN_LIMIT, job.id)
            return
        if isinstance(exc, NodeError):
            log.error("job %d failed: %s", job.id, exc)
            error = str(exc)
        else:  # a bug or a library failure: record it, keep the worker alive
            log.error("job %d failed unexpectedly", job.id, exc_info=exc)
            error = f"unexpected {type(exc).__name__}: {exc}"
        self.record(job.id, "failed", lambda: index.fail_job(job.id, error, owner=owner))


class WorkerPool:
    """Starts ``cfg.workers`` worker processes and keeps them running."""

    def __init__(self, cfg: NodeConfig, index: Index, generation: int = 0) -> None:
        self.cfg = cfg
        self.index = index
        self.generation = generation  # this start of the service (Index.begin_generation); 0: unchecked
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._reports: mp.Queue[EngineReport] = self._ctx.Queue()
        self.reports: dict[str, EngineReport] = {}  # per worker name, the latest report
        self._procs: dict[str, BaseProcess] = {}
        self._lock = threading.Lock()
        self._load_crashes: dict[str, int] = {}
        self._worker_cfg: dict[str, NodeConfig] = {}
        self.fatal: str | None = None  # set when workers cannot load their engines at all

    def start(self) -> None:
        for n in range(self.cfg.workers):
            self._spawn(f"worker-{n}")

    def _spawn(self, name: str) -> None:
        self.reports.pop(name, None)  # this incarnation has not loaded its engines yet
        cfg = self._worker_cfg.get(name, self.cfg)
        spec = WorkerSpec(cfg=cfg, name=f"{name}-{os.getpid()}", log_level=logging.getLogger().level,
                          parent_pid=os.getpid(), generation=self.generation)
        proc = self._ctx.Process(target=_worker_main, args=(spec, self._stop, self._reports), name=name, daemon=False)
        proc.start()
        self._procs[name] = proc

    def supervise(self) -> None:
        """Restart dead workers; their running jobs go back to the queue (or fail after retries)."""
        if self._stop.is_set():
            return
        self.collect_reports()
        with self._lock:
            for name, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                if name in self.reports:
                    self._load_crashes[name] = 0
                else:  # died before it had loaded its engines
                    self._load_crashes[name] = self._load_crashes.get(name, 0) + 1
                    cfg, fatal = restart_config(self._worker_cfg.get(name, self.cfg), self._load_crashes[name],
                                                proc.exitcode)
                    self._worker_cfg[name] = cfg
                    if fatal is not None:
                        self.fatal = fatal
                        return
                reason = f"worker {name} died (exit code {proc.exitcode}) while running this job"
                requeued = self.index.requeue_running(
                    worker=f"{name}-{os.getpid()}", max_attempts=MAX_JOB_ATTEMPTS, reason=reason
                )
                log.error("%s; restarting it (jobs returned to the queue: %s)", reason, requeued or "none")
                telemetry.process_dead(proc.pid)
                self._spawn(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask workers to finish their current job; terminate the ones that do not in time."""
        self._stop.set()
        if not self._procs:
            return
        deadline = time.time() + timeout
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.time()))
        for name, proc in self._procs.items():
            if proc.is_alive():
                log.warning("worker %s did not finish in %.0f s; terminating it (its job is requeued at start)",
                            name, timeout)
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()

    def collect_reports(self) -> list[EngineReport]:
        """Engine reports that arrived since the last call (one per worker start)."""
        new: list[EngineReport] = []
        while True:
            try:
                report = self._reports.get_nowait()
            except queue.Empty:
                return new
            prefix = report.worker.rsplit("-", 1)[0]
            self.reports[prefix] = report
            new.append(report)

    def all_reported(self) -> bool:
        return set(self.reports) >= set(self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.pid is not None]


def requeue_after_crash(index: Index, generation: int) -> list[int]:
    """At service start (``generation``) no worker runs yet: every 'running' job was abandoned by an earlier
    start that stopped or crashed. That is not the job's fault: it goes back to the queue uncounted."""
    return index.requeue_abandoned(generation, reason="the service stopped while this job ran")

