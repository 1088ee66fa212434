"""C-FIND as a Service Class User: is each SOP instance at a peer? (the destination's ``verify = "find"``).

One association (Study Root Query/Retrieve, FIND) asks at IMAGE level for each object, with its study and
series UIDs as the hierarchical keys and its SOP Instance UID as the unique key; an object is there when a
pending response returns that UID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from node.config import Destination, TlsConfig
from node.dicom.scu import _ae, _associate
from node.dicom.status import describe
from node.errors import SendError

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class InstanceKey:
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def find_instances(destination: Destination, keys: list[InstanceKey], *, calling_aet: str, timeout_s: float = 30.0,
                   tls: TlsConfig | None = None) -> dict[str, bool]:
    """Per SOP Instance UID, whether the peer reports it stored. Raises SendError when it cannot be asked."""
    ae = _ae(calling_aet, timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, destination, tls)
    found: dict[str, bool] = {}
    try:
        for key in keys:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = key.study_uid
            query.SeriesInstanceUID = key.series_uid
            query.SOPInstanceUID = key.sop_instance_uid
            matches: set[str] = set()
            final: int | None = None
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if not status or "Status" not in status:
                    raise SendError(f"C-FIND to {destination} got no answer for {key.sop_instance_uid}")
                code = int(status.Status)
                if code in PENDING and identifier is not None:
                    matches.add(str(identifier.get("SOPInstanceUID", "")))
                else:
                    final = code
            if final not in (0x0000, None):
                raise SendError(f"C-FIND to {destination} for {key.sop_instance_uid} ended {describe(final)}")
            found[key.sop_instance_uid] = key.sop_instance_uid in matches
    except Exception:
        assoc.abort()
        raise
    assoc.release()
    return found


def find_series_count(peer: Destination, study_uid: str, series_uid: str, *, calling_aet: str,
                      timeout_s: float = 30.0, tls: TlsConfig | None = None) -> int | None:
    """The peer's NumberOfSeriesRelatedInstances for a series (C-FIND at SERIES level), None when it does not
    hold the series. Raises SendError when it cannot be asked."""
    ae = _ae(calling_aet, timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, tls)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = ""
    count: int | None = None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise SendError(f"C-FIND to {peer} got no answer for series {series_uid}")
            code = int(status.Status)
            if code in PENDING and identifier is not None:
                value = identifier.get("NumberOfSeriesRelatedInstances", None)
                if value not in (None, ""):
                    count = int(value)
            elif code != 0x0000:
                raise SendError(f"C-FIND to {peer} for series {series_uid} ended {describe(code)}")
    except Exception:
        assoc.abort()
        raise
    assoc.release()
    return count
