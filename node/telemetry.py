"""The node's Prometheus metrics: what the stages record, in every process of the service.

The service (``node.service``) exposes them on its HTTP port (``[metrics] port``); the receiver, the
workers and the sender record into them with one short call each. prometheus_client runs in its
multiprocess mode: each process writes its values into memory-mapped files in one directory (under
the state directory) and the service's HTTP thread merges them at every scrape.

- :func:`setup` in the service's main process, before any worker is spawned: empties the directory,
  sets ``PROMETHEUS_MULTIPROC_DIR`` (the spawned workers inherit it) and creates the metrics.
- :func:`attach` in each worker process: creates the metrics there, writing into the same directory.
- Every record function is a cheap no-op when neither was called: the offline ``segment`` command,
  unit tests, a node with ``metrics.port = 0``. A failure inside one is logged once, never raised: a
  metric must not fail a C-STORE, a job or a delivery.

prometheus_client chooses how values are stored (in the process, or in files) from
``PROMETHEUS_MULTIPROC_DIR`` when ``prometheus_client.values`` is first imported; so it is imported
here only inside :func:`setup`/:func:`attach`, and when something imported it earlier the value class
is replaced there (``values.ValueClass``, as prometheus_client's own tests do).

Labels are bounded: calling AE titles (at most :data:`MAX_CALLING_AES` distinct ones, then
``"(other)"``), C-STORE status names, rejection reasons, bundle ids, job stages and destination names
(all from the code or the configuration).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from node.config import NodeConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Distinct calling AE titles given their own label value; later ones are counted as ``"(other)"``.
MAX_CALLING_AES = 100
OTHER = "(other)"
#: Job stages take from milliseconds (read) to minutes (a large volume on the CPU).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: One delivery attempt: an association carrying every due object, or a timeout.
SEND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Surface Dice of an edited structure: fine steps near 1, where most structures are.
SURFACE_DICE_BUCKETS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)

P = ParamSpec("P")


def metrics_dir(cfg: NodeConfig) -> Path | None:
    """Where the processes of a service write their metrics; None when ``metrics.port`` is 0 (off)."""
    return cfg.state_dir / "metrics" if cfg.metrics.port else None


class _Bounded:
    """Label values as given until ``limit`` distinct ones were seen; later ones become ``"(other)"``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


@dataclass
class _Metrics:
    received: Counter
    received_bytes: Counter
    responses: Counter
    accepted: Counter
    rejected: Counter
    open_associations: Gauge
    stage_seconds: Histogram
    sent: Counter
    failed: Counter
    dead: Counter
    send_seconds: Histogram
    verified: Counter
    unverified: Counter
    qa_sets: Counter
    qa_structures: Counter
    qa_surface_dice: Histogram
    calling_ae: _Bounded
    directory: Path
    open_keys: set[int]
    lock: threading.Lock


_state: _Metrics | None = None
_previous_value_class: object | None = None
_failed_once: set[str] = set()


