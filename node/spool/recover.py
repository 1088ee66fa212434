"""Bring the index back in line with the spool after an unclean stop.

The spool is the source of truth for received instances: a file there was fsynced before its
C-STORE was acknowledged. A power loss can roll back the last index commits (WAL, synchronous=NORMAL),
so at start every spool file the index does not know is read and recorded again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.model.records import InstanceMeta
from node.spool.index import Index
from node.spool.store import Spool

log = logging.getLogger(__name__)


def reconcile(spool: Spool, index: Index, *, quiet_period_s: float) -> int:
    """Index spool files missing from the index; return how many were added."""
    known = index.all_instance_paths()
    added = 0
    for path in spool.all_files():
        if str(path) in known:
            continue
        meta = _meta(path)
        if meta is None:
            continue
        if index.add_instance(meta, path=path, size=path.stat().st_size, calling_ae="(recovered)",
                              quiet_period_s=quiet_period_s):
            added += 1
    if added:
        log.warning("indexed %d spooled instance(s) that had no index row (stored, then a crash before "
                    "indexing; never acknowledged, or acknowledged and then lost to a power cut)", added)
    return added


def _meta(path: Path) -> InstanceMeta | None:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        return InstanceMeta(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            transfer_syntax=str(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        log.error("spool file %s is unreadable and is left out of the index: %s", path, exc)
        return None
