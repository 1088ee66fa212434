"""The receiver: a pynetdicom Verification and Storage SCP that spools what it is sent.

The C-STORE handler does the least it can: take the peer's bytes as encoded (no pixel decode), check
their framing and read a few header attributes (a truncated or garbled dataset is refused with 0xC000,
one without valid SOP Class, SOP Instance, Study and Series Instance UIDs with 0xA900), write them tmp → fsync →
rename into the spool, commit the instance to the index, and only then answer Success. Inference
never runs on an association thread. :mod:`node.dicom.guard` keeps peers that break the upper-layer
protocol from holding the node (stalled or trickled PDUs, connections that close before associating, malformed
association requests); :mod:`node.dicom.admission` counts connections that have not completed an association
request apart from associations, so that they never take the slots real senders need.

With ``[tls] enabled`` the listening socket speaks TLS (1.2 or later) and, by default, requires a client
certificate that chains to ``tls.ca_certificates`` (:class:`_LazyHandshakeContext` keeps the handshake off the
accept thread). The calling-AE allow-list and the per-peer association limit apply on
top of it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node import telemetry
from node.config import NodeConfig, calling_ae_allowed
from node.dicom.accept import Acceptor
from node.dicom.admission import Admission
from node.dicom.brisk import brisk_while_sending, install_brisk_reactor
from node.dicom.commitment import CommitmentReports
from node.dicom.guard import PeerGuard
from node.dicom.header import shown_uid
from node.dicom.net import set_tcp_nodelay
from node.dicom.status import Status
from node.errors import ListenError
from node.model.records import InstanceMeta
from node.spool.index import Index
from node.spool.store import Spool

log = logging.getLogger(__name__)

#: Seconds without a PDU on an established association before it is aborted.
NETWORK_TIMEOUT_S = 60
#: Seconds to wait for the next DIMSE message of an operation in progress.
DIMSE_TIMEOUT_S = 60
#: Associations (A-ASSOCIATE-RQ received) served at once; beyond, requests are rejected (transient, local limit
#: exceeded). Each costs two threads. Connections still sending their request are counted apart
#: (``node.max_pending_connections_per_address``, :mod:`node.dicom.admission`).
MAX_ASSOCIATIONS = 64
#: Seconds a TLS peer has to complete its handshake, and at most between the bytes of one TLS record.
TLS_HANDSHAKE_S = 10.0
TLS_RECORD_STALL_S = 30.0

#: pynetdicom's own rejections, by (result source, diagnostic) of the A-ASSOCIATE-RJ, as metric reasons.
_REJECTIONS = {(3, 2): "association_limit", (1, 7): "called_ae_not_recognised", (2, 1): "user_identity"}


class Receiver:
    """Owns the listening AE; hands every instance to the spool and index."""

    def __init__(
        self,
        cfg: NodeConfig,
        spool: Spool,
        index: Index,
        *,
        on_instance: Callable[[InstanceMeta], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.index = index
        self.on_instance = on_instance
        self._server: ThreadedAssociationServer | None = None
        self._assoc_series: dict[int, set[str]] = {}
        self._assoc_refused: dict[int, set[str]] = {}  # series with instances refused for resources (0xA700)
        self._lock = threading.Lock()
        self._admission = Admission(max_associations=MAX_ASSOCIATIONS,
                                    per_address=cfg.max_pending_connections_per_address,
                                    request_timeout_s=cfg.association_request_timeout_s)
        self._guard = PeerGuard(self._admission)
        self._per_peer: dict[str, weakref.WeakSet[Association]] = {}
        self.received = 0
        self.commitments = CommitmentReports()  # storage commitment reports to the sender (verify = "commitment")
        self.acceptor = Acceptor(cfg, spool, index)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = self.cfg.max_pdu_size
        ae.network_timeout = NETWORK_TIMEOUT_S
        ae.acse_timeout = self.cfg.association_request_timeout_s  # also the ARTIM timer: a silent connection
        ae.dimse_timeout = DIMSE_TIMEOUT_S
        ae.maximum_associations = self._admission.pynetdicom_limit  # never decides: see node.dicom.admission
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)  # its N-EVENT-REPORTs
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        install_brisk_reactor()
        ae = self._make_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, brisk_while_sending),
            *self._guard.handlers(),  # first: its EVT_REQUESTED rejects malformed requests
            *([(evt.EVT_CONN_OPEN, _tls_handshake)] if self.cfg.tls.enabled else []),  # after the guard's
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REQUESTED, self._limit_per_peer),
            *self._admission.handlers(),  # after the checks above: the association limit, as pynetdicom's
            (evt.EVT_CONN_CLOSE, self._forget_peer),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self.commitments.handle),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        ssl_context = self.cfg.tls.server_context(_LazyHandshakeContext) if self.cfg.tls.enabled else None
        try:
            self._server = ae.start_server(
                (self.cfg.bind_address, self.cfg.port), block=False, evt_handlers=handlers,  # type: ignore[arg-type]
                ssl_context=ssl_context,
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.cfg.bind_address}:{self.cfg.port}: {exc.strerror or exc} "
                "(is another node or PACS using the port?)"
            ) from exc
        tls = self.cfg.tls
        log.info(
            "listening as %s on %s:%d%s (calling AEs: %s; at most %d associations per calling AE, %d in all; "
            "at most %d connections per address still sending their association request, which must arrive "
            "within %g s)",
            self.cfg.ae_title,
            self.cfg.bind_address,
            self.cfg.port,
            "" if not tls.enabled else (" with TLS, client certificates " +
                                        ("required" if tls.require_client_certificate else "optional") +
                                        f" (CA {tls.ca_certificates})"),
            ", ".join(str(p) for p in self.cfg.allowed_calling_aes) or "any",
            self.cfg.max_associations_per_peer,
            MAX_ASSOCIATIONS,
            self.cfg.max_pending_connections_per_address,
            self.cfg.association_request_timeout_s,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ------------------------------------------------------------------ handlers
    def _on_requested(self, event: evt.Event) -> None:
        """Apply ``node.allowed_calling_aes`` (AE title, optionally bound to an address) before negotiation.

        A peer not on the list gets A-ASSOCIATE-RJ rejected-permanent, source service-user, reason
        "calling AE title not recognised" (PS3.8 9.3.4), as pynetdicom's own ``require_calling_aet``
        would answer; that check knows nothing of addresses, so the node makes its own.
        """
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted or not self.cfg.allowed_calling_aes:
            return
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        address = str(assoc.requestor.address)
        if calling_ae_allowed(self.cfg.allowed_calling_aes, calling, address):
            return
        bound = [str(p.address) for p in self.cfg.allowed_calling_aes if p.ae_title == calling]
        why = f"allowed only from {', '.join(bound)}" if bound else "not in node.allowed_calling_aes"
        log.warning("association rejected from calling AE %r at %s:%s: %s (A-ASSOCIATE-RJ: calling AE title "
                    "not recognised)", calling, address, assoc.requestor.port, why)
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
        telemetry.association_rejected("calling_ae_not_allowed")
        assoc.kill()  # as pynetdicom does after its own rejections: wait for the RJ to go out

    def _limit_per_peer(self, event: evt.Event) -> None:
        """Apply ``node.max_associations_per_peer``: one calling AE title holds at most that many at once.

        Beyond it the request gets A-ASSOCIATE-RJ rejected-transient, source service-provider
        (presentation related function), reason local-limit-exceeded (PS3.8 9.3.4), as pynetdicom answers
        when every association slot is in use: one chatty or misbehaving sender cannot take them all.
        """
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted:
            return
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        limit = self.cfg.max_associations_per_peer
        with self._lock:
            held = self._per_peer.setdefault(calling, weakref.WeakSet())
            alive = [a for a in held if a.is_alive() and not a.is_rejected and not a.is_aborted and not a.is_released]
            if len(alive) < limit:
                held.add(assoc)
                return
        log.warning("association rejected from calling AE %r at %s:%s: it already holds %d association(s), "
                    "node.max_associations_per_peer is %d (A-ASSOCIATE-RJ: local limit exceeded)",
                    calling, assoc.requestor.address, assoc.requestor.port, len(alive), limit)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit
        telemetry.association_rejected("peer_limit")
        assoc.kill()

    def _forget_peer(self, event: evt.Event) -> None:
        telemetry.connection_closed(id(event.assoc))
        with self._lock:
            for held in self._per_peer.values():
                held.discard(event.assoc)

    def _on_accepted(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        telemetry.association_accepted(req.ae_title, id(event.assoc))
        if not self.cfg.allowed_calling_aes:
            log.info("association accepted from %s at %s:%s (no allow-list: any calling AE is accepted)",
                     req.ae_title, req.address, req.port)
        else:
            log.info("association accepted from %s at %s:%s", req.ae_title, req.address, req.port)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        rj = event.assoc.acceptor.primitive
        source_and_reason = (getattr(rj, "result_source", 0), getattr(rj, "diagnostic", 0))
        telemetry.association_rejected(_REJECTIONS.get(source_and_reason, "other"))
        log.warning("association rejected from calling AE %r at %s:%s (result %s, source %s, reason %s; "
                    "every association slot in use, or a called AE or user identity not accepted)",
                    req.ae_title, req.address, req.port, getattr(rj, "result", "?"),
                    getattr(rj, "result_source", "?"), getattr(rj, "diagnostic", "?"))

    def _on_ended(self, event: evt.Event) -> None:
        with self._lock:
            series = self._assoc_series.pop(id(event.assoc), set())
            refused = self._assoc_refused.pop(id(event.assoc), set())
        if series or refused:  # a series with refusals waits for the rest (node.assemble.stable)
            self.index.settle_sooner(series, self.cfg.release_settle_s, refused=refused)

    def _refused(self, event: evt.Event, series_uid: str) -> None:
        """An instance of ``series_uid`` was refused for resources: the series is incomplete."""
        with self._lock:
            self._assoc_refused.setdefault(id(event.assoc), set()).add(series_uid)
        with contextlib.suppress(sqlite3.Error):  # a full disk: recorded again when the association ends
            self.index.note_refused({series_uid})

    def _on_store(self, event: evt.Event) -> int:
        status = self._store(event)
        telemetry.store_response(event.assoc.requestor.ae_title, status)
        return status

    def _store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title
        if not sop_uid:
            log.error("C-STORE from %s refused: the request has no Affected SOP Instance UID", calling)
            return Status.DATASET_MISMATCH
        accepted = self.acceptor.accept(sop_uid=sop_uid, sop_class=str(req.AffectedSOPClassUID or ""),
                                        transfer_syntax=str(event.context.transfer_syntax),
                                        dataset=event.encoded_dataset(include_meta=False), calling=calling)
        if accepted.duplicate:
            log.info("C-STORE from %s: SOP Instance %s already stored; kept the first copy", calling, sop_uid)
            return Status.SUCCESS
        if not accepted.stored:
            log.error("C-STORE from %s of %s refused (0x%04X): %s", calling, shown_uid(sop_uid), accepted.status,
                      accepted.reason)
            if accepted.status is Status.OUT_OF_RESOURCES and accepted.meta is not None:
                self._refused(event, accepted.meta.series_uid)
            return accepted.status
        meta = accepted.meta
        assert meta is not None
        with self._lock:
            self._assoc_series.setdefault(id(event.assoc), set()).add(meta.series_uid)
            self.received += 1
        telemetry.instance_received(calling, accepted.size)
        if self.on_instance is not None:
            self.on_instance(meta)
        return Status.SUCCESS


# ---------------------------------------------------------------------------------------------- TLS
class _LazyHandshakeContext(ssl.SSLContext):
    """A server context whose sockets handshake later, on the connection's own thread.

    pynetdicom wraps each accepted socket in its accept loop (``AssociationServer.get_request``) with the
    default ``do_handshake_on_connect=True``: one peer that connects and sends nothing would block
    every later connection. Here the handshake waits for :func:`_tls_handshake` (EVT_CONN_OPEN), which
    runs on the thread pynetdicom starts for the connection, with a deadline.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _tls_handshake(event: evt.Event) -> None:
    """EVT_CONN_OPEN (TLS only): complete the handshake within :data:`TLS_HANDSHAKE_S`, log who the peer is.

    A failed handshake (no certificate, one the CA did not sign, a plain-TCP peer) is logged and the
    socket closed: pynetdicom then sees the connection gone before any A-ASSOCIATE-RQ. The guard's bounded
    reads serve the bytes TLS has already decrypted first (``select`` cannot see them, #528).
    """
    assoc = event.assoc
    wrapper = assoc.dul.socket
    sock = getattr(wrapper, "socket", None)
    if wrapper is None or not isinstance(sock, ssl.SSLSocket):
        return
    peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    try:
        sock.settimeout(TLS_HANDSHAKE_S)
        sock.do_handshake()
        sock.settimeout(TLS_RECORD_STALL_S)  # a TLS record that stops halfway cannot block a read for ever
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        log.warning("TLS connection from %s refused: the handshake failed (%s)", peer, reason)
        with contextlib.suppress(OSError):
            sock.close()
        return
    rdns = cast(tuple[tuple[tuple[str, str], ...], ...], (sock.getpeercert() or {}).get("subject", ()))
    subject = {k: v for rdn in rdns for k, v in rdn}
    log.info("TLS connection from %s: %s, client certificate %s", peer, sock.version(),
             repr(subject.get("commonName")) if subject else "none")
