"""Storage Commitment Push Model (PS3.4 J) as an SCU: proof that a destination holds what it acknowledged.

The sender asks with an N-ACTION (action type 1) naming each object by SOP Class and Instance UID under a
new Transaction UID; the destination answers, when it has checked, with an N-EVENT-REPORT (event type 1:
all committed, 2: some failed) carrying the same Transaction UID. It may send that report on the same
association, or later on a new association to the node's own DICOM port (as Orthanc does: the node's AE
must then be among its known modalities). Both arrive at :class:`CommitmentReports`, which passes each
report to the callback the service gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from node.config import Destination, TlsConfig
from node.dicom.scu import _ae, _associate
from node.dicom.status import describe
from node.errors import SendError

log = logging.getLogger(__name__)

#: The well-known SOP Instance UID of the Storage Commitment Push Model (PS3.4 J.3.5).
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMIT = 1


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT's content: the transaction, the committed instances, the failed ones with a reason."""

    transaction_uid: str
    committed: list[str]
    failed: list[tuple[str, int | None]]


def read_report(ds: Dataset) -> CommitmentReport:
    committed = [str(i.get("ReferencedSOPInstanceUID", "")) for i in ds.get("ReferencedSOPSequence", []) or []]
    failed = [(str(i.get("ReferencedSOPInstanceUID", "")),
               int(i.FailureReason) if i.get("FailureReason") is not None else None)
              for i in ds.get("FailedSOPSequence", []) or []]
    return CommitmentReport(str(ds.get("TransactionUID", "")), committed, failed)


class CommitmentReports:
    """Receives N-EVENT-REPORTs (on the node's SCP or on the sender's own association) and hands them on."""

    def __init__(self, on_report: Callable[[CommitmentReport], None] | None = None) -> None:
        self.on_report = on_report

    def handle(self, event: evt.Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT: read the report and pass it on; 0x0000, or 0x0110 when it cannot be read."""
        try:
            report = read_report(event.event_information)
        except (AttributeError, ValueError, TypeError) as exc:
            log.error("a storage commitment report from %s could not be read: %s",
                      event.assoc.requestor.ae_title, exc)
            return 0x0110, None
        log.info("storage commitment report from %s for transaction %s: %d committed, %d failed",
                 event.assoc.requestor.ae_title if not event.assoc.is_requestor else event.assoc.acceptor.ae_title,
                 report.transaction_uid, len(report.committed), len(report.failed))
        if self.on_report is not None:
            self.on_report(report)
        return 0x0000, None


def request_commitment(destination: Destination, objects: list[tuple[str, str]], reports: CommitmentReports, *,
                       calling_aet: str, timeout_s: float = 30.0, tls: TlsConfig | None = None) -> str:
    """Ask ``destination`` to commit ``objects`` ((SOP Class UID, SOP Instance UID) pairs); return the Transaction
    UID its report will carry. Raises SendError when it cannot be asked or refuses."""
    ae = _ae(calling_aet, timeout_s)
    ae.add_requested_context(StorageCommitmentPushModel)
    transaction = str(generate_uid())
    request = Dataset()
    request.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    request.ReferencedSOPSequence = items
    ae_assoc = _associate(ae, destination, tls, handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    try:
        status, _ = ae_assoc.send_n_action(request, REQUEST_COMMIT, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
        code = int(status.Status) if status and "Status" in status else None
    except Exception:
        ae_assoc.abort()
        raise
    ae_assoc.release()
    if code != 0x0000:
        raise SendError(f"{destination} answered the storage commitment request with {describe(code)}")
    return transaction
