"""Taking one received instance into the node: checked, fsynced into the spool, recorded in the index.

The same for every way an instance arrives (C-STORE, STOW-RS): the dataset's framing and header are
checked (``read_instance_meta``), a SOP Instance already stored keeps its first copy, the free-space
watermark (``node.min_free_disk_mb``) is held, and the file is fsynced (file and folder) and indexed before
the caller answers the sender. The outcome is a DIMSE status with the sentence that explains it; a STOW-RS
answer carries the same code as its FailureReason.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
from dataclasses import dataclass

from node.config import NodeConfig
from node.dicom.filemeta import encode_file_meta
from node.dicom.header import DatasetMismatch, HeaderError, read_instance_meta
from node.dicom.status import Status
from node.model.records import InstanceMeta
from node.spool.index import Index
from node.spool.store import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """What became of one instance: its status (SUCCESS when stored, or already held) and why not."""

    status: Status
    reason: str = ""
    meta: InstanceMeta | None = None
    size: int = 0
    duplicate: bool = False

    @property
    def stored(self) -> bool:
        return self.status is Status.SUCCESS


class Acceptor:
    def __init__(self, cfg: NodeConfig, spool: Spool, index: Index) -> None:
        self.cfg = cfg
        self.spool = spool
        self.index = index

    def accept(self, *, sop_uid: str, sop_class: str, transfer_syntax: str, dataset: bytes,
               calling: str, study: str | None = None) -> Accepted:
        """Check, store durably and index one instance (``dataset`` without file meta, as encoded); with ``study``
        (STOW-RS to /studies/{study}), an instance of another study is refused (0xA900)."""
        try:
            if not dataset:
                raise DatasetMismatch(f"SOP Instance {sop_uid} carries no dataset")
            meta = read_instance_meta(dataset, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                                      transfer_syntax=transfer_syntax)
        except DatasetMismatch as exc:
            return Accepted(Status.DATASET_MISMATCH, str(exc))
        except HeaderError as exc:
            return Accepted(Status.CANNOT_UNDERSTAND, str(exc))
        if study and meta.study_uid != study:
            return Accepted(Status.DATASET_MISMATCH, f"it belongs to study {meta.study_uid}, not to the request's "
                                                     f"{study}", meta)
        if self.index.has_instance(sop_uid):
            return Accepted(Status.SUCCESS, "already stored; the first copy is kept", meta, duplicate=True)
        free_mb = shutil.disk_usage(self.spool.root).free // 2**20
        if free_mb - len(dataset) // 2**20 < self.cfg.min_free_disk_mb:
            why = (f"{free_mb} MB free in {self.spool.root}, below the {self.cfg.min_free_disk_mb} MB watermark "
                   "(node.min_free_disk_mb)")
            return Accepted(Status.OUT_OF_RESOURCES, why, meta)
        header = encode_file_meta(sop_class, sop_uid, transfer_syntax, calling)
        try:
            path, size = self.spool.store(sop_uid, [header, dataset])
            self.index.add_instance(meta, path=path, size=size, calling_ae=calling,
                                    quiet_period_s=self.cfg.quiet_period_s)
            if not path.is_file():  # retention removed it between the write and the row: write it again
                self.spool.store(sop_uid, [header, dataset])
        except sqlite3.Error as exc:
            return Accepted(Status.PROCESSING_FAILURE, f"the index could not record it: {exc}", meta)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return Accepted(Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE, str(exc), meta)
        return Accepted(Status.SUCCESS, "", meta, size)
