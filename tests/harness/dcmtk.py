"""Drive DCMTK and dicom3tools from tests and benchmarks.

This module wraps the Debian command-line tools. It always calls them by
absolute path, because pynetdicom puts its own ``storescu``/``storescp``/
``echoscu`` into the virtual environment:

* :class:`StoreSCP` starts ``/usr/bin/storescp`` on a loopback port and
  collects the files it receives.
* :func:`storescu` and :func:`echoscu` run the DCMTK SCUs.
* :func:`dciodvfy` runs ``/usr/bin/dciodvfy`` and parses what it reports.
* :func:`tool_missing_reason` gives a pytest skip reason when a tool is missing.

Every subprocess is bounded by a timeout. Networking uses only 127.0.0.1.
DCMTK processes get ``TCP_NODELAY=1`` in their environment. Without it, DCMTK
leaves Nagle's algorithm on and waits about 40 ms on every DIMSE message.

DCMTK facts this module depends on (DCMTK 3.6.7, Debian):

* By default storescu proposes only uncompressed transfer syntaxes. It fails
  ("unable to convert dataset ...") on a JPEG 2000 file, because it has no
  JPEG 2000 decoder. ``-R`` does not help. ``-xs``/``-xv``/``-xt``/... each add
  only ONE compressed syntax. To send files of any mix of transfer syntaxes
  unchanged, :func:`storescu` writes an association configuration file and
  passes ``-xf FILE PROFILE``. That file gives one presentation context per
  (SOP class, transfer syntax) pair found in the files, and one uncompressed
  fallback context per SOP class.
* ``storescp -uf`` (the default) names a file ``<MODALITY>.<SOPInstanceUID>``,
  for example ``CT.1.2.840...``. It overwrites a file that already has that
  name. ``+uf`` makes unique names such as ``CT.X.1.2.276.0.7230010.3...``
  (a newly generated UID). ``-fe .dcm`` adds an extension.
* storescp writes a received file only after the whole dataset has arrived. It
  sends the C-STORE response after writing the file. So by the time storescu
  returns, the files are complete on disk.
* dciodvfy writes everything to stderr: lines ``Error - ...`` and
  ``Warning - ...``, the IOD name on a line of its own, and ``Abort - ...``
  when it cannot read the file. It exits with status 1 when there are errors.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.harness.processes import stop_process_group

LOOPBACK = "127.0.0.1"

STORESCP = Path("/usr/bin/storescp")
STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
DCIODVFY = Path("/usr/bin/dciodvfy")

# System directories only: PATH would find pynetdicom's look-alike commands.
_SYSTEM_BIN_DIRS = (Path("/usr/bin"), Path("/usr/sbin"), Path("/bin"), Path("/sbin"))

# Debian package that provides each tool (used in skip reasons).
_TOOL_PACKAGES: dict[str, str] = {
    **{
        name: "dcmtk"
        for name in (
            "storescp", "storescu", "echoscu", "findscu", "movescu", "getscu",
            "dcmsend", "dcmrecv", "dcmdump", "dcmodify", "dcmconv", "dcmcjpeg",
            "dcmdjpeg", "dcmcjpls", "dcmdjpls", "dcmcrle", "dcmdrle", "img2dcm",
            "dcmqrscp", "termscu",
        )
    },
    **{name: "dicom3tools" for name in ("dciodvfy", "dcentvfy", "dcdump", "dckey", "dcfile")},
    "orthanc": "orthanc",
    "Orthanc": "orthanc",
    "plastimatch": "plastimatch",
}
# Other names a tool is installed under (Debian installs /usr/sbin/Orthanc).
_TOOL_ALIASES: dict[str, tuple[str, ...]] = {"orthanc": ("Orthanc", "orthanc")}

# Uncompressed syntaxes: explicit LE, implicit LE, explicit BE (retired).
_UNCOMPRESSED_TS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
_MAX_PRESENTATION_CONTEXTS = 128


def _dcmtk_env() -> dict[str, str]:
    """Return the environment for DCMTK processes, with ``TCP_NODELAY=1`` set."""
    return {**os.environ, "TCP_NODELAY": "1"}


class DcmtkError(subprocess.CalledProcessError):
    """A DCMTK tool failed. Unlike the base class, the message includes the tool's output."""

    def __str__(self) -> str:
        out = "\n".join(s for s in (self.stdout, self.stderr) if isinstance(s, str) and s)
        return f"{super().__str__()}\n--- output (tail) ---\n{out[-4000:]}"


