"""Protection of the listening AE against peers that break the upper-layer protocol (pynetdicom 3.0).

pynetdicom assumes a well-behaved peer in a few places; each function here is an event handler the
:class:`~node.dicom.scp.Receiver` binds to work around one of them, so that a broken, stalled or
hostile peer costs the node a bounded amount of time and no association slot it does not use:

* :meth:`PeerGuard.on_conn_open` bounds each socket read (:data:`PDU_STALL_S` of silence in the middle
  of a PDU ends the connection; pynetdicom's ``recv`` on an accepted socket blocks forever, and its
  network and ARTIM timers cannot fire while it does: it expects a whole PDU to arrive at once, see
  pydicom/pynetdicom#653), stops reading a stream pynetdicom has already found invalid (after an
  unknown PDU type it blocks on the next 6 bytes before sending its A-ABORT), and refuses a PDU of
  more than :data:`MAX_PRE_ASSOCIATION_PDU` bytes before association (it would buffer a declared 2 GiB).
* :meth:`PeerGuard.on_conn_close` wakes the acceptor thread of a connection that closed before its
  A-ASSOCIATE-RQ: pynetdicom waits out the whole ACSE timeout for the request, closed connection or
  not, and each such thread counts against ``maximum_associations``, so a port scanner or a
  load-balancer health check (pydicom/pynetdicom#669) locks real senders out. The fix is the one the
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
pynetdicom upgrade must re-run ``tests/integration/test_bad_input.py``, which exercises all of them.
"""

from __future__ import annotations

import logging
import select
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
from node.dicom.status import Status

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Seconds of silence in the middle of a PDU after which the connection is closed. Between PDUs the
#: association's own timers apply (ACSE timeout before association, network timeout after).
PDU_STALL_S = 30.0
#: How often a blocked read looks at the association's state (seconds).
POLL_S = 0.25
#: Largest PDU accepted before an association is established. An A-ASSOCIATE-RQ with the maximum
#: 128 presentation contexts, each with a dozen transfer syntaxes, is well under 200 KiB.
MAX_PRE_ASSOCIATION_PDU = 1 << 20
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

    def __init__(self) -> None:
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
        """Replace the association socket's blocking ``recv`` with a bounded one, and put our handlers
        first (before the DUL starts)."""
        assoc = event.assoc
        self._run_first(assoc)
        wrapper = assoc.dul.socket
        raw = getattr(wrapper, "socket", None)
        if wrapper is None or raw is None:
            return
        dul = assoc.dul

        def recv(nr_bytes: int) -> bytearray:
            out = bytearray()
            state = dul.state_machine.current_state
            if state in _PRE_ASSOCIATION and nr_bytes > MAX_PRE_ASSOCIATION_PDU:
                log.warning("connection from %s closed: a PDU of %d bytes before association (at most %d)",
                            _peer(assoc), nr_bytes, MAX_PRE_ASSOCIATION_PDU)
                return out
            last_data = time.monotonic()
            while len(out) < nr_bytes:
                if dul.state_machine.current_state in _CLOSING or _invalid_pdu_pending(dul):
                    return out  # the stream is already known to be invalid, or we are closing
                try:
                    ready, _, _ = select.select([raw], [], [], POLL_S)
                    if not ready:
                        if time.monotonic() - last_data > PDU_STALL_S:
                            log.warning("connection from %s closed: no data for %.0f s in the middle of a PDU "
                                        "(%d of %d bytes received)", _peer(assoc), PDU_STALL_S, len(out), nr_bytes)
                            return out
                        continue
                    chunk = raw.recv(min(65536, nr_bytes - len(out)))
                except (OSError, ValueError):  # closed under us
                    return out
                if not chunk:
                    return out
                out += chunk
                last_data = time.monotonic()
            return out

        wrapper.recv = recv  # type: ignore[method-assign]

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
            assoc.dul.to_user_queue.put(None)  # read as "ACSE timeout"

    # ------------------------------------------------------------------ association requests
    def on_pdu_recv(self, event: evt.Event) -> None:
        """Drop the presentation contexts pynetdicom cannot convert and mark the request for rejection."""
        pdu = event.pdu
        if not isinstance(pdu, A_ASSOCIATE_RQ):
            return
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
