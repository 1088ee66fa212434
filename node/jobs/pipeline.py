"""One job, from spooled files to written SEG and RTSTRUCT: the code the service's workers and the
offline ``segment`` command share, so both produce the same objects (the same UIDs included).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset

from node.assemble.select import SeriesFacts, why_not
from node.assemble.volume import Volume, build_volume, read_series
from node.errors import VolumeError, WriteError
from node.infer.bundle import Bundle, Label
from node.infer.engine import Engine
from node.infer.segment import segment_volume
from node.spool.store import durable_write
from node.write.preview import build_preview_sc, render_montage
from node.write.provenance import Provenance
from node.write.rtstruct import build_rtstruct
from node.write.seg import build_seg, present_labels
from node.write.uids import ResultUids, job_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenObject:
    kind: str  # "SEG" or "RTSTRUCT"
    path: Path
    sop_instance_uid: str
    sop_class_uid: str


@dataclass
class JobOutcome:
    series_uid: str
    bundle: str
    structures: list[str]
    objects: list[WrittenObject]
    timings: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now


def _save(ds: Dataset, path: Path, tmp_dir: Path) -> None:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    durable_write(path, buffer.getvalue(), tmp_dir=tmp_dir)


def _write_seg(volume: Volume, labels: np.ndarray, bundle: Bundle, found: list[Label], uids: ResultUids,
               provenance: Provenance, seg_type: str, out_dir: Path) -> WrittenObject:
    seg = build_seg(volume, labels, bundle, found, uids, provenance, seg_type=seg_type)
    path = out_dir / f"SEG_{uids.seg_instance}.dcm"
    _save(seg, path, out_dir)
    return WrittenObject("SEG", path, uids.seg_instance, str(seg.SOPClassUID))


def write_results(
    volume: Volume,
    labels: np.ndarray,
    bundle: Bundle,
    found: list[Label],
    uids: ResultUids,
    provenance: Provenance,
    out_dir: Path,
    *,
    write_seg: bool = True,
    write_rtstruct: bool = True,
    seg_type: str = "BINARY",
) -> list[WrittenObject]:
    """Build and durably save the SEG and the RTSTRUCT of one result.

    The SEG is built on a second thread while the RTSTRUCT is traced here: much of both is numpy
    work that releases the GIL, so the two take little longer than the slower one.
    """
    objects: list[WrittenObject] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        seg_future = (
            pool.submit(_write_seg, volume, labels, bundle, found, uids, provenance, seg_type, out_dir)
            if write_seg
            else None
        )
        if write_rtstruct:
            rt = build_rtstruct(volume, labels, bundle, found, uids, provenance)
            path = out_dir / f"RTSTRUCT_{uids.rtstruct_instance}.dcm"
            _save(rt, path, out_dir)
            objects.append(WrittenObject("RTSTRUCT", path, uids.rtstruct_instance, str(rt.SOPClassUID)))
        if seg_future is not None:
            objects.insert(0, seg_future.result())
    return objects


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


def run_job(
    paths: Sequence[Path],
    bundle: Bundle,
    engine: Engine,
    out_dir: Path,
    *,
    provenance: Provenance,
    write_seg: bool = True,
    write_rtstruct: bool = True,
    preview_png: bool = False,
    preview_sc: bool = False,
    seg_type: str = "BINARY",
) -> JobOutcome:
    """Read, assemble, segment and write one series with one bundle; return what was written."""
    watch = _Stopwatch()
    datasets = read_series(paths)
    watch.lap("read")
    volume = build_volume(datasets)
    del datasets
    watch.lap("assemble")
    check_volume_series(volume, bundle)
    series_uid = str(volume.headers[0].SeriesInstanceUID)
    labels = segment_volume(volume, bundle, engine)
    watch.lap("infer")
    found = present_labels(labels, bundle)
    if not found:
        raise WriteError(f"{bundle.name} found none of its structures ({', '.join(l.name for l in bundle.labels)})")
    uids = ResultUids.for_job(job_key(series_uid, bundle.id, volume.sop_instance_uids))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir
    objects: list[WrittenObject] = []
    objects.extend(write_results(volume, labels, bundle, found, uids, provenance, out_dir,
                                 write_seg=write_seg, write_rtstruct=write_rtstruct, seg_type=seg_type))
    watch.lap("write")
    if preview_png or preview_sc:
        montage = render_montage(volume, labels, found, f"{bundle.algorithm_name} {bundle.version} - not for diagnosis")
        if preview_png:
            buffer = BytesIO()
            montage.save(buffer, format="PNG")
            durable_write(out_dir / "preview.png", buffer.getvalue(), tmp_dir=tmp_dir)
        if preview_sc:
            sc = build_preview_sc(volume, montage, series_uid=uids.preview_series,
                                  instance_uid=uids.preview_instance, provenance=provenance)
            path = out_dir / f"PREVIEW_{uids.preview_instance}.dcm"
            _save(sc, path, tmp_dir)
            objects.append(WrittenObject("PREVIEW", path, uids.preview_instance, str(sc.SOPClassUID)))
        watch.lap("preview")
    return JobOutcome(
        series_uid=series_uid,
        bundle=bundle.id,
        structures=[label.name for label in found],
        objects=objects,
        timings=watch.timings,
    )
