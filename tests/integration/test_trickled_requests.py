"""Trickled association requests (issue 19): raw TCP peers that each declare a 1 MiB A-ASSOCIATE-RQ and then
send one byte every few seconds must not keep a real sender out, and the node closes them within its bound.

The peers all come from 127.0.0.1, as does DCMTK's storescu, which pushes a real series while they drip.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.harness.dcmtk import storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
DRIPS = 66  # more than the node's 64 association slots
HEADER = b"\x01\x00\x00\x10\x00\x00"  # A-ASSOCIATE-RQ, declaring 0x00100000 = 1 MiB to follow
DRIP_EVERY_S = 2.0
#: node.association_request_timeout_s (its default), and the slack allowed on top for the node to notice.
REQUEST_TIMEOUT_S = 10.0
SLACK_S = 5.0
SLICES = 8


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu"):
        pytest.skip(reason)


class Dripper:
    """``count`` raw connections that each send :data:`HEADER` and then one byte every :data:`DRIP_EVERY_S`,
    noting when the node closes each one (seconds after it was opened)."""

    def __init__(self, port: int, count: int) -> None:
        self.socks: list[socket.socket] = []
        self.opened: list[float] = []
        self.closed_after: dict[int, float] = {}
        self.sent: dict[int, int] = {}
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=5)
            self.opened.append(time.monotonic())
            sock.sendall(HEADER)
            self.sent[len(self.socks)] = len(HEADER)
            sock.setblocking(False)
            self.socks.append(sock)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dripper", daemon=True)
        self._thread.start()

    def open_count(self) -> int:
        with self._lock:
            return len(self.socks) - len(self.closed_after)

    def _closed(self, i: int) -> None:
        with self._lock:
            self.closed_after.setdefault(i, time.monotonic() - self.opened[i])

    def _run(self) -> None:
        next_drip = time.monotonic() + DRIP_EVERY_S
        while not self._stop.is_set():
            live = [s for i, s in enumerate(self.socks) if i not in self.closed_after]
            if not live:
                return
            readable, _, _ = select.select(live, [], [], 0.05)
            for sock in readable:
                i = self.socks.index(sock)
                try:
                    if not sock.recv(4096):
                        self._closed(i)
                except BlockingIOError:
                    pass
                except OSError:
                    self._closed(i)
            if time.monotonic() >= next_drip:
                next_drip += DRIP_EVERY_S
                for i, sock in enumerate(self.socks):
                    if i in self.closed_after:
                        continue
                    try:
                        self.sent[i] += sock.send(b"\x00")
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._closed(i)

    def wait_all_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.open_count():
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def test_trickled_requests_hold_no_slot_and_are_closed_in_time(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=SLICES, rows=64, columns=64, pixel_spacing=(6.0, 6.0),
                             slice_thickness=5.0)
    with NodeProcess(tmp_path / "node", quiet_period_s=600, release_settle_s=600) as node:
        dripper = Dripper(node.port, DRIPS)
        try:
            time.sleep(1.0)  # the node has seen them all; they keep dripping
            pushed_at = time.monotonic() - dripper.opened[-1]
            push = storescu(HOST, node.port, node.ae_title, series.files, calling_aet="CT_SCANNER1", timeout=60,
                            check=False)
            open_after_push = dripper.open_count()
            dripper.wait_all_closed(dripper.opened[-1] + REQUEST_TIMEOUT_S + SLACK_S - time.monotonic())
        finally:
            dripper.stop()
        stored = [s["instance_count"] for s in node.status()["series"] if s["series_uid"] == series.series_uid]
        log = node.log_text()
    output = (push.stdout + push.stderr)[-3000:]
    still_open = [i for i in range(DRIPS) if i not in dripper.closed_after]
    late = {i: round(t, 1) for i, t in dripper.closed_after.items() if t > REQUEST_TIMEOUT_S + SLACK_S}
    print(f"\npush {pushed_at:.1f} s after the last drip connection: exit {push.returncode}, "
          f"{open_after_push} drip connections still open after it; closed after "
          f"{sorted(round(t, 1) for t in dripper.closed_after.values())[-8:]} s (the last 8); "
          f"still open: {len(still_open)}; stored: {stored}")
    assert push.returncode == 0 and not re.search(r"^E: ", push.stderr, re.M), f"storescu failed:\n{output}"
    assert "Local Limit Exceeded" not in output
    assert stored == [SLICES], f"the node holds {stored} instances of the series, {SLICES} were sent"
    assert open_after_push > 0, "no drip connection was open while storescu pushed: the test proves nothing"
    assert not still_open, (f"{len(still_open)} of {DRIPS} trickled requests still open "
                            f"{REQUEST_TIMEOUT_S + SLACK_S:.0f} s after they started")
    assert not late, f"trickled requests closed later than {REQUEST_TIMEOUT_S + SLACK_S:.0f} s: {late}"
    timed_out = re.findall(r"peer 127\.0\.0\.1:\d+ sent (\d+) of 1048582 bytes of an A-ASSOCIATE-RQ in 10 s; "
                           r"closed", log)
    evicted = re.findall(r"connection from 127\.0\.0\.1:\d+ closed: \d+ connections from 127\.0\.0\.1 had not "
                         r"completed an association request", log)
    assert timed_out and all(int(n) > len(HEADER) for n in timed_out), log[-4000:]
    assert "shorter than expected" not in log, "a closed connection was logged twice (pynetdicom's line too)"
    assert len(timed_out) + len(evicted) >= DRIPS, (len(timed_out), len(evicted), log[-4000:])