def tool_path(name: str) -> Path | None:
    """Return the absolute path of system tool ``name``, or None if it is not installed.

    Only system bin directories are searched, never PATH or the venv.
    """
    for candidate in _TOOL_ALIASES.get(name, (name,)):
        for directory in _SYSTEM_BIN_DIRS:
            path = directory / candidate
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def tool_missing_reason(*names: str) -> str | None:
    """Return a skip reason naming the missing tools and their apt packages, or None.

    >>> tool_missing_reason("storescp", "dciodvfy")  # doctest: +SKIP
    'missing tool(s): dciodvfy (apt-get install dicom3tools)'
    """
    missing = [n for n in names if tool_path(n) is None]
    if not missing:
        return None
    packages = sorted({_TOOL_PACKAGES.get(n, "?") for n in missing} - {"?"})
    hint = f" (apt-get install {' '.join(packages)})" if packages else ""
    return f"missing tool(s): {', '.join(missing)}{hint}"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Another process can still take it before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


class StoreSCP:
    """Run ``/usr/bin/storescp`` on 127.0.0.1 for the length of a ``with`` block.

    Received objects are written into ``directory``; it is created if needed.
    Each file gets a unique name (``+uf``). All transfer syntaxes are accepted
    (``+xa``) and kept as received.
    The process output goes to a log file outside ``directory``; read it with
    :meth:`log_text`.

    >>> with StoreSCP(tmp_path / "in", ae_title="TESTSCP") as scp:  # doctest: +SKIP
    ...     storescu(LOOPBACK, scp.port, scp.ae_title, [some_file])
    ...     files = scp.wait_for_files(1, timeout=10)
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        fork: bool = False,
        extension: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """Configure the SCP; :meth:`start` (or ``with``) launches it.

        ``port=None`` chooses a free port. ``fork=True`` handles associations
        in parallel, one child process each (``--fork``). ``extension``, such
        as ``".dcm"``, is added to every file name (``-fe``).
        """
        self.directory = Path(directory)
        self.ae_title = ae_title
        self.port: int = port if port is not None else 0
        self._auto_port = port is None
        self._fork = fork
        self._extension = extension
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._logdir: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    def _command(self) -> list[str]:
        cmd = [str(STORESCP), "-aet", self.ae_title, "-od", str(self.directory), "+xa", "+uf", "-dhl"]
        if self._fork:
            cmd.append("--fork")
        if self._extension:
            cmd += ["-fe", self._extension]
        return [*cmd, *self._extra_args, str(self.port)]

    def start(self) -> StoreSCP:
        """Start storescp and return once its port accepts connections.

        If storescp exits or the port does not open within
        ``startup_timeout``, raises RuntimeError with the end of the log.
        """
        if self._proc is not None:
            raise RuntimeError("StoreSCP already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._logdir = tempfile.TemporaryDirectory(prefix="storescp-log-")
        self.log_path = Path(self._logdir.name) / "storescp.log"
        attempts = 3 if self._auto_port else 1
        error = ""
        for _ in range(attempts):
            if self._auto_port:
                self.port = free_port()
            error = self._try_start()
            if not error:
                return self
        self.stop()
        raise RuntimeError(f"storescp did not start on port {self.port}: {error}")

    def _try_start(self) -> str:
        """Launch once; return "" on success, or a description of the failure."""
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_dcmtk_env(), start_new_session=True,
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with status {self._proc.returncode}: {self.log_text()[-2000:]}"
            if _port_open(self.port) and self._proc.poll() is None:  # not someone else's listener
                return ""
            time.sleep(0.02)
        self._terminate()
        return f"port not open after {self._startup_timeout}s: {self.log_text()[-2000:]}"

    def _terminate(self) -> None:
        """Send SIGTERM to the process group, then SIGKILL after ``stop_timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process_group(proc, self._stop_timeout)  # the group: also reaches --fork children

    def stop(self) -> None:
        """Stop storescp and delete its log. Safe to call more than once."""
        self._terminate()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None

    @property
    def running(self) -> bool:
        """Whether the storescp process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything storescp has written to stdout/stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def files(self) -> list[Path]:
        """Files received so far, oldest first (recursive; hidden names skipped)."""
        found = [p for p in self.directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def wait_for_files(self, count: int, timeout: float = 30.0, poll: float = 0.05) -> list[Path]:
        """Wait until at least ``count`` files have arrived and stopped growing; return them all.

        Raises TimeoutError on timeout, or RuntimeError if storescp has died.
        """
        deadline = time.monotonic() + timeout
        previous: dict[Path, int] | None = None
        while True:
            try:
                sizes = {p: p.stat().st_size for p in self.files()}
            except FileNotFoundError:  # file vanished while scanning; rescan
                sizes = {}
            if len(sizes) >= count and sizes == previous:
                return self.files()
            previous = sizes
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(sizes)} of {count} files in {self.directory} after {timeout}s;"
                    f" storescp log tail:\n{self.log_text()[-2000:]}"
                )
            if not self.running and len(sizes) < count:
                raise RuntimeError(f"storescp is not running; log tail:\n{self.log_text()[-2000:]}")
            time.sleep(poll)

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _expand(paths: Iterable[Path]) -> list[Path]:
    """Return the files in ``paths``, with directories searched recursively."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        else:
            out.append(p)
    return out


