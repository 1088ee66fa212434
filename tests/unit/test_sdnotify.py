"""sd_notify: the protocol helpers against a real datagram socket, then the real service end to end.

The end-to-end test plays systemd's part for ``Type=notify`` + ``NotifyAccess=main`` +
``WatchdogSec=``: it owns $NOTIFY_SOCKET, reads each datagram's sender PID from SCM_CREDENTIALS
(systemd drops messages from any other PID under NotifyAccess=main), and expects READY=1 once the
listener is up, WATCHDOG=1 more often than WATCHDOG_USEC, and STOPPING=1 plus exit 0 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.service import sdnotify

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
WATCHDOG_USEC = 2_000_000
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


@dataclass
class Datagram:
    fields: list[str]  # "KEY=VALUE" lines
    pid: int | None  # sender, from SCM_CREDENTIALS
    at: float  # time.monotonic() on receipt


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.received: list[Datagram] = []

    def receive(self, timeout: float) -> Datagram | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        datagram = Datagram(data.decode().splitlines(), pid, time.monotonic())
        self.received.append(datagram)
        return datagram

    def close(self) -> None:
        self.sock.close()


def _short_dir(tmp_path: Path) -> Path:
    """tmp_path, or a shorter folder when a socket path in it would not fit in sun_path."""
    if len(str(tmp_path / "notify.sock").encode()) <= _SUN_PATH_MAX:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sdn-"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def listener(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    path = _short_dir(tmp_path) / "notify.sock"
    lis = NotifyListener(str(path))
    clean_env.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield lis
    finally:
        lis.close()


# ---------------------------------------------------------------------------------- notify()
def test_notify_sends_one_datagram(listener: NotifyListener) -> None:
    assert sdnotify.notify("READY=1") is True
    got = listener.receive(5)
    assert got is not None
    assert got.fields == ["READY=1"]
    assert got.pid == os.getpid()


def test_notify_sends_several_fields_in_one_datagram(listener: NotifyListener) -> None:
    assert sdnotify.notify("READY=1\nSTATUS=receiving") is True
    got = listener.receive(5)
    assert got is not None and got.fields == ["READY=1", "STATUS=receiving"]


def test_notify_abstract_namespace_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"dicom-seg-node-test-{os.getpid()}-{uuid.uuid4().hex}"
    lis = NotifyListener(b"\0" + name.encode())  # what systemd means by NOTIFY_SOCKET=@name
    try:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1") is True
        got = lis.receive(5)
        assert got is not None and got.fields == ["WATCHDOG=1"]
    finally:
        lis.close()


def test_notify_without_systemd_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_notify_to_a_missing_socket_returns_false(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(_short_dir(tmp_path) / "nobody-listens.sock"))
    assert sdnotify.notify("READY=1") is False


# ----------------------------------------------------------------------- watchdog_interval_s()
def test_watchdog_interval_is_half_of_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    assert sdnotify.watchdog_interval_s() == pytest.approx(1.0)  # no WATCHDOG_PID: meant for us
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == pytest.approx(1.0)
    clean_env.setenv("WATCHDOG_USEC", "60000000")  # WatchdogSec=60
    assert sdnotify.watchdog_interval_s() == pytest.approx(30.0)


def test_watchdog_meant_for_another_process_is_ignored(clean_env: pytest.MonkeyPatch) -> None:
    # What a child of the main process (a worker) sees: systemd's WATCHDOG_PID is its parent.
    clean_env.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    clean_env.setenv("WATCHDOG_PID", str(os.getppid()))
    assert sdnotify.watchdog_interval_s() is None


def test_no_watchdog_configured(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval_s() is None
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() is None


# ------------------------------------------------------------------------------ the real service
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-6000:]
    except FileNotFoundError:
        return ""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "watchdog_pid",
    [
        pytest.param("unset", id="no-WATCHDOG_PID"),
        pytest.param("own", id="WATCHDOG_PID-is-main"),  # exactly what systemd sets
        pytest.param("other", id="WATCHDOG_PID-is-another-process"),
    ],
)
def test_service_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, listener: NotifyListener, watchdog_pid: str
) -> None:
    port = _free_port()
    serve = [sys.executable, "-m", "node", "serve", "--state-dir", str(tmp_path / "state"),
             "--port", str(port), "--bind", LOOPBACK]
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "WATCHDOG_USEC")}
    env.update(NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"], WATCHDOG_USEC=str(WATCHDOG_USEC), PYTHONUNBUFFERED="1")
    if watchdog_pid == "own":
        # The child's PID is not known before it starts: let a shell export its own PID and exec the
        # service in place, keeping that PID, as systemd does for the main process.
        command = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ && export WATCHDOG_PID && exec ' + shlex.join(serve)]
    else:
        command = serve
        if watchdog_pid == "other":
            env["WATCHDOG_PID"] = str(os.getpid())
    expect_watchdog = watchdog_pid != "other"

    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:

        def wait_for(field: str, timeout: float) -> Datagram:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                got = listener.receive(min(left, 0.5))
                if got is not None and field in got.fields:
                    return got
                if got is None and proc.poll() is not None:
                    pytest.fail(f"the service exited with {proc.returncode} before {field}:\n{_log(log_path)}")
            pytest.fail(f"no {field} within {timeout} s; got {[d.fields for d in listener.received]}:\n"
                        f"{_log(log_path)}")

        ready = wait_for("READY=1", STARTUP_TIMEOUT_S)
        with socket.create_connection((LOOPBACK, port), timeout=5):  # READY=1 means the listener is up
            pass
        assert not any("WATCHDOG=1" in d.fields for d in listener.received[:-1]), "a watchdog ping before READY=1"

        if expect_watchdog:
            first = wait_for("WATCHDOG=1", 10)
            second = wait_for("WATCHDOG=1", 10)
            gap = second.at - first.at
            # Every WATCHDOG_USEC/2 (1 s): not a flood, and well inside the 2 s systemd would allow.
            assert 0.8 <= gap < WATCHDOG_USEC / 1e6, f"{gap:.2f} s between watchdog pings"
        else:
            # WATCHDOG_PID names another process: the watchdog is not ours, so never ping.
            time.sleep(2.5)
            while listener.receive(0.1) is not None:
                pass
            pings = [d for d in listener.received if "WATCHDOG=1" in d.fields]
            assert pings == [], "pinged a watchdog that WATCHDOG_PID says belongs to another process"

        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process only
        stopping = wait_for("STOPPING=1", STOP_TIMEOUT_S)
        assert stopping.at >= ready.at
        try:
            rc = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not exit within {STOP_TIMEOUT_S} s of SIGTERM:\n{_log(log_path)}")
        assert rc == 0, _log(log_path)
        while listener.receive(0.2) is not None:  # whatever is still queued
            pass

        # NotifyAccess=main: systemd accepts only datagrams sent by the main PID.
        senders = {d.pid for d in listener.received}
        assert senders == {proc.pid}, f"notifications came from {senders}, main PID is {proc.pid}"
        after_stop = listener.received[listener.received.index(stopping) + 1:]
        assert not any("READY=1" in d.fields or "WATCHDOG=1" in d.fields for d in after_stop)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
