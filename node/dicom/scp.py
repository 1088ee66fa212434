"""The receiver: a pynetdicom Verification and Storage SCP that spools what it is sent.

The C-STORE handler does the least it can: take the peer's bytes as encoded (no pixel decode),
read a few header attributes, write them tmp → fsync → rename into the spool, commit the instance to
the index, and only then answer Success. Inference never runs on an association thread.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable
from io import BytesIO
from typing import cast

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeConfig
from node.dicom.filemeta import encode_file_meta
from node.dicom.net import set_tcp_nodelay
from node.dicom.status import Status
from node.domain import InstanceMeta
from node.errors import ListenError
from node.spool.index import Index
from node.spool.store import Spool

log = logging.getLogger(__name__)

_HEADER_TAGS = ["Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]


class HeaderError(ValueError):
    """The received dataset's header cannot be read."""


class DatasetMismatch(HeaderError):
    """The received dataset contradicts the C-STORE request (another SOP class or instance)."""


def read_instance_meta(encoded_file: bytes, *, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str) -> InstanceMeta:
    """Parse the few attributes the index needs from an encoded DICOM file, pixels untouched.

    The C-STORE request's Affected SOP Instance/Class UIDs are authoritative (some real files carry
    an empty SOPInstanceUID in the dataset and the UID only in the file meta). An empty Study or
    Series Instance UID is kept as empty and recorded; the job for such a series fails with that
    reason rather than the instance being refused, so nothing a sender considers stored is lost.
    """
    try:
        ds = dcmread(BytesIO(encoded_file), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        modality = str(ds.get("Modality", "") or "")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        ds_class = str(ds.get("SOPClassUID", "") or "")
        ds_instance = str(ds.get("SOPInstanceUID", "") or "")
    except Exception as exc:  # pydicom, zlib (deflate), struct: any failure to parse is the peer's data
        raise HeaderError(
            f"the dataset of SOP Instance {sop_instance_uid!r} cannot be parsed: {type(exc).__name__}: {exc}"
        ) from exc
    # A dataset without its own SOPClassUID is not a composite instance: DCMTK's storescu, for one,
    # sends a DICOMDIR under the UIDs of the first image it lists. Accepting it would take that
    # image's UID, and the real image would later be dropped as a duplicate.
    if ds_class != sop_class_uid:
        raise DatasetMismatch(
            f"the dataset's SOPClassUID {ds_class or '(absent)'!r} does not match the C-STORE request's "
            f"Affected SOP Class UID {sop_class_uid!r}"
        )
    if ds_instance and ds_instance != sop_instance_uid:
        raise DatasetMismatch(
            f"the dataset's SOPInstanceUID {ds_instance!r} does not match the C-STORE request's "
            f"Affected SOP Instance UID {sop_instance_uid!r}"
        )
    return InstanceMeta(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=modality,
        transfer_syntax=transfer_syntax,
    )


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
        self._lock = threading.Lock()
        self.received = 0

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = self.cfg.max_pdu_size
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.maximum_associations = 32
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        if self.cfg.allowed_calling_aes:
            ae.require_calling_aet = list(self.cfg.allowed_calling_aes)
        return ae

    def start(self) -> None:
        ae = self._make_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        try:
            self._server = ae.start_server(
                (self.cfg.bind_address, self.cfg.port), block=False, evt_handlers=handlers  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.cfg.bind_address}:{self.cfg.port}: {exc.strerror or exc} "
                "(is another node or PACS using the port?)"
            ) from exc
        log.info(
            "listening as %s on %s:%d (calling AEs: %s)",
            self.cfg.ae_title,
            self.cfg.bind_address,
            self.cfg.port,
            ", ".join(self.cfg.allowed_calling_aes) or "any",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ------------------------------------------------------------------ handlers
    def _on_accepted(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        if not self.cfg.allowed_calling_aes:
            log.info("association accepted from %s at %s:%s (no allow-list: any calling AE is accepted)",
                     req.ae_title, req.address, req.port)
        else:
            log.info("association accepted from %s at %s:%s", req.ae_title, req.address, req.port)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association rejected from calling AE %r at %s:%s (not in allowed_calling_aes, "
                    "or every association slot is in use)", req.ae_title, req.address, req.port)

    def _on_ended(self, event: evt.Event) -> None:
        with self._lock:
            series = self._assoc_series.pop(id(event.assoc), set())
        if series:
            self.index.settle_sooner(series, self.cfg.release_settle_s)

    def _on_store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        calling = event.assoc.requestor.ae_title
        if not sop_uid:
            log.error("C-STORE from %s refused: the request has no Affected SOP Instance UID", calling)
            return Status.DATASET_MISMATCH
        try:
            transfer_syntax = str(event.context.transfer_syntax)
            dataset = event.encoded_dataset(include_meta=False)
            header = encode_file_meta(sop_class, sop_uid, transfer_syntax, calling)
            meta = read_instance_meta(
                header + dataset,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                transfer_syntax=transfer_syntax,
            )
        except DatasetMismatch as exc:
            log.error("C-STORE from %s refused (0x%04X): %s", calling, Status.DATASET_MISMATCH, exc)
            return Status.DATASET_MISMATCH
        except HeaderError as exc:
            log.error("C-STORE from %s refused (0x%04X): %s", calling, Status.CANNOT_UNDERSTAND, exc)
            return Status.CANNOT_UNDERSTAND
        if self.index.has_instance(sop_uid):
            log.info("C-STORE from %s: SOP Instance %s already stored; kept the first copy", calling, sop_uid)
            return Status.SUCCESS
        free_mb = shutil.disk_usage(self.spool.root).free // 2**20
        if free_mb - len(dataset) // 2**20 < self.cfg.min_free_disk_mb:
            log.error("C-STORE from %s of %s refused (0x%04X): %d MB free in %s, below the %d MB watermark "
                      "(node.min_free_disk_mb)", calling, sop_uid, Status.OUT_OF_RESOURCES, free_mb,
                      self.spool.root, self.cfg.min_free_disk_mb)
            return Status.OUT_OF_RESOURCES
        try:
            path, size = self.spool.store(sop_uid, [header, dataset])
            self.index.add_instance(
                meta, path=path, size=size, calling_ae=calling, quiet_period_s=self.cfg.quiet_period_s
            )
        except sqlite3.Error as exc:
            log.error("C-STORE from %s of %s failed (0x%04X): the index could not record it: %s",
                      calling, sop_uid, Status.PROCESSING_FAILURE, exc)
            return Status.PROCESSING_FAILURE
        except OSError as exc:
            code = Status.OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Status.PROCESSING_FAILURE
            log.error("C-STORE from %s of %s failed (0x%04X): %s", calling, sop_uid, code, exc)
            return code
        with self._lock:
            self._assoc_series.setdefault(id(event.assoc), set()).add(meta.series_uid)
            self.received += 1
        if self.on_instance is not None:
            self.on_instance(meta)
        return Status.SUCCESS
