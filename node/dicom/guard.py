"""Protection of the listening AE against peers that break the upper-layer protocol (pynetdicom 3.0).

pynetdicom assumes a well-behaved peer in a few places; each function here is an event handler the
:class:`~node.dicom.scp.Receiver` binds to work around one of them, so that a broken, stalled or
hostile peer costs the node a bounded amount of time and no association slot it does not use:

* :meth:`PeerGuard.on_conn_open` counts the connection as pending (:mod:`node.dicom.admission`: pending
  connections are limited per address and never take an association slot) and bounds each socket read
  (:class:`_BoundedReader`). pynetdicom's ``recv`` on an accepted socket blocks until the whole PDU its
  header declared has arrived, and its network and ARTIM timers cannot fire while it does
  (pydicom/pynetdicom#653): a peer that trickles a PDU one byte at a time would hold the connection for
  months. Here an association request must arrive whole within ``node.association_request_timeout_s`` of
  connecting, any PDU at :data:`~node.dicom.admission.MIN_PDU_BYTES_PER_S` on average (after a grace of
  :data:`~node.dicom.admission.PDU_GRACE_S`), and :data:`PDU_STALL_S` of silence in the middle of a PDU
  ends the connection. The reader also stops reading a stream pynetdicom has already found invalid (after
  an unknown PDU type it blocks on the next 6 bytes before sending its A-ABORT), and refuses a PDU of
  more than :data:`MAX_PRE_ASSOCIATION_PDU` bytes before association (it would buffer a declared 2 GiB).
* :meth:`PeerGuard.on_conn_close` wakes the acceptor thread of a connection that closed before its
  A-ASSOCIATE-RQ: pynetdicom waits out the whole ACSE timeout for the request, closed connection or
  not, and each such thread stays a pending connection (and counts against pynetdicom's
  ``maximum_associations``), so a port scanner or a load-balancer health check
  (pydicom/pynetdicom#669) would crowd out real senders. The fix is the one the
  maintainer suggested for the requestor side in pydicom/pynetdicom#618: put ``None`` on the DUL's
  user queue, which the acceptor reads as its ACSE timeout.
* :meth:`PeerGuard.on_pdu_recv` / :meth:`PeerGuard.on_requested` answer a malformed A-ASSOCIATE-RQ
  (an even presentation context ID, a context without transfer syntax) with A-ASSOCIATE-RJ. pynetdicom
  raises in its state machine's AE-6 (the DUL thread dies; the same failure mode as
  pydicom/pynetdicom#721) or in negotiation (the acceptor thread dies) and leaves the peer without an
  answer until timeouts end the connection.
* :meth:`PeerGuard.on_dimse_recv` answers a C-STORE-RQ without Affected SOP Instance UID with 0xA900:
  pynetdicom drops such a request ("Received unexpected C-STORE service message") and the peer waits
  for a response that never comes. Our handlers are moved before pynetdicom's logging ones, because
  those raise on such messages and an exception ends pynetdicom's loop over an event's handlers.

Each workaround uses pynetdicom internals (the DUL's queues and state, the association's socket); a
pynetdicom upgrade must re-run ``tests/integration/test_bad_input.py``, which exercises all of them, and
``tests/integration/test_trickled_requests.py``.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    AbstractSyntaxSubItem,
    PresentationContextItemRQ,
    TransferSyntaxSubItem,
)

from node import telemetry
from node.dicom.admission import MIN_PDU_BYTES_PER_S, PDU_GRACE_S, PDU_NAMES, Admission, Connection, pdu_deadline
from node.dicom.status import Status

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Seconds of silence in the middle of a PDU after which the connection is closed. Between PDUs the
#: association's own timers apply (the request timeout before association, the network timeout after).
PDU_STALL_S = 30.0
#: How often a blocked read looks at the association's state (seconds).
POLL_S = 0.25
#: Largest PDU accepted before an association is established. An A-ASSOCIATE-RQ with the maximum
#: 128 presentation contexts, each with a dozen transfer syntaxes, is well under 200 KiB.
MAX_PRE_ASSOCIATION_PDU = 1 << 20
#: Set on a DUL thread whose read the guard cut short (and logged, with the peer): see :class:`_QuietCut`.
_cut_here = threading.local()
#: Association states (PS3.8 9.2) in which nothing more from the peer will be acted on.
_CLOSING = frozenset({"Sta13"})
_PRE_ASSOCIATION = frozenset({"Sta1", "Sta2"})


def _peer(assoc: Association) -> str:
    try:
        return f"{assoc.requestor.address}:{assoc.requestor.port}"
    except (AttributeError, TypeError):  # the requestor may not be known yet
        return "?"


class PeerGuard:
    """Event handlers for the acceptor's associations (see the module docstring)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        dul_log = logging.getLogger("pynetdicom.dul")
        if not any(isinstance(f, _QuietCut) for f in dul_log.filters):
            dul_log.addFilter(_QuietCut())
        self._invalid_rq: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()

    def handlers(self) -> list[tuple[evt.NotificationEvent, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_PDU_RECV, self.on_pdu_recv),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_DIMSE_RECV, self.on_dimse_recv),
        ]

    def _run_first(self, assoc: Association) -> None:
        """Move the handlers bound before ours (pynetdicom's logging ones) after ours.

        pynetdicom stops calling a notification event's handlers at the first that raises, and its
        own logging handler raises on a C-STORE-RQ without Affected SOP Instance UID.
        """
        ours = {self.on_pdu_recv, self.on_dimse_recv}
        for event in (evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV):
            for func, args in list(cast(list[tuple[Any, Any]], assoc.get_handlers(event))):
                if func not in ours:
                    assoc.unbind(event, func)
                    assoc.bind(event, func, args)

    # ------------------------------------------------------------------ reads
    def on_conn_open(self, event: evt.Event) -> None:
        """Count the connection as pending (:mod:`node.dicom.admission`), replace the association socket's
        blocking ``recv`` with a :class:`_BoundedReader`, and put our handlers first (before the DUL starts)."""
        assoc = event.assoc
        self._run_first(assoc)
        wrapper = assoc.dul.socket
        raw = getattr(wrapper, "socket", None)
        if wrapper is None or raw is None:
            return
        conn = self._admission.open(assoc, raw)
        wrapper.recv = _BoundedReader(assoc, raw, conn, self._admission.request_timeout_s)  # type: ignore[method-assign]

    def on_conn_close(self, event: evt.Event) -> None:
        """Wake an acceptor still waiting for the A-ASSOCIATE-RQ of a connection that is gone."""
        assoc = event.assoc
        # Only while nothing is queued: a request that did arrive is negotiated (and then finds the
        # connection gone); a None behind it would hide later primitives from the association.
        if (
            assoc.is_acceptor
            and not assoc.is_established
            and assoc.requestor.primitive is None
            and assoc.dul.to_user_queue.empty()
        ):
            user_queue: queue.Queue[Any] = assoc.dul.to_user_queue  # pynetdicom types it without None
            user_queue.put(None)  # read as "ACSE timeout"

    # ------------------------------------------------------------------ association requests
    def on_pdu_recv(self, event: evt.Event) -> None:
        """Drop the presentation contexts pynetdicom cannot convert and mark the request for rejection."""
        pdu = event.pdu
        if not isinstance(pdu, A_ASSOCIATE_RQ):
            return
        self._admission.request_received(event.assoc)  # whole: no longer pending
        problems: list[str] = []
        keep = []
        for item in pdu.variable_items:
            if isinstance(item, PresentationContextItemRQ):
                problem = _context_problem(item)
                if problem:
                    problems.append(problem)
                    continue
            keep.append(item)
        if problems:
            pdu.variable_items[:] = keep
        try:
            pdu.to_primitive()  # what the state machine does next; an exception there kills the DUL thread
        except Exception as exc:  # noqa: BLE001 - any failure here would otherwise kill the DUL thread
            problems.append(f"it cannot be decoded ({type(exc).__name__}: {exc})")
            pdu.variable_items[:] = [i for i in pdu.variable_items if not isinstance(i, PresentationContextItemRQ)]
        if problems:
            self._invalid_rq[event.assoc] = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        reason = self._invalid_rq.pop(assoc, None)
        if reason is None:
            return
        calling = getattr(assoc.requestor.primitive, "calling_ae_title", "") or "?"
        log.warning("association from %r at %s rejected: the A-ASSOCIATE-RQ is malformed: %s",
                    calling, _peer(assoc), reason)
        assoc.acse.send_reject(0x01, 0x02, 0x01)  # rejected-permanent, ACSE service provider, no reason
        telemetry.association_rejected("malformed_request")
        assoc.kill()  # as pynetdicom does after its own rejections: wait for the RJ to go out

    # ------------------------------------------------------------------ DIMSE
    def on_dimse_recv(self, event: evt.Event) -> None:
        message = event.message
        if not isinstance(message, C_STORE_RQ):
            return
        command = message.command_set
        if command.get("AffectedSOPInstanceUID") or command.get("MessageID") is None:
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = command.MessageID
        sop_class = command.get("AffectedSOPClassUID")
        if sop_class:
            rsp.AffectedSOPClassUID = sop_class
        rsp.Status = int(Status.DATASET_MISMATCH)
        log.error("C-STORE from %s refused (0x%04X): the request has no Affected SOP Instance UID",
                  event.assoc.requestor.ae_title, Status.DATASET_MISMATCH)
        telemetry.store_response(event.assoc.requestor.ae_title, Status.DATASET_MISMATCH)
        event.assoc.dimse.send_msg(rsp, int(message.context_id or 0))


