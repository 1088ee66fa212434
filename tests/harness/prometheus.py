"""A private, throw-away Prometheus server for tests of the node's metrics.

``Prometheus`` writes a configuration into a temporary directory that scrapes
the given targets (``["127.0.0.1:PORT"]``) every second, starts the system
``prometheus`` binary on a free loopback port with its TSDB in that directory,
waits for ``/-/ready`` and stops it again on exit.  Tests then assert on what
Prometheus itself reports through its HTTP API:

* :meth:`Prometheus.query` runs an instant query (``/api/v1/query``) and
  returns ``[(labels, value), ...]``;
* :meth:`Prometheus.wait_for` polls a query until a predicate holds; on
  timeout the assertion message shows the last result and every scrape
  target's health and last error, so a failing test says why;
* :meth:`Prometheus.targets` / :meth:`Prometheus.wait_for_targets` give the
  scrape targets' health (``/api/v1/targets``).

The system service that Debian's package installs (``:9090``) is never used:
each server here gets its own port, its own TSDB and its own config.  Only
the standard library is used for HTTP (``urllib`` + ``json``), with proxies
disabled so that requests never leave 127.0.0.1.

Facts of Prometheus 2.42 (Debian 12 build) this module depends on:

* ``/-/ready`` answers 200 about 0.1 s after the start, but the first scrape
  comes only ~5-6 s later: the discovery and scrape managers hand new target
  sets over on a fixed 5 s tick (no flag changes that in 2.42), then each
  scrape loop waits a hash-based offset within its interval.  Until then
  ``/api/v1/targets`` lists no active target at all.  Start the node before
  Prometheus, and give the first ``wait_for`` ~15 s.
* Before a target's first scrape its ``lastScrape`` is ``0001-01-01T00:00:00Z``
  and its health ``unknown``.
* SIGTERM shuts down gracefully in well under a second.
* The configuration is YAML; we write JSON, which YAML parsers read as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.harness.processes import stop_process_group

__all__ = [
    "PROMETHEUS_MISSING_REASON",
    "Prometheus",
    "PrometheusError",
    "Sample",
    "Target",
    "prometheus_binary",
    "prometheus_missing_reason",
    "requires_prometheus",
    "skip_without_prometheus",
]

LOOPBACK = "127.0.0.1"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMETHEUS_MISSING_REASON = (
    "prometheus is not installed: apt-get install prometheus (scripts/install-test-tools does it)"
)
_NEVER_SCRAPED = "0001-01-01T00:00:00Z"

Sample = tuple[dict[str, str], float]
"""One element of an instant vector: the series' labels and its value."""


class PrometheusError(RuntimeError):
    """Prometheus failed to start or died, or an API call returned an error.

    ``status`` is the HTTP status of a failed API call (else ``None``).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` executable, or ``None`` when it is not installed.

    Debian's ``/usr/bin/prometheus`` (the version this harness was checked
    against) comes first, then whatever ``prometheus`` is on ``PATH``.
    """
    if PROMETHEUS.is_file() and os.access(PROMETHEUS, os.X_OK):
        return str(PROMETHEUS)
    return shutil.which("prometheus")


def prometheus_missing_reason() -> str | None:
    """Why Prometheus cannot be used here (for ``pytest.skip``), or ``None``."""
    return PROMETHEUS_MISSING_REASON if prometheus_binary() is None else None


requires_prometheus = pytest.mark.skipif(prometheus_binary() is None, reason=PROMETHEUS_MISSING_REASON)
"""Mark for tests (or ``pytestmark``) that need a real Prometheus."""


