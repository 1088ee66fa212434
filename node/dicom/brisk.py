"""pynetdicom's polling loops, woken by what they wait for instead of by the clock.

pynetdicom runs two loops per association that poll: the DUL thread (socket in, PDUs out) sleeps 1 ms
(``_run_loop_delay``) whenever it finds nothing to do, and the association's reactor (which hands a
completed DIMSE message to our C-STORE handler) sleeps 1 ms between looks at its message queue. A sender
that waits for each C-STORE response before sending the next instance (DCMTK's storescu, most modalities)
waits out both on every instance: the DUL sleeps after it has sent the response, before it sees the next
request, and the reactor sleeps between the request's last PDU and our handler. On a push of 512×512 CT
slices that was about 1.2 ms of a 5.3 ms round trip (issue 16, item 9; profile in the README).

Here the two sleeps wait on the thing they poll for, for at most as long as pynetdicom would have slept:
the DUL's on its socket (``select``), the reactor's on its DIMSE message queue. Each wakes the moment the
next PDU or message arrives, and costs no CPU while it waits (a shorter fixed sleep would: polling every
0.1 ms cost 15–30 % more CPU per instance, which a 2-core node also needs for inference). Nothing changes in
what is answered, or when relative to the fsync: only the wait between looks is shorter.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
from types import ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

#: The association reactor's own sleep (pynetdicom 2.x/3.x ``Association._run_reactor``).
REACTOR_SLEEP_S = 0.001


class BriskDUL(DULServiceProvider):
    """pynetdicom's DUL provider, whose idle sleep ends as soon as its socket has data (:class:`_DulClock`)."""


def brisk_while_sending(event: evt.Event) -> None:
    """EVT_CONN_OPEN: make the association's DUL provider a :class:`BriskDUL` (the same object, its state kept)."""
    dul = event.assoc.dul
    if type(dul) is DULServiceProvider:
        dul.__class__ = BriskDUL


def wait_for_socket(sock: socket.socket, seconds: float) -> bool:
    """Wait at most ``seconds`` for ``sock`` to have data (or be closed); False when it cannot be waited on."""
    try:
        select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed under us: the reactor finds out on its next look
        return False
    return True


def wait_for_message(messages: queue.Queue[Any], seconds: float) -> None:
    """Wait at most ``seconds`` for ``messages`` to hold something (returns at once when it already does)."""
    with messages.not_empty:  # the queue's own lock (qsize() would take it again: read the deque itself)
        if not messages.queue:
            messages.not_empty.wait(seconds)


class _DulClock:
    """Stands in for the ``time`` module inside :mod:`pynetdicom.dul`: on a :class:`BriskDUL`'s own thread, between
    DIMSE messages, the idle sleep waits on its socket instead; every other call goes to :mod:`time` unchanged."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def sleep(self, seconds: float) -> None:
        dul = threading.current_thread()
        # Only between messages: while a message's PDUs are arriving, pynetdicom's sleep lets a whole PDU
        # gather in the socket, which is then read in two calls instead of many (less CPU, same latency).
        if isinstance(dul, BriskDUL) and seconds > 0 and getattr(getattr(dul.assoc, "dimse", None), "message",
                                                                 None) is None:
            sock = getattr(dul.socket, "socket", None)
            # a TLS socket may hold decrypted bytes that select cannot see: it sleeps as pynetdicom does
            if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) and wait_for_socket(
                    sock, seconds):
                return
        self._real.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _ReactorClock:
    """Stands in for the ``time`` module inside :mod:`pynetdicom.association`: on the thread of an association
    whose DUL provider is a :class:`BriskDUL`, the reactor's 1 ms sleep waits on its DIMSE message queue
    instead; every other call goes to :mod:`time` unchanged."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def sleep(self, seconds: float) -> None:
        if seconds == REACTOR_SLEEP_S:
            assoc = threading.current_thread()
            if isinstance(assoc, Association) and isinstance(assoc.dul, BriskDUL):
                messages = getattr(assoc.dimse, "msg_queue", None)
                if isinstance(messages, queue.Queue):
                    wait_for_message(messages, seconds)
                    return
        self._real.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install_brisk_reactor() -> None:
    """Give :mod:`pynetdicom.association` the :class:`_ReactorClock` and :mod:`pynetdicom.dul` the
    :class:`_DulClock` (once per process; idempotent)."""
    current = pynetdicom.association.time
    if not isinstance(current, _ReactorClock):
        pynetdicom.association.time = _ReactorClock(current)  # type: ignore[assignment]
    in_dul = pynetdicom.dul.time
    if not isinstance(in_dul, _DulClock):
        pynetdicom.dul.time = _DulClock(in_dul)  # type: ignore[assignment]
