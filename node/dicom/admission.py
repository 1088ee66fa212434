"""Which connections the listening AE serves, and how long a PDU may take to arrive.

A connection is *pending* from the moment it is accepted until its A-ASSOCIATE-RQ has arrived whole; from
then on it is an *association* (being negotiated, established, or rejected and closing). The two are
counted apart, so that peers that connect and never finish a request cannot take the slots real senders
need (pynetdicom counts every acceptor thread against ``AE.maximum_associations``, pending ones included,
so 65 peers that each trickle a request one byte at a time used to lock every sender out):

* pending connections: at most ``node.max_pending_connections_per_address`` per source address and
  :data:`MAX_PENDING` in all. A new connection beyond either limit closes the *oldest* pending one (of that
  address, or of all): the oldest has had the longest to send its request, while a real peer sends its
  request as soon as it connects, so it is never the oldest for long. Closing the newcomer instead would
  let eight connections from one address, renewed every few seconds, lock that address (a NAT, a
  modality behind a load balancer that probes the port) out for good.
* associations: at most the receiver's maximum at once, counted by :meth:`Admission.on_requested` once
  the request has arrived; beyond it the request is answered with A-ASSOCIATE-RJ rejected-transient,
  local-limit-exceeded, as pynetdicom would. pynetdicom's own limit is set above the sum of both and never
  decides.

:func:`pdu_deadline` bounds the time a PDU may take, whatever its declared length:
:class:`node.dicom.guard.PeerGuard` closes a connection that misses it, and logs once what it did.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

from node import telemetry

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Once a PDU has started, it must arrive at this average rate at least (bytes per second) ...
MIN_PDU_BYTES_PER_S = 4096
#: ... but a PDU always has this long (seconds), however short: a hiccup of the sender or the network.
PDU_GRACE_S = 30.0
#: Connections that have not completed an association request, from all addresses together.
MAX_PENDING = 128
#: PDU types (PS3.8 9.3.1), as named in log lines.
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: "A-ABORT"}


def pdu_deadline(*, opened: float, started: float, length: int, before_association: bool,
                 request_timeout_s: float) -> float:
    """The time (``time.monotonic``) by which a PDU of ``length`` bytes, header included, begun at ``started``
    on a connection opened at ``opened``, must have arrived whole.

    Every PDU gets :data:`PDU_GRACE_S` or ``length`` at :data:`MIN_PDU_BYTES_PER_S`, whichever is longer; before
    association, the whole request must also have arrived ``request_timeout_s`` after connecting.
    """
    if length < 0 or request_timeout_s <= 0:
        raise ValueError(f"a PDU of {length} bytes with a request timeout of {request_timeout_s} s has no deadline")
    by_rate = started + max(PDU_GRACE_S, length / MIN_PDU_BYTES_PER_S)
    return min(by_rate, opened + request_timeout_s) if before_association else by_rate


@dataclass(eq=False)
class Connection:
    """One accepted connection, as admission and the guard's bounded reads see it."""

    address: str
    port: int
    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    #: Bytes received so far (all PDUs).
    received: int = 0
    #: The node closed it on purpose, and logged why.
    cut: bool = False

    @property
    def peer(self) -> str:
        return f"{self.address}:{self.port}"


def _holds_slot(assoc: Association) -> bool:
    return assoc.is_alive() and not (assoc.is_rejected or assoc.is_aborted or assoc.is_released)


def _gone(assoc: Association) -> bool:
    """Has the association's thread come and gone (one not started yet is not gone)?"""
    return assoc.ident is not None and not assoc.is_alive()