def _create(directory: Path) -> _Metrics:
    global _previous_value_class
    os.environ[ENV] = str(directory)
    from prometheus_client import Counter, Gauge, Histogram, values

    if _previous_value_class is None:
        _previous_value_class = values.ValueClass
    values.ValueClass = values.MultiProcessValue()  # fresh: its files are opened in ``directory``
    ae, ae_status = ["calling_ae"], ["calling_ae", "status"]
    return _Metrics(
        received=Counter("dicomseg_instances_received", "Instances received and stored, per calling AE "
                         "(a duplicate SOP Instance is not counted again)", ae, registry=None),
        received_bytes=Counter("dicomseg_received_bytes", "Bytes of the instances received and stored, per "
                               "calling AE", ae, registry=None),
        responses=Counter("dicomseg_cstore_responses", "C-STORE responses sent, per calling AE and status",
                          ae_status, registry=None),
        accepted=Counter("dicomseg_associations_accepted", "Associations accepted, per calling AE", ae,
                         registry=None),
        rejected=Counter("dicomseg_associations_rejected", "Associations rejected, per reason", ["reason"],
                         registry=None),
        open_associations=Gauge("dicomseg_associations_open", "Associations open now", registry=None,
                                multiprocess_mode="livesum"),
        stage_seconds=Histogram("dicomseg_job_stage_duration_seconds", "Seconds each stage of a finished job "
                                "took, per bundle and stage (read, assemble, infer, write, preview, total)",
                                ["bundle", "stage"], buckets=STAGE_BUCKETS, registry=None),
        sent=Counter("dicomseg_results_sent", "Result objects delivered, per destination", ["destination"],
                     registry=None),
        failed=Counter("dicomseg_results_failed", "Failed deliveries of a result object that will be retried, "
                       "per destination", ["destination"], registry=None),
        dead=Counter("dicomseg_results_dead_lettered", "Result objects given up on (dead letters), per "
                     "destination", ["destination"], registry=None),
        send_seconds=Histogram("dicomseg_send_duration_seconds", "Seconds one delivery attempt to a destination "
                               "took (one association with every due object), whatever its outcome",
                               ["destination"], buckets=SEND_BUCKETS, registry=None),
        verified=Counter("dicomseg_results_verified", "Delivered result objects confirmed at the destination "
                         "afterwards (verify = \"find\"), per destination", ["destination"], registry=None),
        unverified=Counter("dicomseg_results_unverified", "Delivered result objects not found at the destination "
                           "within verify_timeout_s, and so sent again, per destination", ["destination"],
                           registry=None),
        qa_sets=Counter("dicomseg_qa_sets", "Edited structure sets that came back, per outcome (compared, no AI "
                        "result to compare, own result, rejected)", ["outcome"], registry=None),
        qa_structures=Counter("dicomseg_qa_edits", "Structures of the node's results measured against a clinician's "
                              "edit, per bundle and verdict", ["bundle", "verdict"], registry=None),
        qa_surface_dice=Histogram("dicomseg_qa_surface_dice", "Surface Dice at 2 mm between the node's structure and "
                                  "the clinician's edit of it, per bundle", ["bundle"], buckets=SURFACE_DICE_BUCKETS,
                                  registry=None),
        calling_ae=_Bounded(MAX_CALLING_AES),
        directory=directory,
        open_keys=set(),
        lock=threading.Lock(),
    )


def setup(directory: Path) -> None:
    """In the service's main process, before the workers start: empty ``directory`` of metric files (a
    previous run's), point prometheus_client (and the workers, by the environment) at it, create the metrics."""
    global _state
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.db"):
        old.unlink(missing_ok=True)
    _state = _create(directory)


def attach(directory: Path | None) -> None:
    """In a worker process: record into ``directory`` (the one :func:`setup` prepared); None: stay off."""
    global _state
    if directory is not None:
        _state = _create(directory)


def active() -> bool:
    return _state is not None


def reset() -> None:
    """Back to off in this process (tests): no more recording, the environment and value class restored."""
    global _state, _previous_value_class
    if _state is None:
        return
    _state = None
    os.environ.pop(ENV, None)
    from prometheus_client import values

    values.close_all_multiprocess_files()
    if _previous_value_class is not None:
        values.ValueClass = _previous_value_class
        _previous_value_class = None


def exposition_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry for ``/metrics``: every process's recorded metrics (when set up) and ``collectors``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    if _state is not None:
        MultiProcessCollector(registry, path=str(_state.directory))
    for collector in collectors:
        registry.register(collector)
    return registry


def process_dead(pid: int | None) -> None:
    """A worker process ended: drop its live gauges (its counters and histograms stay counted)."""
    if _state is not None and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(_state.directory))


