"""The composition root: builds every stage from one config and runs them until told to stop.

Threads in this process: the receiver (pynetdicom's association threads), the main loop that
settles series, supervises workers and applies retention (``node.spool.retention``), a sender
thread for the outbox and, with ``metrics.port`` set, the HTTP port (``node.service.http``: /metrics,
/healthz, /readyz). Worker processes run the segmentation.
SIGTERM/SIGINT: stop accepting associations, let workers finish their current job (or abandon it
to the queue after a timeout), and exit; everything acknowledged is already durable.

Each start records itself in the index inside the state directory's lock (its *generation*); its workers'
claims carry it, so that workers left behind by a killed start can neither claim nor end a job, and the
jobs such a start left running go back to the queue without counting against their attempts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

from node import telemetry
from node.assemble.completeness import Completeness, counter_for
from node.assemble.stable import Assembler
from node.config import NodeConfig, check_bundle_names
from node.config_output import check_output_names
from node.dicom.scp import Receiver
from node.errors import ConfigError
from node.infer.backends.registry import is_strict
from node.infer.manifest import discover_bundles
from node.jobs.worker import WorkerPool, requeue_after_crash
from node.send.outbox import Sender
from node.service.sdnotify import notify, watchdog_interval_s
from node.spool.index import Index
from node.spool.recover import reconcile
from node.spool.retention import Retention
from node.spool.store import Spool

if TYPE_CHECKING:
    from node.service.http import HttpServer

log = logging.getLogger(__name__)

LOOP_INTERVAL_S = 0.25
#: A step that keeps failing for the same cause is logged again, with its count, at most this often.
REPEAT_LOG_S = 60.0


class StepFailures:
    """Logs a failing main-loop step once per distinct cause, with its traceback, then only counts repeats.

    A full disk fails the same step four times a second; one traceback and a count say as much as hundreds.
    A summary with the count is logged when the cause changes, when the step recovers, and every
    :data:`REPEAT_LOG_S` while it persists.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self.log = logger
        self._cause: dict[str, str] = {}
        self._count: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def failed(self, step: str, exc: BaseException) -> None:
        cause = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._cause.get(step) != cause:
            self._summarise(step, "then failed for another cause")
            self._cause[step], self._count[step], self._logged_at[step] = cause, 1, now
            self.log.error("%s step failed; will try again every turn (repeats of this cause are counted, not "
                           "logged): %s", step, cause, exc_info=exc)
            return
        self._count[step] += 1
        if now - self._logged_at[step] >= REPEAT_LOG_S:
            self._logged_at[step] = now
            self.log.error("%s step still failing: %s (%d times so far)", step, cause, self._count[step])

    def succeeded(self, step: str) -> None:
        self._summarise(step, "recovered")

    def _summarise(self, step: str, what: str) -> None:
        cause = self._cause.pop(step, None)
        if cause is not None:
            self.log.warning("%s step %s after failing %d time(s) with %s", step, what, self._count.pop(step, 0),
                             cause)


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the life of the service.

    Two services on one state directory would remove each other's partial files and claim each
    other's jobs; the second one refuses to start instead.
    """
    handle = (state_dir / "node.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"state directory {state_dir} is in use by another running node (pid {owner}); "
            "stop it or give this one another --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class Service:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.exit_code = 0
        self._stop_signal: int | None = None
        self._last_extend = 0.0
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_state_dir(cfg.state_dir)
        self.spool = Spool(cfg.spool_dir)
        self.index = Index(cfg.index_path)
        # Inside the lock: this start's generation, stamped on every claim of its workers.
        self.generation = self.index.begin_generation(os.getpid())
        self._failures = StepFailures()
        self.bundles = discover_bundles(cfg.bundles_dir, cfg.bundles)
        check_bundle_names(cfg, [b.name for b in self.bundles])
        check_output_names(cfg.source, cfg.output, [(d.name, d.structures) for d in cfg.destinations],
                           self.bundles)  # a structure no installed bundle produces stops the start, named
        self.receiver = Receiver(cfg, self.spool, self.index)
        counter = counter_for(cfg)
        self.assembler = Assembler(self.index, self.bundles, cfg.rules,
                                   Completeness(cfg.completeness, counter) if counter is not None else None)
        self.sender = Sender(cfg, self.index)
        self.receiver.commitments.on_report = self.sender.verifier.on_report  # reports on new associations
        self.workers = WorkerPool(cfg, self.index, self.generation)
        self.retention = Retention(cfg, self.index)
        self.http: HttpServer | None = None

    def _recover(self) -> None:
        removed = self.spool.clean_tmp()
        # A crash while a result was being written leaves its temporary file beside it.
        for part in self.cfg.results_dir.glob("*/*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        # Before reconcile: spool files whose rows retention had already deleted when the node stopped
        # must go, not be indexed again as a new series (see node.spool.retention).
        self.retention.finish_pending()
        reconcile(self.spool, self.index, quiet_period_s=self.cfg.quiet_period_s)
        requeued = requeue_after_crash(self.index, self.generation)
        if removed or requeued:
            log.warning("recovered after an unclean stop: %d partial file(s) removed, job(s) %s requeued",
                        removed, requeued or "none")

    def run(self) -> None:
        self._recover()
        sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        try:
            self.http = self._start_http()  # before the receiver records and the workers inherit its directory
            self.receiver.start()  # a port in use fails here, before any worker exists
            self.workers.start()
            sender.start()
            # Receiving and assembling go on while the workers load their engines (a first TensorRT
            # build takes minutes); what arrives meanwhile is durable and queued. READY=1 only once
            # every worker has loaded every configured engine.
            notify(f"STATUS=receiving; loading engines for {', '.join(b.id for b in self.bundles)}")
            watchdog = watchdog_interval_s()
            last_ping = 0.0
            ready = False
            while not self._stop_requested():
                self.step()
                if self.workers.fatal is not None:
                    self._stop_with_error(self.workers.fatal)
                    break
                if not ready:
                    ready = self._check_engines()
                if ready and watchdog is not None and time.monotonic() - last_ping >= watchdog:
                    notify("WATCHDOG=1")
                    last_ping = time.monotonic()
                self.stop_event.wait(LOOP_INTERVAL_S)
        finally:
            self.shutdown(sender)

    def _start_http(self) -> HttpServer | None:
        """With ``metrics.port`` set: metrics on in this process (and the workers), the HTTP port bound
        (ConfigError when it is in use) and served from its own thread; None when it is 0 (off)."""
        directory = telemetry.metrics_dir(self.cfg)
        if directory is None:
            return None
        telemetry.setup(directory)
        from node.service.http import HttpServer  # starlette and uvicorn only when the port is on

        # The HTTP thread reads copies of the workers' engine reports (the dict is only ever updated in place).
        server = HttpServer(self.cfg, [b.id for b in self.bundles], self.workers.reports.copy)
        server.start()
        return server

    def _stop_with_error(self, reason: str) -> None:
        """Stop the service and exit 1 (systemd's Restart=on-failure and its log say why)."""
        log.error("stopping: %s", reason)
        self.exit_code = 1
        self.stop_event.set()

    def _check_engines(self) -> bool:
        """True once every worker reported its engines (then READY=1 is sent, once); stops the service
        when ``engines.backend`` names a strict backend ("tensorrt") and an engine could not be had on it."""
        self.workers.collect_reports()
        if not self.workers.all_reported():
            if time.monotonic() - self._last_extend >= 30:
                # A first TensorRT build takes minutes: keep systemd's start timeout ahead of it.
                notify("EXTEND_TIMEOUT_USEC=120000000")
                self._last_extend = time.monotonic()
            return False
        reports = list(self.workers.reports.values())
        engines = reports[0].engines if reports else {}
        failed = {b: why for r in reports for b, why in r.failed.items()}
        if failed and is_strict(self.cfg.engine_backend):
            for bundle, why in failed.items():
                log.error("%s: %s", bundle, why)
            self._stop_with_error(f"engines.backend is {str(self.cfg.engine_backend)!r} and {len(failed)} engine(s) "
                                  "could not be loaded on it")
            return True
        for bundle, why in failed.items():
            log.error("bundle %s has no engine; its jobs will fail: %s", bundle, why)
        log.info("node %s ready: state in %s, bundles %s, destinations %s", self.cfg.ae_title, self.cfg.state_dir,
                 ", ".join(f"{b} ({engines.get(b, 'failed')})" for b in (x.id for x in self.bundles)),
                 ", ".join(map(str, self.cfg.destinations)) or "none")
        status = "receiving" if not failed else f"receiving; no engine for {', '.join(failed)}"
        notify(f"READY=1\nSTATUS={status}")
        return True

    def step(self) -> None:
        """One turn of the main loop; exceptions are logged, never allowed to end the loop.

        Sending runs on its own thread (``_send_loop``): a destination that accepts a connection
        and never answers holds that thread for up to ``send.timeout_s``, and must not hold up
        settling series, supervising workers or the systemd watchdog.
        Retention runs here too, at the first turn and then every ``retention.interval_s``, for at
        most a few seconds a turn (``node.spool.retention.PASS_BUDGET_S``).
        """
        actions = (("assemble", self.assembler.poll), ("supervise", self.workers.supervise),
                   ("retention", self.retention.maybe_run))
        for name, action in actions:
            try:
                action()
            except Exception as exc:  # logged once per distinct cause, with a count
                self._failures.failed(name, exc)
            else:
                self._failures.succeeded(name)

    def _send_loop(self) -> None:
        failures = StepFailures()  # this thread's own: StepFailures is not shared between threads
        while not self.stop_event.is_set():
            try:
                self.sender.poll()
            except Exception as exc:
                failures.failed("send", exc)
            else:
                failures.succeeded("send")
            self.stop_event.wait(LOOP_INTERVAL_S)

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """The SIGTERM/SIGINT handler: only records the request. Setting ``stop_event`` here could
        deadlock — the handler runs in the main thread, which may hold the Event's (non-reentrant)
        lock inside ``stop_event.wait`` at that moment; the main loop sets it within a turn."""
        self._stop_signal = signum if signum is not None else 0

    def _stop_requested(self) -> bool:
        if self._stop_signal is not None and not self.stop_event.is_set():
            log.info("stopping (signal %s)", self._stop_signal)
            self.stop_event.set()
        return self.stop_event.is_set()

    def shutdown(self, sender: threading.Thread) -> None:
        """Stop in dependency order; copes with stages that never started."""
        notify("STOPPING=1")
        self.stop_event.set()
        self.receiver.stop()
        if self.http is not None:
            self.http.stop()
        if sender.is_alive():
            sender.join(self.cfg.send_timeout_s + 5)
        self.workers.stop()
        self.index.close()
        log.info("stopped")


def serve(cfg: NodeConfig) -> int:
    service = Service(cfg)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    service.run()
    return service.exit_code
