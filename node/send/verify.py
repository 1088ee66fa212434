"""Proof of delivery: after a destination answered Success, confirm that it holds each object.

A C-STORE Success or a STOW-RS 200 says the peer accepted the object, not that it is stored (peers have
answered Success and lost the object). Per destination, ``verify``:

- ``"find"``: ask, at most once every ``verify_delay_s``: C-FIND at IMAGE level for a DICOM destination,
  QIDO-RS (``GET url/studies/S/series/R/instances?SOPInstanceUID=…``) for a DICOMweb one;
- ``"commitment"``: a Storage Commitment request (N-ACTION) for what was sent; the destination's
  N-EVENT-REPORT, on the same association or on a new one to the node's DICOM port, names what it committed
  and what failed (node.dicom.commitment).

An object confirmed is marked verified; one not confirmed within ``verify_timeout_s`` of its send (or reported
failed) is sent again (same file, same UIDs) and counted; after ``send.max_attempts`` such resends it is a dead
letter saying so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydicom import dcmread

from node import telemetry
from node.config import Destination, NodeConfig
from node.dicom.commitment import CommitmentReport, CommitmentReports, request_commitment
from node.dicom.find import InstanceKey, find_instances
from node.dicom.qido import qido_instances
from node.errors import SendError
from node.model.enums import DestinationType, VerifyMode
from node.model.records import OutboxItem
from node.spool.index import Index

log = logging.getLogger(__name__)


def instance_key(path: Path) -> InstanceKey:
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    return InstanceKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


class Verifier:
    """The sender's verification turn (:meth:`poll`) and the storage commitment reports (:meth:`on_report`)."""

    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self.destinations = {d.name: d for d in cfg.destinations}
        self.reports = CommitmentReports(self.on_report)  # reports on the sender's own associations
        self._last: dict[str, float] = {}  # per destination, when it was last asked

    def held_by(self, destination: Destination, paths: list[Path]) -> dict[str, bool]:
        """Per SOP Instance UID of ``paths``, whether ``destination`` holds it now (verify = "find")."""
        keys = [instance_key(p) for p in paths]
        if destination.type is DestinationType.DICOMWEB:
            assert destination.web is not None
            with destination.web.client(self.cfg.send_timeout_s) as client:
                return qido_instances(client, destination.web.url, keys)
        return find_instances(destination, keys, calling_aet=self.cfg.ae_title, timeout_s=self.cfg.send_timeout_s,
                              tls=self.cfg.tls)

    def poll(self, now: float | None = None) -> int:
        """One turn over the destinations with ``verify`` set; returns how many objects were confirmed."""
        now = time.time() if now is None else now
        confirmed = 0
        for destination in self.destinations.values():
            check = destination.verify
            if check.mode is VerifyMode.NONE or now - self._last.get(destination.name, 0.0) < check.delay_s:
                continue
            items = [i for i in self.index.unverified(destination.name, sent_before=now - check.delay_s)
                     if i.path.is_file()]
            if not items:
                continue
            self._last[destination.name] = now
            overdue = [i for i in items if now - (i.sent_at or now) >= check.timeout_s]
            if check.mode is VerifyMode.COMMITMENT:
                self._request_commitment(destination, [i for i in items if not i.commit_txn and i not in overdue])
                for item in overdue:
                    self._not_held(item, destination, f"{destination} did not commit it within "
                                                      f"{check.timeout_s:.0f} s of the send", now)
                continue
            try:
                held = self.held_by(destination, [i.path for i in items])
            except (SendError, OSError) as exc:
                log.warning("could not verify %d object(s) at %s: %s; asking again later", len(items), destination, exc)
                continue
            for item in items:
                if held.get(item.sop_instance_uid, False):
                    self._confirmed(item, destination.name, now)
                    confirmed += 1
                elif item in overdue:
                    self._not_held(item, destination, f"{destination} answered Success but did not hold it "
                                                      f"{check.timeout_s:.0f} s later", now)
        return confirmed

    def _request_commitment(self, destination: Destination, items: list[OutboxItem]) -> None:
        if not items:
            return
        try:
            transaction = request_commitment(destination, [(i.sop_class_uid, i.sop_instance_uid) for i in items],
                                             self.reports, calling_aet=self.cfg.ae_title,
                                             timeout_s=self.cfg.send_timeout_s, tls=self.cfg.tls)
        except (SendError, OSError, RuntimeError, ValueError) as exc:
            log.warning("could not ask %s to commit %d object(s): %s; asking again later", destination, len(items),
                        exc)
            return
        self.index.mark_commitment_requested([i.id for i in items], transaction)
        log.info("asked %s to commit %d object(s) (transaction %s)", destination, len(items), transaction)

    def on_report(self, report: CommitmentReport) -> None:
        """A storage commitment report (from any association): confirm what it committed, resend what failed."""
        items = self.index.transaction_items(report.transaction_uid)
        if not items:
            log.warning("a storage commitment report names transaction %s, which no sent object awaits",
                        report.transaction_uid)
            return
        now = time.time()
        failed = dict(report.failed)
        for item in items:
            destination = self.destinations.get(item.destination)
            if item.sop_instance_uid in report.committed:
                self._confirmed(item, item.destination, now)
            elif item.sop_instance_uid in failed and destination is not None:
                reason = failed[item.sop_instance_uid]
                shown = f"0x{reason:04X}" if reason is not None else "none given"
                self._not_held(item, destination, f"{destination} reported it not committed (failure reason "
                                                  f"{shown})", now)

    def _confirmed(self, item: OutboxItem, destination: str, now: float) -> None:
        self.index.mark_verified(item.id, now=now)
        telemetry.result_verified(destination, found=True)

    def _not_held(self, item: OutboxItem, destination: Destination, why: str, now: float) -> None:
        give_up = item.resends + 1 >= self.cfg.send_max_attempts
        status = f"{why} (send {item.resends + 1})" + ("; giving up" if give_up else "; sending it again")
        self.index.resend_unverified(item.id, status, give_up=give_up, now=now)
        telemetry.result_verified(destination.name, found=False)
        if give_up:
            telemetry.result_failed(destination.name, dead=True)
        log.warning("%s: %s", item.sop_instance_uid, status)