def _recorder(func: Callable[Concatenate[_Metrics, P], None]) -> Callable[P, None]:
    """A record function: a no-op when metrics are off; a failure is logged (once per function), not raised."""

    @functools.wraps(func)
    def record(*args: P.args, **kwargs: P.kwargs) -> None:
        state = _state
        if state is None:
            return
        try:
            func(state, *args, **kwargs)
        except Exception:
            if func.__name__ not in _failed_once:
                _failed_once.add(func.__name__)
                log.exception("metric %s could not be recorded (further failures are not logged)", func.__name__)

    return record


# ---------------------------------------------------------------------------------------------- receive
def status_name(code: int) -> str:
    """A C-STORE status as a label: the name of :class:`node.dicom.status.Status`'s member, else hex."""
    name = getattr(code, "name", None)
    return name if isinstance(name, str) else f"0x{int(code):04X}"


@_recorder
def instance_received(m: _Metrics, calling_ae: str, size: int) -> None:
    ae = m.calling_ae(calling_ae)
    m.received.labels(ae).inc()
    m.received_bytes.labels(ae).inc(size)


@_recorder
def store_response(m: _Metrics, calling_ae: str, status: int) -> None:
    m.responses.labels(m.calling_ae(calling_ae), status_name(status)).inc()


@_recorder
def association_accepted(m: _Metrics, calling_ae: str, key: int) -> None:
    """An association was accepted; ``key`` identifies it until :func:`connection_closed`."""
    m.accepted.labels(m.calling_ae(calling_ae)).inc()
    with m.lock:
        m.open_keys.add(key)
    m.open_associations.inc()


@_recorder
def connection_closed(m: _Metrics, key: int) -> None:
    """A connection closed (released, aborted, timed out): an open association ``key`` is no longer."""
    with m.lock:
        if key not in m.open_keys:
            return
        m.open_keys.discard(key)
    m.open_associations.dec()


@_recorder
def association_rejected(m: _Metrics, reason: str) -> None:
    m.rejected.labels(reason).inc()


# ---------------------------------------------------------------------------------------------- jobs
@_recorder
def job_timings(m: _Metrics, bundle: str, timings: Mapping[str, float]) -> None:
    """The seconds of each stage of a finished job (the pipeline's timings, with the worker's ``total``)."""
    for stage, seconds in timings.items():
        m.stage_seconds.labels(bundle, stage).observe(seconds)


# ---------------------------------------------------------------------------------------------- edit QA
@_recorder
def qa_set(m: _Metrics, outcome: str, structures: Sequence[tuple[str, str, float | None]]) -> None:
    """An edited structure set was assessed: its outcome, and per structure (bundle, verdict, surface Dice at 2 mm)."""
    m.qa_sets.labels(outcome).inc()
    for bundle, verdict, surface_dice in structures:
        m.qa_structures.labels(bundle or "(added)", verdict).inc()
        if surface_dice is not None:
            m.qa_surface_dice.labels(bundle).observe(surface_dice)


# ---------------------------------------------------------------------------------------------- send
@_recorder
def result_sent(m: _Metrics, destination: str) -> None:
    m.sent.labels(destination).inc()


@_recorder
def result_failed(m: _Metrics, destination: str, *, dead: bool) -> None:
    """A delivery of one object failed: to be retried, or (``dead``) given up on."""
    (m.dead if dead else m.failed).labels(destination).inc()


@_recorder
def result_verified(m: _Metrics, destination: str, *, found: bool) -> None:
    """A delivered object was found at the destination, or (``found=False``) was not in time and is sent again."""
    (m.verified if found else m.unverified).labels(destination).inc()


@_recorder
def send_duration(m: _Metrics, destination: str, seconds: float) -> None:
    m.send_seconds.labels(destination).observe(seconds)


@contextmanager
def send_timer(destination: str) -> Iterator[None]:
    """Times the block (one delivery attempt), also when it raises."""
    started = time.monotonic()
    try:
        yield
    finally:
        send_duration(destination, time.monotonic() - started)
