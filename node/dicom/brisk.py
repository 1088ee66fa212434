"""pynetdicom's polling, tightened while a peer is sending.

pynetdicom runs two polling loops per association: the DUL thread (socket in, PDUs out) sleeps
``_run_loop_delay`` (1 ms) whenever it finds nothing to do, and the association's reactor (which hands a
completed DIMSE message to our C-STORE handler) sleeps 1 ms between looks at its queue. A sender that waits
for each C-STORE response before sending the next instance (DCMTK's storescu, most modalities) waits out
both, on every instance: the DUL sleeps once after it has sent the response, before it sees the next
request, and the reactor sleeps between the request's last PDU and our handler. On a push of 512×512 CT
slices that was about 1 ms of a 5 ms round trip (benchmarks/receive_and_turnaround.py, issue 16).

Within :data:`BRISK_WINDOW_S` of the last PDU received (the DUL's network idle timer, restarted by every
PDU) both loops sleep :data:`BRISK_POLL_S` instead; an association that has gone quiet polls at pynetdicom's
own pace again, so an idle association costs no more CPU than before. Nothing changes in what is
answered, or when relative to the fsync: this only shortens the sleeps between looks.
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom.association
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

#: How long a loop sleeps between looks while the peer is sending.
BRISK_POLL_S = 0.0001
#: A PDU received this recently (seconds) means the peer is sending.
BRISK_WINDOW_S = 0.5
#: The association reactor's own sleep (pynetdicom 2.x/3.x ``Association._run_reactor``).
REACTOR_SLEEP_S = 0.001


def recently_received(dul: DULServiceProvider | None) -> bool:
    """Whether ``dul`` received a PDU within :data:`BRISK_WINDOW_S` (its network idle timer's start)."""
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return isinstance(started, float) and time.time() - started < BRISK_WINDOW_S


class BriskDUL(DULServiceProvider):
    """pynetdicom's DUL provider, sleeping :data:`BRISK_POLL_S` between looks while the peer is sending."""

    @property
    def _run_loop_delay(self) -> float:
        if recently_received(self):
            return BRISK_POLL_S
        return float(self.__dict__.get("_run_loop_delay", 0.001))

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        self.__dict__["_run_loop_delay"] = value


def brisk_while_sending(event: evt.Event) -> None:
    """EVT_CONN_OPEN: make the association's DUL provider a :class:`BriskDUL` (the same object, its state kept)."""
    dul = event.assoc.dul
    if type(dul) is DULServiceProvider:
        dul.__class__ = BriskDUL


class _ReactorClock:
    """Stands in for the ``time`` module inside :mod:`pynetdicom.association`: the reactor's 1 ms sleep is
    :data:`BRISK_POLL_S` on an association whose DUL provider is a :class:`BriskDUL` that received a PDU
    recently; every other call goes to :mod:`time` unchanged."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def sleep(self, seconds: float) -> None:
        if seconds == REACTOR_SLEEP_S:
            assoc = threading.current_thread()
            if isinstance(assoc, Association) and isinstance(assoc.dul, BriskDUL) and recently_received(assoc.dul):
                seconds = BRISK_POLL_S
        self._real.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install_brisk_reactor() -> None:
    """Give :mod:`pynetdicom.association` the :class:`_ReactorClock` (once per process; idempotent)."""
    current = pynetdicom.association.time
    if not isinstance(current, _ReactorClock):
        pynetdicom.association.time = _ReactorClock(current)  # type: ignore[assignment]
