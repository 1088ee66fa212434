"""QIDO-RS (PS3.18 10.6) questions the node asks a DICOMweb service: does it hold these instances, and how
many instances does it hold of a series."""

from __future__ import annotations

import httpx

from node.dicom.find import InstanceKey
from node.errors import SendError

#: (0008,0018) SOP Instance UID and (0020,1209) Number of Series Related Instances, as DICOM JSON keys.
_SOP_INSTANCE_UID, _SERIES_INSTANCES = "00080018", "00201209"


def _first(item: dict[str, dict[str, list[object]]], key: str) -> object:
    values = item.get(key, {}).get("Value", [])
    return values[0] if values else None


def qido_instances(client: httpx.Client, base_url: str, keys: list[InstanceKey]) -> dict[str, bool]:
    """Per SOP Instance UID, whether the service lists it; SendError when it cannot be asked."""
    found: dict[str, bool] = {}
    for key in keys:
        url = f"{base_url.rstrip('/')}/studies/{key.study_uid}/series/{key.series_uid}/instances"
        listed = _get(client, url, {"SOPInstanceUID": key.sop_instance_uid})
        found[key.sop_instance_uid] = any(_first(i, _SOP_INSTANCE_UID) == key.sop_instance_uid for i in listed)
    return found


def qido_series_count(client: httpx.Client, base_url: str, study_uid: str, series_uid: str) -> int | None:
    """The service's NumberOfSeriesRelatedInstances for a series (None when it does not hold the series)."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series"
    listed = _get(client, url, {"SeriesInstanceUID": series_uid, "includefield": _SERIES_INSTANCES})
    for item in listed:
        count = _first(item, _SERIES_INSTANCES)
        if count is not None:
            return int(str(count))
    return None


def _get(client: httpx.Client, url: str, params: dict[str, str]) -> list[dict[str, dict[str, list[object]]]]:
    try:
        response = client.get(url, params=params)
    except httpx.HTTPError as exc:
        raise SendError(f"QIDO-RS {url} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code in (204, 404):
        return []
    if response.status_code != 200:
        raise SendError(f"QIDO-RS {url} answered HTTP {response.status_code}")
    try:
        listed = response.json() if response.content.strip() else []
    except ValueError:
        raise SendError(f"QIDO-RS {url} did not answer DICOM JSON") from None
    return listed if isinstance(listed, list) else []
