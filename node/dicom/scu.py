"""The sender side: C-ECHO and C-STORE as a Service Class User.

Each association proposes exactly the SOP classes of the files it carries (SEG, RTSTRUCT, …) in the
transfer syntax they are encoded in plus Explicit/Implicit VR Little Endian, sets TCP_NODELAY, and is
aborted (never left hanging) when anything goes wrong. A destination with ``tls = true`` is reached over
TLS: the node presents its ``[tls]`` certificate, and the peer's must chain to ``tls.ca_certificates``
and name the destination's host.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, TlsConfig
from node.dicom.net import set_tcp_nodelay
from node.dicom.status import describe, is_success
from node.errors import SendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreResult:
    path: Path
    status: int | None
    description: str

    @property
    def ok(self) -> bool:
        return is_success(self.status)


def _ae(calling_aet: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _tls_args(destination: Destination, tls: TlsConfig | None) -> tuple[ssl.SSLContext, str] | None:
    if not destination.tls:
        return None
    if tls is None:
        raise SendError(f"{destination} is a TLS destination but no [tls] certificates were given")
    return tls.client_context(), destination.host


def _associate(ae: AE, destination: Destination, tls: TlsConfig | None,
               handlers: list[tuple[evt.EventType, Callable[..., Any]]] | None = None) -> Association:
    opened: list[bool] = []
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, lambda _: opened.append(True)),
                      *(handlers or [])],
        tls_args=_tls_args(destination, tls),
    )
    if not assoc.is_established:
        why = _why_not(assoc, destination) if opened else _no_connection(destination)
        raise SendError(f"could not associate with {destination}: {why}")
    return assoc


def echo(
    destination: Destination, *, calling_aet: str, timeout_s: float = 10.0, tls: TlsConfig | None = None
) -> str:
    """C-ECHO a peer; return a sentence describing the outcome, raise SendError on failure."""
    ae = _ae(calling_aet, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination, tls)
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()
    if not is_success(code):
        raise SendError(f"C-ECHO to {destination} answered {describe(code)}")
    return f"C-ECHO to {destination}: {describe(code)}"


def _why_not(assoc: object, destination: Destination) -> str:
    if getattr(assoc, "is_rejected", False):
        return "the association was rejected (check the called AE title and the peer's allow-list)"
    if getattr(assoc, "is_aborted", False):
        return "the association was aborted (by the peer, or because it did not answer in time)"
    return _no_connection(destination)


def _no_connection(destination: Destination) -> str:
    if destination.tls:
        return ("no connection (is the peer running, the port right, and does its certificate chain to "
                "tls.ca_certificates and name the host? does it accept the node's certificate?)")
    return "no connection (is the peer running and the port right?)"


def store_files(
    destination: Destination,
    paths: list[Path],
    *,
    calling_aet: str,
    timeout_s: float = 30.0,
    tls: TlsConfig | None = None,
) -> list[StoreResult]:
    """C-STORE ``paths`` over one association; return one result per file.

    Raises :class:`SendError` if no association can be made; a failure during the association
    aborts it and marks the files not yet answered with ``status=None``.
    """
    datasets = []
    for path in paths:
        ds = dcmread(path)
        datasets.append((path, ds))
    ae = _ae(calling_aet, timeout_s)
    contexts: dict[str, set[str]] = {}
    for _, ds in datasets:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), set())
        syntaxes.update({str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes, key=lambda s: s != ExplicitVRLittleEndian))
    assoc = _associate(ae, destination, tls)
    results: list[StoreResult] = []
    try:
        for path, ds in datasets:
            if not assoc.is_established:
                results.append(StoreResult(path, None, "association lost before sending"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                results.append(StoreResult(path, None, f"not sent: {exc}"))
                continue
            code = int(rsp.Status) if rsp and "Status" in rsp else None
            results.append(StoreResult(path, code, describe(code)))
    except Exception:
        assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
    else:
        assoc.abort()
    return results