class Admission:
    """Counts pending connections and associations, and enforces the limits of the module docstring."""

    def __init__(self, *, max_associations: int, per_address: int, request_timeout_s: float,
                 max_pending: int = MAX_PENDING) -> None:
        for name, value in (("max_associations", max_associations), ("per_address", per_address),
                            ("max_pending", max_pending)):
            if value < 1:
                raise ValueError(f"{name} is {value}; it must be at least 1")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s is {request_timeout_s}; it must be positive")
        self.max_associations = max_associations
        self.per_address = per_address
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[Association, Connection] = {}  # in the order they connected: the oldest first
        self._associations: weakref.WeakSet[Association] = weakref.WeakSet()

    @property
    def pynetdicom_limit(self) -> int:
        """For ``AE.maximum_associations``: above every thread these limits let live (closing ones included)."""
        return self.max_associations + self.max_pending + 16

    def handlers(self) -> list[tuple[evt.NotificationEvent, Any]]:
        """EVT_REQUESTED goes after the receiver's own checks (the allow-list answers first, as before)."""
        return [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_CONN_CLOSE, self.on_conn_close)]

    def pending(self, address: str | None = None) -> int:
        with self._lock:
            self._prune()
            return sum(1 for c in self._pending.values() if address is None or c.address == address)

    # ------------------------------------------------------------------ pending connections
    def open(self, assoc: Association, sock: socket.socket) -> Connection:
        """Count a new connection as pending; close the oldest pending ones beyond the limits."""
        try:
            address, port = str(assoc.requestor.address), int(assoc.requestor.port)
        except (AttributeError, TypeError, ValueError):
            address, port = "?", 0
        conn = Connection(address, port, sock)
        evicted: list[tuple[Connection, str]] = []
        with self._lock:
            self._prune()
            self._pending[assoc] = conn
            same = [(a, c) for a, c in self._pending.items() if c.address == address]
            if len(same) > self.per_address:
                victim, vconn = same[0]
                evicted.append((vconn, f"{len(same)} connections from {address} had not completed an association "
                                       f"request, more than node.max_pending_connections_per_address "
                                       f"({self.per_address})"))
                del self._pending[victim]
            if len(self._pending) > self.max_pending:
                victim, vconn = next(iter(self._pending.items()))
                evicted.append((vconn, f"{len(self._pending)} connections had not completed an association "
                                       f"request, more than the node's {self.max_pending}"))
                del self._pending[victim]
        now = time.monotonic()
        for vconn, why in evicted:
            vconn.cut = True
            log.warning("connection from %s closed: %s; it was the oldest (%d bytes in %.1f s)",
                        vconn.peer, why, vconn.received, now - vconn.opened)
            _close(vconn.sock)
        return conn

    def request_received(self, assoc: Association) -> None:
        """The connection's A-ASSOCIATE-RQ arrived whole: it is no longer pending."""
        with self._lock:
            self._pending.pop(assoc, None)

    def on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            self._pending.pop(event.assoc, None)

    def _prune(self) -> None:
        for assoc in [a for a in self._pending if _gone(a)]:
            del self._pending[assoc]

    # ------------------------------------------------------------------ associations
    def on_requested(self, event: evt.Event) -> None:
        """Count the association; beyond the maximum, reject it (transient, local limit exceeded)."""
        assoc = event.assoc
        self.request_received(assoc)
        if assoc.is_rejected or assoc.is_aborted:
            return
        with self._lock:
            held = sum(1 for a in self._associations if _holds_slot(a))
            if held < self.max_associations:
                self._associations.add(assoc)
                return
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        log.warning("association rejected from calling AE %r at %s:%s: %d associations are in progress, the node's "
                    "maximum (A-ASSOCIATE-RJ: local limit exceeded)",
                    calling, assoc.requestor.address, assoc.requestor.port, held)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit
        telemetry.association_rejected("association_limit")
        assoc.kill()  # as pynetdicom does after its own rejections: wait for the RJ to go out


def _close(sock: socket.socket) -> None:
    """End a connection another thread is reading: shut the socket down (its reader sees the end of the
    stream and pynetdicom closes it). The base class's shutdown, not SSLSocket's, which would drop the TLS
    state under the reading thread."""
    with contextlib.suppress(OSError, ValueError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
