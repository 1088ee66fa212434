"""A private, throw-away Orthanc PACS for integration tests.

``OrthancServer`` writes its own JSON configuration into a temporary
directory (storage and SQLite index live there too), starts the system
``Orthanc`` binary on free loopback ports, waits for ``GET /system`` to
answer and stops it again on exit.  A few REST helpers cover what tests need:
upload files, look studies up, and push a study to a DICOM modality (our node)
by C-STORE.

Only the standard library is used for HTTP (``urllib`` + ``json``), with
proxies disabled so that requests never leave 127.0.0.1.

Caveats of Orthanc 1.10.1 (Debian build), checked against its binary and
``Orthanc --config=``:

* There is no bind-address option for the DICOM server: it listens on all
  interfaces (DCMTK's ``ASC_initializeNetwork``).  The HTTP server also binds
  all interfaces but, with ``RemoteAccessAllowed: false``, refuses every
  client that is not localhost.  Set ``dicom_server=False`` when a test only
  needs Orthanc as an SCU (sending) and the REST API.
* ``TcpNoDelay`` exists but only concerns the HTTP server (CivetWeb).  The
  DICOM side uses DCMTK 3.6.7's dcmnet, which leaves Nagle's algorithm ON
  unless the ``TCP_NODELAY`` environment variable is non-zero (checked with
  strace: without it the C-STORE SCU socket gets no ``TCP_NODELAY``).  We
  export ``TCP_NODELAY=1``; a 34-instance C-STORE to storescp then runs at
  ~500 instances/s instead of ~100/s with erratic delayed-ACK stalls.
* Start-up takes ~0.1 s; a graceful shutdown takes ~3 s (CivetWeb ~2 s).
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
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tests.harness.processes import stop_process_group

__all__ = [
    "OrthancError",
    "OrthancServer",
    "find_orthanc",
    "free_port",
    "orthanc_missing_reason",
    "wait_for",
]

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
_DEFAULT_EXECUTABLES = ("Orthanc", "/usr/sbin/Orthanc")
_NON_DICOM_NAMES = frozenset({"DICOMDIR", "DIRFILE"})


class OrthancError(RuntimeError):
    """Orthanc failed to start, or a REST call returned an error.

    ``status`` is the HTTP status of a failed REST call (else ``None``).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def find_orthanc() -> str | None:
    """Path of the Orthanc executable, or ``None`` when it is not installed."""
    for candidate in _DEFAULT_EXECUTABLES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def orthanc_missing_reason() -> str | None:
    """Why Orthanc cannot be used here (for ``pytest.skip``), or ``None``."""
    if find_orthanc() is None:
        return "Orthanc executable not found (apt-get install orthanc)"
    return None


