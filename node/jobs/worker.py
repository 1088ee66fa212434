"""Worker processes: claim a queued job, run the pipeline, record the outcome.

Segmentation runs here, in separate processes, so the receiver's association threads never wait
behind it. Each worker opens its own index connection; the parent supervises (``WorkerPool``),
restarts a worker that dies and returns its running job to the queue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from node import telemetry
from node.config import NodeConfig
from node.errors import Declined, NodeError
from node.infer.backends.loader import EngineLoader
from node.infer.backends.registry import LAST_RESORT
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.model.bundle import Bundle
from node.model.enums import EngineBackend
from node.model.records import JobState
from node.model.routing import SourceFacts
from node.send.routing import held_destinations, route_results
from node.spool.index import Index
from node.write.provenance import Provenance

log = logging.getLogger(__name__)

#: A job that has crashed its worker this many times ends failed instead of being retried.
MAX_JOB_ATTEMPTS = 3
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
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s {spec.name} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
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
    while not stop.is_set() and not terminating:
        job = index.claim_job(spec.name)
        if job is None:
            stop.wait(0.2)
            continue
        bundle = bundles.get(job.bundle)
        if bundle is None:
            index.fail_job(job.id, f"bundle {job.bundle} is not installed in {cfg.bundles_dir}")
            continue
        started = time.time()
        log.info("job %d: %s on series %s (attempt %d)", job.id, bundle.id, job.series_uid, job.attempts)
        try:
            engine = factory.get(bundle).engine
            paths = index.instance_paths(job.series_uid)
            outcome = run_job(
                paths,
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
            )
        except Declined as exc:
            log.info("job %d declined: %s", job.id, exc)
            index.fail_job(job.id, str(exc), state=JobState.DECLINED)
            continue
        except NodeError as exc:
            log.error("job %d failed: %s", job.id, exc)
            index.fail_job(job.id, str(exc))
            continue
        except Exception as exc:  # a bug or a library failure: record it, keep the worker alive
            log.exception("job %d failed unexpectedly", job.id)
            index.fail_job(job.id, f"unexpected {type(exc).__name__}: {exc}")
            continue
        timings = dict(outcome.timings, total=round(time.time() - started, 3))
        series = index.series(job.series_uid)
        facts = SourceFacts.of(series) if series is not None else SourceFacts("", "", "", "")
        routed = route_results(cfg.destinations, bundle.name, outcome.objects, facts)
        held = held_destinations(cfg, bundle.name, routed.outbox)
        ended = index.finish_job(
            job.id,
            result_dir=str(outcome.objects[0].path.parent) if outcome.objects else "",
            timings=json.dumps(timings),
            outbox=routed.outbox,
            note=routed.note,
            held=held,
            structures=outcome.volumes,
        )
        telemetry.job_timings(bundle.id, timings)
        log.info("job %d: %s", job.id, routed.note)
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
    factory.close()
    index.close()


class WorkerPool:
    """Starts ``cfg.workers`` worker processes and keeps them running."""

    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
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
        spec = WorkerSpec(cfg=cfg, name=f"{name}-{os.getpid()}", log_level=logging.getLogger().level)
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


def requeue_after_crash(index: Index) -> list[int]:
    """At service start no worker runs yet: every 'running' job was abandoned by a crash."""
    return index.requeue_running(max_attempts=MAX_JOB_ATTEMPTS, reason="the service stopped while this job ran")