class _BoundedReader:
    """The association socket's ``recv``, bounded in time PDU by PDU.

    pynetdicom reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``, and only once the socket
    is readable. Each read ends, with what has arrived (pynetdicom then sees the PDU cut short and closes
    the connection), when the PDU misses :func:`~node.dicom.admission.pdu_deadline` (an association request
    late after connecting, or a PDU below the minimum rate), after :data:`PDU_STALL_S` of silence, or as soon
    as the stream is known to be invalid. A connection closed for time is logged once, with the peer and what
    it sent. TLS: bytes OpenSSL has already decrypted are read first (``select`` cannot see them, #528).
    """

    def __init__(self, assoc: Association, raw: socket.socket, conn: Connection, request_timeout_s: float) -> None:
        self._assoc = assoc
        self._raw = raw
        self._conn = conn
        self._request_timeout_s = request_timeout_s
        self._body: int | None = None  # the declared length after the last whole header read
        self._kind = 0
        self._started = 0.0

    def __call__(self, nr_bytes: int) -> bytearray:
        before = self._assoc.dul.state_machine.current_state in _PRE_ASSOCIATION
        if self._body is not None and nr_bytes == self._body:  # the rest of the PDU whose header was read
            done, length = 6, 6 + nr_bytes
        else:  # a header (or a read pynetdicom does not usually make: bounded the same)
            self._started, self._kind = time.monotonic(), 0
            done, length = 0, nr_bytes
        self._body = None
        if before and nr_bytes > MAX_PRE_ASSOCIATION_PDU:
            log.warning("connection from %s closed: a PDU of %d bytes before association (at most %d)",
                        self._conn.peer, nr_bytes, MAX_PRE_ASSOCIATION_PDU)
            self._conn.cut = True
        deadline = pdu_deadline(opened=self._conn.opened, started=self._started, length=length,
                                before_association=before, request_timeout_s=self._request_timeout_s)
        out = bytearray() if self._conn.cut else self._read(nr_bytes, deadline, done, length, before)
        if len(out) < nr_bytes and self._conn.cut:
            _cut_here.active = True  # already logged: pynetdicom's line would only repeat it, without the peer
        if done == 0 and nr_bytes == 6 and len(out) == 6 and out[0] in PDU_NAMES:
            self._kind, self._body = out[0], struct.unpack(">L", out[2:6])[0]
        return out

    def _read(self, nr_bytes: int, deadline: float, done: int, length: int, before: bool) -> bytearray:
        out = bytearray()
        dul, raw = self._assoc.dul, self._raw
        last_data = time.monotonic()
        while len(out) < nr_bytes:
            if dul.state_machine.current_state in _CLOSING or _invalid_pdu_pending(dul):
                return out  # the stream is already known to be invalid, or we are closing
            now = time.monotonic()
            if now >= deadline or now - last_data > PDU_STALL_S:
                self._log_cut(done + len(out), length, before, quiet=now - last_data, stalled=now < deadline)
                self._conn.cut = True
                return out
            try:
                if not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
                    ready, _, _ = select.select([raw], [], [], max(0.0, min(POLL_S, deadline - now)))
                    if not ready:
                        continue
                chunk = raw.recv(min(65536, nr_bytes - len(out)))
            except (OSError, ValueError):  # closed under us, or a TLS record that stopped halfway
                return out
            if not chunk:
                return out
            out += chunk
            self._conn.received += len(chunk)
            last_data = time.monotonic()
        return out

    def _log_cut(self, received: int, length: int, before: bool, *, quiet: float, stalled: bool) -> None:
        name = PDU_NAMES.get(self._kind)
        what = "of a PDU header" if name is None else f"of an {name}" if name.startswith("A-") else f"of a {name} PDU"
        now = time.monotonic()
        if stalled:
            how = f"and then nothing for {PDU_STALL_S:.0f} s; closed"
        elif before:
            how = (f"in {now - self._conn.opened:.0f} s; closed (an association request must arrive whole within "
                   f"{self._request_timeout_s:g} s of connecting: node.association_request_timeout_s)")
        else:
            silence = f", none in the last {quiet:.0f} s" if quiet >= 1 else ""
            how = (f"in {now - self._started:.0f} s{silence}; closed (a PDU must arrive at {MIN_PDU_BYTES_PER_S} "
                   f"bytes/s on average, or within {PDU_GRACE_S:.0f} s)")
        log.warning("peer %s sent %d of %d bytes %s %s", self._conn.peer, received, length, what, how)


class _QuietCut(logging.Filter):
    """Drops pynetdicom's "The received PDU is shorter than expected" for a read the guard (or admission) cut
    short on purpose: that connection's one line, with the peer and what it did, is already in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_cut_here, "active", False) and str(record.msg).startswith("The received PDU is shorter"):
            _cut_here.active = False
            return False
        return True


def _invalid_pdu_pending(dul: Any) -> bool:
    """Has the DUL queued Evt19 (an unrecognised or invalid PDU) that it has not acted on yet?"""
    try:
        return "Evt19" in list(dul.event_queue.queue)
    except RuntimeError:  # the queue changed while being copied
        return False


def _context_problem(item: PresentationContextItemRQ) -> str | None:
    cid = item.presentation_context_id
    subs = item.abstract_transfer_syntax_sub_items
    if cid is None or not 1 <= cid <= 255 or cid % 2 == 0:
        return f"presentation context ID {cid} is not an odd number from 1 to 255"
    if sum(isinstance(s, AbstractSyntaxSubItem) for s in subs) != 1:
        return f"presentation context {cid} does not have exactly one abstract syntax"
    if not any(isinstance(s, TransferSyntaxSubItem) for s in subs):
        return f"presentation context {cid} proposes no transfer syntax"
    return None
