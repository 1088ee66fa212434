"""Deterministic UIDs: the same job always yields the same SOP Instance UIDs.

A resend after a crash therefore carries the UIDs the PACS already has, and the PACS de-duplicates
instead of filing a second copy.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

#: Namespace of this node's name-based UIDs (a fixed random UUID; never change it).
_NAMESPACE = uuid.UUID("6c1f2a0e-8d4b-4f1e-9a43-3f0c6d2b7e51")


def job_key(series_uid: str, bundle_id: str, sop_instance_uids: Sequence[str]) -> str:
    """Identity of a segmentation job: the source series, its exact instances and the model."""
    instances = hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()
    return f"{series_uid}|{bundle_id}|{instances}"


@dataclass(frozen=True)
class ResultUids:
    seg_series: str
    seg_instance: str
    rtstruct_series: str
    rtstruct_instance: str
    preview_series: str
    preview_instance: str

    @classmethod
    def for_job(cls, key: str) -> ResultUids:
        def uid(role: str) -> str:
            # A name-based (version 5) UUID as a 2.25 UID: deterministic, and a valid UUID integer.
            # (pydicom's generate_uid ignores entropy_srcs when prefix is None.)
            return f"2.25.{uuid.uuid5(_NAMESPACE, f'{key}|{role}').int}"

        return cls(
            seg_series=uid("seg-series"),
            seg_instance=uid("seg-instance"),
            rtstruct_series=uid("rtstruct-series"),
            rtstruct_instance=uid("rtstruct-instance"),
            preview_series=uid("preview-series"),
            preview_instance=uid("preview-instance"),
        )
