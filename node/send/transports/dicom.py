"""C-STORE (DIMSE) delivery, optionally over DICOM TLS: the first transport.

A DIMSE status is classified by PS3.4 B.2.3 and PS3.7 C: Success and Warning are stored; "Refused:
Out of Resources" (0xA7xx), a processing failure or no answer may pass and is retried with backoff;
"Error: Data Set does not match SOP Class" (0xA9xx), "Error: Cannot understand" (0xCxxx), "SOP Class
not supported" and "Not authorized" will not change by sending the same object again: dead letter at
once (``retry`` resends it once the peer is fixed).
"""

from __future__ import annotations

from pathlib import Path

from node.config import Destination, NodeConfig
from node.dicom.scu import store_files
from node.dicom.status import is_permanent_failure
from node.model.enums import DestinationType
from node.send.transports.base import ObjectOutcome, Outcome


class CStoreTransport:
    type = DestinationType.DICOM

    def __init__(self, cfg: NodeConfig) -> None:
        self.calling_aet = cfg.ae_title
        self.timeout_s = cfg.send_timeout_s
        self.tls = cfg.tls

    def send(self, destination: Destination, paths: list[Path]) -> list[ObjectOutcome]:
        results = store_files(destination, paths, calling_aet=self.calling_aet, timeout_s=self.timeout_s,
                              tls=self.tls)
        outcomes = []
        for result in results:
            if result.ok:
                outcome = Outcome.DELIVERED
            elif is_permanent_failure(result.status):
                outcome = Outcome.PERMANENT
            else:
                outcome = Outcome.RETRYABLE
            outcomes.append(ObjectOutcome(result.path, outcome, result.description))
        return outcomes