def _sop_class_and_ts(path: Path) -> tuple[str, str] | None:
    """Return (SOP Class UID, Transfer Syntax UID) from a file's meta header, or None."""
    from pydicom.filereader import read_file_meta_info

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_file_meta_info(path)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:  # not DICOM, or no meta header: storescu decides
        return None
    return (sop_class, ts) if sop_class and ts else None


def _as_is_config(pairs: Iterable[tuple[str, str]]) -> str:
    """Build a storescu association config (profile ``ASIS``) for the given pairs.

    Each (SOP class, TS) pair gets its own presentation context, so the SCP
    can accept the file's own syntax. Each SOP class also gets one context
    offering all uncompressed syntaxes as a fallback.
    """
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        syntaxes = by_class.setdefault(sop_class, [])
        if ts not in syntaxes:
            syntaxes.append(ts)
    n_contexts = sum(len(v) + 1 for v in by_class.values())
    if n_contexts > _MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"{n_contexts} presentation contexts needed (max {_MAX_PRESENTATION_CONTEXTS});"
            " send the files in several storescu calls"
        )
    all_ts = sorted({ts for v in by_class.values() for ts in v})
    ts_key = {ts: f"TS{i}" for i, ts in enumerate(all_ts, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts, key in ts_key.items():
        lines += [f"[{key}]", f"TransferSyntax1 = {ts}"]
    lines.append("[Uncompressed]")
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_UNCOMPRESSED_TS, 1)]
    lines += ["[[PresentationContexts]]", "[ASISContexts]"]
    n = 0
    for sop_class, syntaxes in by_class.items():
        for key in [ts_key[ts] for ts in syntaxes] + ["Uncompressed"]:
            n += 1
            lines.append(f"PresentationContext{n} = {sop_class}\\{key}")
    lines += ["[[Profiles]]", "[ASIS]", "PresentationContexts = ASISContexts", ""]
    return "\n".join(lines)