def free_port() -> int:
    """A TCP port that is currently free on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return it.

    Raises ``TimeoutError`` after ``timeout`` seconds.  The predicate is
    always called at least once and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"condition not met within {timeout:.1f} s")
        time.sleep(min(interval, remaining))


class OrthancServer:
    """Context manager running a private Orthanc on loopback ports.

    ``modalities`` maps a modality name to ``(aet, host, port)``; Orthanc can
    then C-STORE to it with :meth:`send_study_to_modality`.  Modalities can
    also be added while running with :meth:`add_modality`.

    ``workdir``: where config, storage, index and log go.  When omitted a
    temporary directory is created and removed on exit (the log text stays
    available through :meth:`log_text`); a given directory is kept.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        workdir: Path | None = None,
        stable_age: int = 1,
        scu_timeout: int = 15,
        dicom_server: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
        executable: str | None = None,
        log_flags: tuple[str, ...] = (),
    ) -> None:
        self.aet = aet
        self.host = LOOPBACK
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.stable_age = stable_age
        self.scu_timeout = scu_timeout
        self.dicom_server = dicom_server
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.executable = executable or find_orthanc()
        self.log_flags = log_flags  # e.g. ("--verbose-dicom",)
        self.skipped: list[Path] = []  # non-DICOM files of the last upload
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.http_port = 0
        self.dicom_port = 0
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._final_log: str | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ paths
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout/stderr log (deleted on exit with a temp workdir)."""
        if self.workdir is None:
            raise OrthancError("Orthanc has not been started")
        return self.workdir / "orthanc.log"

    @property
    def config_path(self) -> Path:
        if self.workdir is None:
            raise OrthancError("Orthanc has not been started")
        return self.workdir / "orthanc.json"

    def log_text(self, max_chars: int = 20_000) -> str:
        """The tail of Orthanc's log, also after the server was stopped."""
        if self._final_log is not None:
            text = self._final_log
        elif self.workdir is not None and self.log_path.exists():
            text = self.log_path.read_text(errors="replace")
        else:
            text = ""
        return text[-max_chars:]

    # -------------------------------------------------------------- lifecycle
    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        assert self.workdir is not None
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "KeepAlive": True,
            "TcpNoDelay": True,  # HTTP only (CivetWeb)
            "HttpTimeout": 10,
            "DicomServerEnabled": self.dicom_server,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": self.scu_timeout,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                name: [aet, host, int(port)]
                for name, (aet, host, port) in self.modalities.items()
            },
            "OrthancPeersInDatabase": False,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "SynchronousCMove": True,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers ``/system``."""
        if self.executable is None:
            raise OrthancError(orthanc_missing_reason() or "Orthanc not found")
        if self._proc is not None:
            raise OrthancError("Orthanc is already running")
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-test-"))
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
            except OrthancError as exc:
                last_error = exc
                self._kill()
        self._cleanup()
        raise OrthancError(f"Orthanc did not start: {last_error}")

    def _start_once(self) -> None:
        assert self.workdir is not None and self.executable is not None
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"  # read by DCMTK's dcmnet: disable Nagle
        # Orthanc writes to this file for as long as it runs; stop()/_kill() closes it, so no `with` here.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        began = time.monotonic()
        self._proc = subprocess.Popen(
            [self.executable, "--no-jobs", *self.log_flags, str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = began + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._proc.returncode}; "
                    f"log:\n{self.log_text(4000)}"
                )
            try:
                self.get("/system", timeout=2)
            except (OSError, OrthancError):
                time.sleep(0.05)
                continue
            self.startup_seconds = time.monotonic() - began
            return
        raise OrthancError(
            f"REST API not up after {self.startup_timeout:.0f} s; "
            f"log:\n{self.log_text(4000)}"
        )

    def stop(self) -> None:
        """Shut Orthanc down (REST, then SIGTERM, then SIGKILL)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, OrthancError):
                self.post("/tools/shutdown", b"", timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        self._kill()
        self._cleanup()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            stop_process_group(proc, 10.0)  # own session: only Orthanc
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

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------- REST
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> bytes:
        """Raw REST call; raises ``OrthancError`` on an HTTP error status."""
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise OrthancError(
                f"{method} {path} -> HTTP {err.code}: {detail[:2000]}", err.code
            ) from None

    def get(self, path: str, *, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post(self, path: str, body: Any, *, timeout: float = 30.0) -> Any:
        """POST ``body`` (bytes as-is, anything else as JSON); decode JSON."""
        if isinstance(body, bytes):
            data, ctype = body, "application/octet-stream"
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        raw = self.request("POST", path, data, content_type=ctype, timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def put(self, path: str, body: Any, *, timeout: float = 30.0) -> Any:
        raw = self.request(
            "PUT", path, json.dumps(body).encode(), timeout=timeout
        )
        return json.loads(raw) if raw.strip() else None

    # --------------------------------------------------------------- helpers
    def upload(
        self, path_or_dir: str | os.PathLike[str], *, strict: bool = False
    ) -> list[str]:
        """Upload a DICOM file, or every file below a directory.

        Returns Orthanc instance ids in file order (sorted paths).  Files that
        are not DICOM instances (named ``DICOMDIR``/``DIRFILE``, or anything
        Orthanc rejects with HTTP 400, or 404 "Inexistent tag" as it answers
        for a DICOMDIR without patient/study tags) are skipped and listed in
        :attr:`skipped`; with ``strict=True`` they raise instead.
        """
        root = Path(path_or_dir)
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file()
        )
        if not files:
            raise FileNotFoundError(f"no files under {root}")
        self.skipped = []
        ids: list[str] = []
        for file in files:
            if file.name.upper() in _NON_DICOM_NAMES and not strict:
                self.skipped.append(file)
                continue
            try:
                answer = self.post("/instances", file.read_bytes())
            except OrthancError as err:
                if strict or err.status not in (400, 404):
                    raise
                self.skipped.append(file)
                continue
            ids.append(str(answer["ID"]))
        return ids

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return [str(s) for s in self.get("/studies")]

    def instances(self) -> list[str]:
        """Orthanc ids of all instances."""
        return [str(i) for i in self.get("/instances")]

    def study_instances(self, study_id: str, *, tags: bool = True) -> list[dict[str, Any]]:
        """Instances of a study as Orthanc's expanded dicts.

        With ``tags`` each dict also gets ``"Tags"``: the instance's
        simplified tags (keyword -> value), one extra request per instance.
        """
        items: list[dict[str, Any]] = self.get(f"/studies/{study_id}/instances")
        if tags:
            for item in items:
                item["Tags"] = self.get(f"/instances/{item['ID']}/simplified-tags")
        return items

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of the study with that StudyInstanceUID, if stored."""
        found = self.post("/tools/lookup", study_instance_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality while Orthanc runs."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = (aet, host, port)

    def send_study_to_modality(
        self,
        study_id: str,
        modality_name: str,
        *,
        synchronous: bool = True,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """C-STORE a study (or any resource id) to a declared modality.

        Synchronous: waits for the whole transfer (HTTP timeout ``timeout``)
        and returns Orthanc's summary (``InstancesCount``, ``FailedInstancesCount``,
        ...).  Asynchronous: returns the job (``{"ID", "Path"}``) at once; see
        :meth:`wait_job`.
        """
        body = {
            "Resources": [study_id],
            "Synchronous": synchronous,
            "Timeout": self.scu_timeout,
        }
        answer = self.post(
            f"/modalities/{modality_name}/store", body, timeout=timeout
        )
        return dict(answer or {})

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll an Orthanc job until it ends; raise unless it succeeded."""

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = self.get(f"/jobs/{job_id}")
            return job if job.get("State") in ("Success", "Failure") else None

        job = wait_for(done, timeout, 0.1)
        assert job is not None
        if job["State"] != "Success":
            raise OrthancError(f"job {job_id} failed: {json.dumps(job)[:2000]}")
        return job

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def wait_for(
        self, predicate: Callable[[], T], timeout: float, interval: float = 0.1
    ) -> T:
        """Same as the module-level :func:`wait_for`."""
        return wait_for(predicate, timeout, interval)

    def iter_study_files(self, study_id: str) -> Iterator[tuple[str, bytes]]:
        """``(instance id, file bytes)`` for each instance of a study."""
        for item in self.study_instances(study_id, tags=False):
            yield str(item["ID"]), self.instance_file(str(item["ID"]))
