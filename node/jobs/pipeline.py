"""One job, from spooled files to written SEG and RTSTRUCT: the code the service's workers and the
offline ``segment`` command share, so both produce the same objects (the same UIDs included).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.assemble.select import SeriesFacts, why_not
from node.assemble.volume import build_volume, read_series
from node.errors import Declined, VolumeError
from node.infer.engine import Engine
from node.infer.segment import segment_volume
from node.model.bundle import Bundle
from node.model.enums import SegType
from node.model.records import StructureVolume
from node.model.volume import Volume
from node.write.files import WrittenObject, write_preview, write_results
from node.write.provenance import Provenance
from node.write.result import Result, label_mask, present_labels
from node.write.uids import ResultUids, job_key

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    series_uid: str
    bundle: str
    structures: list[str]
    objects: list[WrittenObject]
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""  # something the user should know about the result
    volumes: list[StructureVolume] = field(default_factory=list)  # each structure found, with its volume


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now


def derive_missing_filing_uids(volume: Volume) -> str:
    """Give a series whose datasets have empty Study/Series Instance UIDs derived ones, in memory.

    For the offline ``segment`` command only: some real files carry their UIDs only in the file meta
    (the service refuses such instances at C-STORE, 0xA900). The derived UIDs are deterministic
    (a name-based UUID of the instances' SOP Instance UIDs) so a rerun gives the same objects. Returns
    a note for the user ('' when nothing was missing).
    """
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID")
               if any(not str(h.get(k, "") or "") for h in volume.headers)]
    if not missing:
        return ""
    basis = "\n".join(sorted(volume.sop_instance_uids))
    derived = {k: f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, k + chr(10) + basis).int}" for k in missing}
    for header in volume.headers:
        for keyword, value in derived.items():
            setattr(header, keyword, value)
    return (f"empty {' and '.join(missing)} in the files: results carry derived UIDs "
            f"({', '.join(derived.values())}) and will not file into the source's study in a PACS")


def check_volume_series(volume: Volume, bundle: Bundle) -> None:
    """Re-check selection on the real headers (the index only saw the first instance's)."""
    first = volume.headers[0]
    facts = SeriesFacts(
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        instance_count=len(volume.headers),
    )
    reason = why_not(bundle, facts)
    if reason:
        raise VolumeError(reason)
    series_uids = {str(h.get("SeriesInstanceUID", "") or "") for h in volume.headers}
    if "" in series_uids:
        raise VolumeError("instances of this series have an empty SeriesInstanceUID; results could not be filed")
    if not str(first.get("StudyInstanceUID", "") or ""):
        raise VolumeError("the series has an empty StudyInstanceUID; results could not be filed in its study")


def structure_volumes(result: Result) -> list[StructureVolume]:
    """Each structure found and its volume in mL (voxels × the voxel's volume on the image grid)."""
    dz, dy, dx = result.volume.geometry.spacing
    voxel_ml = abs(dz * dy * dx) / 1000.0
    return [StructureVolume(label.name, round(float(np.count_nonzero(label_mask(result.labels, label))) * voxel_ml, 1))
            for label in result.found]


def run_job(
    paths: Sequence[Path],
    bundle: Bundle,
    engine: Engine | None,
    out_dir: Path,
    *,
    provenance: Provenance,
    write_seg: bool = True,
    write_rtstruct: bool = True,
    preview_png: bool = False,
    preview_sc: bool = False,
    seg_type: SegType = SegType.BINARY,
    derive_missing_uids: bool = False,
) -> JobOutcome:
    """Read, assemble, segment and write one series with one bundle; return what was written."""
    watch = _Stopwatch()
    datasets = read_series(paths)
    watch.lap("read")
    volume = build_volume(datasets)
    del datasets
    watch.lap("assemble")
    note = derive_missing_filing_uids(volume) if derive_missing_uids else ""
    check_volume_series(volume, bundle)
    series_uid = str(volume.headers[0].SeriesInstanceUID)
    labels = segment_volume(volume, bundle, engine)
    watch.lap("infer")
    found = present_labels(labels, bundle)
    if not found:
        raise Declined(f"{bundle.name} found none of its structures "
                       f"({', '.join(label.name for label in bundle.labels)}) "
                       "in this series; nothing to write")
    uids = ResultUids.for_job(job_key(series_uid, bundle.id, volume.sop_instance_uids))
    result = Result(volume, labels, bundle, found, uids, provenance)
    objects = write_results(result, out_dir, write_seg=write_seg, write_rtstruct=write_rtstruct, seg_type=seg_type)
    watch.lap("write")
    volumes = structure_volumes(result)
    if preview_png or preview_sc:
        objects += write_preview(result, out_dir, png=preview_png, secondary_capture=preview_sc)
        watch.lap("preview")
    return JobOutcome(
        series_uid=series_uid,
        bundle=bundle.id,
        structures=[label.name for label in found],
        objects=objects,
        timings=watch.timings,
        note=note,
        volumes=volumes,
    )
