"""Deterministic UIDs: the same job always yields the same SOP Instance UIDs.

A resend after a crash therefore carries the UIDs the PACS already has, and the PACS de-duplicates
instead of filing a second copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import generate_uid


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

    @classmethod
    def for_job(cls, key: str) -> ResultUids:
        def uid(role: str) -> str:
            return str(generate_uid(prefix=None, entropy_srcs=[key, role]))

        return cls(
            seg_series=uid("seg-series"),
            seg_instance=uid("seg-instance"),
            rtstruct_series=uid("rtstruct-series"),
            rtstruct_instance=uid("rtstruct-instance"),
        )
