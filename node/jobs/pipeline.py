"""One job, from spooled files to written SEG and RTSTRUCT: the code the service's workers and the
offline ``segment`` command share, so both produce the same objects (the same UIDs included).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.assemble.select import SeriesFacts, why_not
from node.assemble.volume import build_volume, read_series
from node.config_output import OutputPlan
from node.errors import Declined, VolumeError
from node.infer.backends.threads import heavy_step
from node.infer.engine import Engine
from node.infer.memory import release_free_memory
from node.infer.segment import segment_volume
from node.model.bundle import Bundle
from node.model.enums import ModelKind, SegType
from node.model.records import StructureVolume
from node.model.volume import MixedFrames, Volume
from node.write.clean import Cleaning, clean_labels
from node.write.contour_check import describe
from node.write.contours import Outlines
from node.write.files import WrittenObject, write_preview
from node.write.provenance import Provenance
from node.write.result import Result, label_mask, present_labels
from node.write.selection import write_selections
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
    contours: str = ""  # the RTSTRUCT's contour check, per ROI (node.write.contour_check.describe)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the worker's turn for a memory-heavy step (``heavy_step``); the wait for it is counted apart, in
        ``waited``, not in the next lap (a network's wait for its turn is within its ``infer``)."""
        started = time.perf_counter()
        with heavy_step():
            waited = time.perf_counter() - started
            self.timings["waited"] = round(self.timings.get("waited", 0.0) + waited, 3)
            self._t += waited
            yield


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
    """Each structure found and its volume in mL (voxels × the voxel's volume on the image grid; on an
    uneven stack each slice counts with its own thickness, half the gap to each neighbour)."""
    geometry = result.volume.geometry
    pixel_ml = abs(geometry.spacing[1] * geometry.spacing[2]) / 1000.0
    thickness = np.abs(geometry.slice_thicknesses())
    return [StructureVolume(label.name, round(float(
                np.count_nonzero(label_mask(result.labels, label), axis=(1, 2)) @ thickness) * pixel_ml, 1))
            for label in result.found]


class SeriesVolume:
    """One series' volume, read and assembled once for every job of the series that runs on it.

    The first :meth:`get` reads the files and builds the volume (or meets the error that every job of
    the series would meet: it is kept and raised again to each); later calls, from this thread or
    another, get the same :class:`Volume`. Its voxels are made read-only: the jobs share them, and a
    step that changed them in place would change every other bundle's input, so it fails loudly instead.
    """

    def __init__(self, paths: Sequence[Path] | Callable[[], Sequence[Path]],
                 mixed_frames: MixedFrames = MixedFrames.SEGMENT) -> None:
        self.paths = paths  # or how to look them up, at the first get() (where an error is the job's)
        self.mixed_frames = mixed_frames
        self._lock = threading.Lock()
        self._volume: Volume | None = None
        self._error: Exception | None = None
        self._built = False

    def get(self) -> tuple[Volume, dict[str, float]]:
        """The volume, and what getting it cost this caller: ``read`` and ``assemble`` seconds for the
        call that built it, ``shared_volume`` (the wait for another job's build) for the others."""
        started = time.perf_counter()
        with self._lock:
            if self._built:
                if self._error is not None:
                    raise self._error
                assert self._volume is not None
                return self._volume, {"shared_volume": round(time.perf_counter() - started, 3)}
            self._built = True
            watch = _Stopwatch()
            try:
                datasets = read_series(self.paths() if callable(self.paths) else self.paths)
                watch.lap("read")
                volume = build_volume(datasets, mixed_frames=self.mixed_frames)
                del datasets
                watch.lap("assemble")
            except Exception as exc:
                self._error = exc
                raise
            volume.voxels.flags.writeable = False
            release_free_memory()  # the files' pixel data, now in the volume: back to the system before the jobs
            self._volume = volume
            return volume, watch.timings


def run_job(
    paths: Sequence[Path] | SeriesVolume,
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
    mixed_frames: MixedFrames = MixedFrames.SEGMENT,
    output: OutputPlan | None = None,
) -> JobOutcome:
    """Read, assemble, segment and write one series with one bundle; return what was written.

    ``paths`` are the series' files, or a :class:`SeriesVolume` that the jobs of the series share (read and
    assembled once; ``mixed_frames`` is then the one it was made with). ``output``: which structures are written
    and under which ROI names (``[output]``, node/config_output.py; default: every structure, no renames).
    """
    source = paths if isinstance(paths, SeriesVolume) else SeriesVolume(paths, mixed_frames)
    volume, got = source.get()
    watch = _Stopwatch()
    watch.timings.update(got)
    notes = [*volume.notes, derive_missing_filing_uids(volume) if derive_missing_uids else ""]
    note = "; ".join(n for n in notes if n)  # e.g. the frame of reference chosen among several
    check_volume_series(volume, bundle)
    series_uid = str(volume.headers[0].SeriesInstanceUID)
    # The large steps of the jobs of a series that run at once take turns (node/infer/backends/threads.py): a
    # built-in bundle's segmentation here, a network's run in its engine, cleaning and writing below.
    with watch.turn() if bundle.model_kind is ModelKind.BUILTIN else contextlib.nullcontext():
        labels = segment_volume(volume, bundle, engine)
    watch.lap("infer")
    with watch.turn():
        outlines: dict[int, Outlines] = {}  # the cleaning's tracing, which the RTSTRUCT reuses where it still holds
        _log_cleaning(clean_labels(labels, bundle, volume.geometry, outlines), series_uid, bundle)  # before writing
    watch.lap("clean")
    found = present_labels(labels, bundle)
    if not found:
        raise Declined(f"{bundle.name} found none of its structures "
                       f"({', '.join(label.name for label in bundle.labels)}) "
                       "in this series; nothing to write")
    key = job_key(series_uid, bundle.id, volume.sop_instance_uids)
    plan = output or OutputPlan()
    result = Result(volume, labels, bundle, found, ResultUids.for_job(key), provenance, plan.roi_names, outlines)
    with watch.turn():  # writing is the other large step (SEG frames, contours): it takes its turn too
        # one SEG and RTSTRUCT per distinct selection (node/config_output.py): the site's, then each destination's
        objects = write_selections(result, out_dir, plan, key, write_seg=write_seg, write_rtstruct=write_rtstruct,
                                   seg_type=seg_type)
    if not objects and (write_seg or write_rtstruct):
        selections = "; ".join(", ".join(names) for names in (plan.structures or (), *plan.others))
        raise Declined(f"{bundle.name} found {', '.join(label.name for label in found)} in this series, none of the "
                       f"structures selected for sending ({selections}); nothing to write")
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
        contours=next((describe(o.contour_checks) for o in objects if o.contour_checks), ""),
    )


def _log_cleaning(cleaned: list[Cleaning], series_uid: str, bundle: Bundle) -> None:
    changes = [f"{c.name}: {c.parts_dropped} parts dropped, {c.holes_filled} holes filled ({c.pixels_changed} px)"
               for c in cleaned if c.pixels_changed]
    if changes:
        log.info("%s on %s: cleaned %s", bundle.id, series_uid, "; ".join(changes))
