"""Proof of delivery: after a destination answered Success, ask it whether it holds each object.

A C-STORE Success or a STOW-RS 200 says the peer accepted the object, not that it is stored (peers have
answered Success and lost the object). With ``verify = "find"`` the sender asks afterwards, at most once
every ``verify_delay_s`` per destination: C-FIND at IMAGE level for a DICOM destination, QIDO-RS
(``GET url/studies/S/series/R/instances?SOPInstanceUID=…``) for a DICOMweb one. An object seen there is
marked verified; one not seen within ``verify_timeout_s`` of its send is sent again (same file, same UIDs)
and counted; after ``send.max_attempts`` such resends it is a dead letter saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread

from node.config import Destination, NodeConfig
from node.dicom.find import InstanceKey, find_instances
from node.dicom.qido import qido_instances
from node.model.enums import DestinationType
from node.send.transports.dicomweb import StowTransport

log = logging.getLogger(__name__)


def instance_key(path: Path) -> InstanceKey:
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    return InstanceKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def held_by(cfg: NodeConfig, destination: Destination, paths: list[Path],
            stow: StowTransport) -> dict[str, bool]:
    """Per SOP Instance UID of ``paths``, whether ``destination`` holds it now."""
    keys = [instance_key(p) for p in paths]
    if destination.type is DestinationType.DICOMWEB:
        assert destination.web is not None
        with stow.client(destination) as client:
            return qido_instances(client, destination.web.url, keys)
    return find_instances(destination, keys, calling_aet=cfg.ae_title, timeout_s=cfg.send_timeout_s, tls=cfg.tls)
