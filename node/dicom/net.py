"""Socket tuning shared by our SCP and SCU."""

from __future__ import annotations

import logging
import socket
import time

from pynetdicom import evt

log = logging.getLogger(__name__)

#: pynetdicom's DUL thread and association reactor poll with 1 ms sleeps. Every PDU of a C-STORE,
#: the handler call and the response each wait for a poll, which costs milliseconds per instance.
#: Polling every 0.2 ms instead raised a 300-image storescu push from ~160 to ~210 images/s here,
#: for some idle CPU while an association is open (pynetdicom 3.0; these are its internals, so the
#: version is pinned below 4 in pyproject.toml).
DUL_LOOP_DELAY_S = 0.0002


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket.

    Without TCP_NODELAY, pynetdicom and DCMTK stall about 40 ms per DIMSE message (a small PDU
    waits for the peer's delayed ACK), which caps a push at ~25 images/s.
    """
    try:
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S  # type: ignore[union-attr]
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # the connection may already be gone
        log.debug("could not set TCP_NODELAY: %s", exc)


class _ShortSleepTime:
    """Stand-in for the ``time`` module inside pynetdicom.association: caps its polling sleeps.

    Only the reactor's 1 ms poll interval is shortened; longer sleeps (the 0.1 s grace period
    after an abort) are left as they are.
    """

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(DUL_LOOP_DELAY_S if 0 < seconds <= 0.001 else seconds)


def shorten_reactor_sleeps() -> None:
    import pynetdicom.association

    pynetdicom.association.time = _ShortSleepTime()  # type: ignore[assignment]