def storescu(
    host: str,
    port: int,
    called_aet: str,
    files_or_dirs: Path | str | Iterable[Path | str],
    *,
    calling_aet: str = "STORESCU",
    timeout: float = 120.0,
    as_is: bool = True,
    no_halt: bool = False,
    check: bool = True,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send DICOM files with ``/usr/bin/storescu``, all in one association.

    Directories are searched recursively (``+sd +r``). With ``as_is=True``
    (the default), each file is offered in its own transfer syntax, so
    compressed files (JPEG 2000, JPEG lossless, JPEG-LS, RLE, deflate) arrive
    unchanged. This needs the file meta header (read with pydicom). With
    ``as_is=False``, storescu's default applies: uncompressed only, and it
    fails on files it cannot decompress, such as JPEG 2000. ``no_halt``
    carries on after a failed store (``-nh``). ``check`` raises
    :class:`DcmtkError` on a non-zero exit status or a reported store
    failure. The whole run is limited to ``timeout`` seconds
    (subprocess.TimeoutExpired).
    """
    if isinstance(files_or_dirs, (str, Path)):
        files_or_dirs = [files_or_dirs]
    paths = [Path(p) for p in files_or_dirs]
    if not paths:
        raise ValueError("no files to send")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(p)
    net_timeout = str(max(1, int(timeout)))
    cmd = [
        str(STORESCU), "-aet", calling_aet, "-aec", called_aet,
        "-to", net_timeout, "-ta", net_timeout, "-ts", net_timeout,
    ]
    if any(p.is_dir() for p in paths):
        cmd += ["+sd", "+r"]
    if no_halt:
        cmd.append("-nh")
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        if as_is:
            pairs = [pair for f in _expand(paths) if (pair := _sop_class_and_ts(f))]
            if pairs:
                cfg = Path(tmp) / "storescu-asis.cfg"
                cfg.write_text(_as_is_config(pairs))
                cmd += ["-xf", str(cfg), "ASIS"]
        cmd += [*extra_args, host, str(port), *map(str, paths)]
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            timeout=timeout, env=_dcmtk_env(),
        )
    # storescu logs "E: Store Failed" but can still exit 0 (for example with -nh).
    failed = result.returncode != 0 or re.search(r"^E: .*(Failed|failed)", result.stderr, re.M)
    if check and failed:
        raise DcmtkError(result.returncode or 1, cmd, result.stdout, result.stderr)
    return result


def echoscu(
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str = "ECHOSCU",
    timeout: float = 10.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send a C-ECHO with ``/usr/bin/echoscu``. With ``check``, raise DcmtkError if it fails."""
    net_timeout = str(max(1, int(timeout)))
    cmd = [
        str(ECHOSCU), "-aet", calling_aet, "-aec", called_aet,
        "-to", net_timeout, "-ta", net_timeout, "-ts", net_timeout, host, str(port),
    ]
    result = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=timeout, env=_dcmtk_env(),
    )
    if check and result.returncode != 0:
        raise DcmtkError(result.returncode, cmd, result.stdout, result.stderr)
    return result


@dataclass(frozen=True)
class DciodvfyReport:
    """Parsed output of dciodvfy for one file.

    ``errors`` holds the ``Error - ...`` and ``Abort - ...`` lines.
    ``warnings`` holds the ``Warning - ...`` lines. Both keep the full line.
    ``raw`` is all the output.
    """

    path: Path
    returncode: int
    raw: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when dciodvfy reported no errors."""
        return not self.errors

    def summary(self) -> str:
        """Short text for assertion messages."""
        return f"{self.path}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)\n" + "\n".join(
            self.errors
        )


def dciodvfy(path: Path | str, *, timeout: float = 120.0, extra_args: Sequence[str] = ()) -> DciodvfyReport:
    """Check ``path`` against its IOD with ``/usr/bin/dciodvfy`` and parse the result.

    If dciodvfy exits non-zero without printing an error line, a synthetic
    error is added, so ``ok`` is never true for a failed run.
    """
    path = Path(path)
    result = subprocess.run(
        [str(DCIODVFY), *extra_args, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout,
    )
    errors: list[str] = []
    warns: list[str] = []
    for line in result.stdout.splitlines():
        line = line.rstrip()
        if line.startswith(("Error - ", "Abort - ")):
            errors.append(line)
        elif line.startswith("Warning - "):
            warns.append(line)
    if result.returncode != 0 and not errors:
        errors.append(f"Error - dciodvfy exited with status {result.returncode}")
    return DciodvfyReport(path, result.returncode, result.stdout, errors, warns)