def skip_without_prometheus() -> None:
    """``pytest.skip`` with the install hint when Prometheus is missing."""
    if prometheus_binary() is None:
        pytest.skip(PROMETHEUS_MISSING_REASON)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _duration(seconds: float) -> str:
    """A Prometheus duration: ``1s``, ``900ms``."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {seconds!r} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class Target:
    """One active scrape target as ``/api/v1/targets`` reports it."""

    job: str
    instance: str
    health: str  # "up", "down" or "unknown" (not scraped yet)
    last_error: str
    last_scrape: str  # RFC 3339; _NEVER_SCRAPED before the first scrape
    scrape_url: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def scraped(self) -> bool:
        """Whether Prometheus has tried to scrape this target at least once."""
        return bool(self.last_scrape) and self.last_scrape != _NEVER_SCRAPED

    def describe(self) -> str:
        error = f" lastError={self.last_error!r}" if self.last_error else ""
        return (
            f"job={self.job} instance={self.instance} health={self.health} "
            f"lastScrape={self.last_scrape}{error} url={self.scrape_url}"
        )


class Prometheus:
    """Context manager running a private Prometheus on a free loopback port.

    ``targets``: ``host:port`` strings scraped as job ``job`` at
    ``metrics_path`` every ``scrape_interval`` seconds (timeout
    ``scrape_timeout``, by default 90 % of the interval).

    ``workdir``: where config, TSDB and log go.  When omitted a temporary
    directory is created and removed on exit (the log text stays available
    through :meth:`log_text`); a given directory is kept.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "node",
        metrics_path: str = "/metrics",
        scrape_interval: float = 1.0,
        scrape_timeout: float | None = None,
        workdir: Path | None = None,
        startup_timeout: float = 30.0,
        executable: str | None = None,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
    ) -> None:
        if isinstance(targets, str):
            raise TypeError("targets is a list of 'host:port' strings, not one string")
        self.scrape_targets = list(targets)
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.scrape_timeout = scrape_interval * 0.9 if scrape_timeout is None else scrape_timeout
        if self.scrape_timeout > self.scrape_interval:
            raise ValueError("scrape_timeout must not exceed scrape_interval")
        self.startup_timeout = startup_timeout
        self.executable = executable or prometheus_binary()
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.host = LOOPBACK
        self.port = 0
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.startup_seconds: float | None = None  # start -> /-/ready
        self.first_scrape_seconds: float | None = None  # start -> every target scraped once
        self._started_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._final_log: str | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ paths
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise PrometheusError("Prometheus has not been started")
        return self.workdir / name

    @property
    def config_path(self) -> Path:
        return self._path("prometheus.yml")

    @property
    def log_path(self) -> Path:
        """Prometheus' stdout/stderr (deleted on exit with a temporary workdir)."""
        return self._path("prometheus.log")

    def log_text(self, max_chars: int = 20_000) -> str:
        """The tail of Prometheus' log, also after the server was stopped."""
        if self._final_log is not None:
            text = self._final_log
        elif self.workdir is not None and self.log_path.exists():
            text = self.log_path.read_text(errors="replace")
        else:
            text = ""
        return text[-max_chars:]

    # -------------------------------------------------------------- lifecycle
    def config(self) -> dict[str, Any]:
        """The configuration Prometheus is started with."""
        return {
            "global": {
                "scrape_interval": _duration(self.scrape_interval),
                "scrape_timeout": _duration(self.scrape_timeout),
                "evaluation_interval": "1m",  # no rules; keep the rule manager idle
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }

    def command(self) -> list[str]:
        assert self.executable is not None and self.workdir is not None
        return [
            self.executable,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=1d",  # silences the "no retention was set" notice
            f"--web.listen-address={self.host}:{self.port}",
            f"--log.level={self.log_level}",
            *self.extra_args,
        ]

    def start(self) -> Prometheus:
        """Start Prometheus and wait until ``/-/ready`` answers 200."""
        if self.executable is None:
            raise PrometheusError(PROMETHEUS_MISSING_REASON)
        if self._proc is not None:
            raise PrometheusError("Prometheus is already running")
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        else:
            assert self._workdir_arg is not None
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._final_log = None
        last_error: Exception | None = None
        for _attempt in range(3):  # retry on a port race with another process
            try:
                self._start_once()
                return self
            except PrometheusError as exc:
                last_error = exc
                self._kill()
        self._cleanup()
        raise PrometheusError(f"Prometheus did not start: {last_error}")

    def _start_once(self) -> None:
        assert self.executable is not None
        self.port = _free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        # Prometheus writes to this file for as long as it runs; stop()/_kill() closes it, so no `with` here.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        began = time.monotonic()
        self._started_at = began
        self.first_scrape_seconds = None
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = began + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with self._opener.open(self.base_url + "/-/ready", timeout=2) as resp:
                    ready = resp.status == 200
            except OSError:  # refused, or HTTPError 503 while the TSDB opens
                ready = False
            if ready:
                self.startup_seconds = time.monotonic() - began
                return
            time.sleep(0.05)
        raise PrometheusError(f"/-/ready not 200 after {self.startup_timeout:.0f} s; log:\n{self.log_text(4000)}")

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise PrometheusError(f"Prometheus exited with code {self._proc.returncode}; log:\n{self.log_text(4000)}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful: closes the TSDB), then SIGKILL after ``timeout`` s."""
        self._kill(timeout)
        self._cleanup()

    def _kill(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None:
            stop_process_group(proc, timeout)  # own session: only Prometheus
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup(self) -> None:
        if self.workdir is not None and self.log_path.exists():
            self._final_log = self.log_path.read_text(errors="replace")
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------------- API
    def api(self, path: str, params: dict[str, str] | None = None, *, timeout: float = 10.0) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; ``PrometheusError`` on an error."""
        url = f"{self.base_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with self._opener.open(url, timeout=timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                parsed = json.loads(detail)
                detail = f"{parsed.get('errorType')}: {parsed.get('error')}"
            raise PrometheusError(f"GET /api/v1/{path} {params or ''} -> HTTP {err.code}: {detail}", err.code) from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET /api/v1/{path} {params or ''}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        """Evaluate ``promql`` now: ``[(labels, value), ...]`` (a scalar gives ``[({}, value)]``).

        Values are floats (``NaN`` and ``±Inf`` included).  A range vector
        (``foo[1m]``) is refused: wrap it in a function such as ``rate()``.
        """
        data = self.api("query", {"query": promql})
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [(dict(item["metric"]), float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [({}, float(result[1]))]
        raise PrometheusError(f"query {promql!r} returned a {kind}, not an instant vector or scalar")

    def targets(self) -> list[Target]:
        """The active scrape targets and their health (none until the first target sync, ~5 s)."""
        data = self.api("targets", {"state": "active"})
        return [
            Target(
                job=str(t["labels"].get("job", t.get("scrapePool", ""))),
                instance=str(t["labels"].get("instance", "")),
                health=str(t.get("health", "")),
                last_error=str(t.get("lastError", "")),
                last_scrape=str(t.get("lastScrape", "")),
                scrape_url=str(t.get("scrapeUrl", "")),
                labels=dict(t["labels"]),
            )
            for t in data.get("activeTargets", [])
        ]

    def describe_targets(self) -> str:
        """The targets' health and last errors, one per line, for failure messages."""
        try:
            targets = self.targets()
        except (OSError, PrometheusError) as exc:
            return f"  (targets unavailable: {exc})"
        if not targets:
            return (
                f"  (no active target yet; configured: {self.scrape_targets}; "
                "Prometheus 2.42 applies targets ~5 s after its start)"
            )
        return "\n".join("  " + t.describe() for t in targets)

    def _since_start(self) -> str:
        if self._started_at is None:
            return "not started"
        return f"{time.monotonic() - self._started_at:.1f} s after the start"

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Sample]], bool] | None = None,
        timeout: float = 15.0,
        interval: float = 0.2,
    ) -> list[Sample]:
        """Poll ``query(promql)`` until ``predicate(result)`` holds (default: non-empty); return the result.

        Raises ``AssertionError`` after ``timeout`` seconds with the last
        result and every target's health and last error.  An invalid query
        (HTTP 400/422) raises ``PrometheusError`` at once; Prometheus dying
        raises it with the log.
        """
        check = predicate if predicate is not None else bool
        deadline = time.monotonic() + timeout
        polls = 0
        last: list[Sample] | str = "(no answer yet)"
        while True:
            self._check_alive()
            polls += 1
            try:
                last = self.query(promql)
            except PrometheusError as exc:
                if exc.status in (400, 422):
                    raise
                last = f"error: {exc}"
            except OSError as exc:
                last = f"error: {exc}"
            if not isinstance(last, str) and check(last):
                return last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(interval, remaining))
        raise AssertionError(
            f"Prometheus query {promql!r} did not satisfy the predicate within {timeout:.1f} s "
            f"({polls} polls, {self._since_start()})\n"
            f"last result: {last}\n"
            f"scrape targets ({self.base_url}/api/v1/targets):\n{self.describe_targets()}"
        )

    def wait_for_targets(self, health: str | None = "up", timeout: float = 20.0) -> list[Target]:
        """Wait until every configured target was scraped once (and, unless ``health`` is None, has that health).

        Records :attr:`first_scrape_seconds` the first time every target has been scraped.
        """
        deadline = time.monotonic() + timeout
        targets: list[Target] = []
        while True:
            self._check_alive()
            targets = self.targets()
            scraped = len(targets) >= len(self.scrape_targets) and all(t.scraped for t in targets)
            if scraped and self.first_scrape_seconds is None and self._started_at is not None:
                self.first_scrape_seconds = time.monotonic() - self._started_at
            if scraped and (health is None or all(t.health == health for t in targets)):
                return targets
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        want = "scraped" if health is None else f"scraped and {health!r}"
        raise AssertionError(
            f"Prometheus targets not all {want} within {timeout:.1f} s ({self._since_start()}):\n"
            f"{self.describe_targets()}"
        )
