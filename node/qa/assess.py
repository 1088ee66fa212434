"""One edited structure set that came back: find what it refers to, and compare it with the node's result.

:func:`assess` never raises for what is wrong with the input: every way a set cannot be compared becomes
its record's outcome and reason (a set the node has no result for is "no AI result to compare"; an
unreadable set, one that references no series, or one of 10,000 ROIs is "rejected", with the reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.assemble.volume import build_volume, read_series
from node.config import NodeConfig
from node.errors import NodeError
from node.model.enums import JobKind, QaOutcome
from node.model.qa_records import QaSet, StructureQa
from node.model.records import JobRecord, JobState
from node.qa.compare import (
    EditedSetError,
    Grid,
    OurResult,
    compare_structures,
    edited_bundles,
    read_ours,
    read_side,
)
from node.read.rtstruct import RT_STRUCTURE_SET_STORAGE
from node.read.seg import SEGMENTATION_STORAGE, referenced_series
from node.spool.index import Index
from node.spool.index_qa import EditedInstance

log = logging.getLogger(__name__)

#: Jobs whose results were written (and so may have come back edited).
WROTE_RESULTS = (JobState.DONE, JobState.AWAITING_REVIEW, JobState.REJECTED)


class Refusal(Exception):
    """Why a set is not compared: its outcome and the sentence for its record."""

    def __init__(self, outcome: QaOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _image_uids(ds: Dataset) -> set[str]:
    """The SOP instances an RTSTRUCT's contours or a SEG's frames were drawn on."""
    found: set[str] = set()
    for roi in ds.get("ROIContourSequence", None) or []:
        for contour in roi.get("ContourSequence", None) or []:
            found.update(_text(i, "ReferencedSOPInstanceUID") for i in contour.get("ContourImageSequence", None) or [])
    for frame in ds.get("PerFrameFunctionalGroupsSequence", None) or []:
        for derivation in frame.get("DerivationImageSequence", None) or []:
            sources = derivation.get("SourceImageSequence", None) or []
            found.update(_text(i, "ReferencedSOPInstanceUID") for i in sources)
    found.discard("")
    return found


def _named_series(ds: Dataset) -> list[str]:
    if _text(ds, "SOPClassUID") == SEGMENTATION_STORAGE:
        return list(referenced_series(ds))
    named = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", None) or []:
        for study in frame.get("RTReferencedStudySequence", None) or []:
            named += [_text(s, "SeriesInstanceUID") for s in study.get("RTReferencedSeriesSequence", None) or []]
    return [uid for uid in dict.fromkeys(named) if uid]


def referenced_ct(index: Index, ds: Dataset) -> str:
    """The image series the set refers to: named in the set (the one the node segmented, when it names
    several), else the stored series holding most of the images its contours were drawn on."""
    named = _named_series(ds)
    for uid in named:
        if any(j.kind is JobKind.SEGMENT for j in index.series_jobs(uid)):
            return uid
    if named:
        return named[0]
    images = _image_uids(ds)
    holders = index.series_of_instances(images) if images else {}
    if holders:
        return max(holders, key=lambda uid: holders[uid])
    raise Refusal(QaOutcome.REJECTED, "the structure set references no image series (no RTReferencedSeriesSequence"
                  + (f", and none of the {len(images)} images its contours name is stored here)" if images else
                     " and no contour names an image)"))


def our_results(index: Index, ct_series_uid: str) -> list[OurResult]:
    """The newest result of each bundle that segmented the series: its RTSTRUCTs (one per structure selection),
    else its SEGs."""
    jobs = [j for j in index.series_jobs(ct_series_uid) if j.kind is JobKind.SEGMENT]
    newest: dict[str, JobRecord] = {j.bundle: j for j in jobs if j.state in WROTE_RESULTS and j.result_dir}
    found = []
    for job in newest.values():
        folder = Path(job.result_dir)
        files = sorted(folder.glob("RTSTRUCT_*.dcm")) or sorted(folder.glob("SEG_*.dcm"))
        if files:
            found.append(OurResult(job.id, job.bundle, tuple(files)))
    if not found:
        if index.series(ct_series_uid) is None:
            why = f"it references series {ct_series_uid}, which the node never received (or retention deleted)"
        else:
            states = ", ".join(f"job {j.id} {j.bundle} {j.state.value}" for j in jobs) or "no jobs"
            why = f"the node wrote no result for series {ct_series_uid} ({states})"
        raise Refusal(QaOutcome.NO_AI_RESULT, why)
    return found


def _own_result(index: Index, cfg: NodeConfig, uid: str) -> int | None:
    job = index.own_result_job(uid)
    if job is not None:
        return job
    for path in cfg.results_dir.glob(f"job-*/*_{uid}.dcm") if cfg.results_dir.is_dir() else ():
        return int(path.parent.name.removeprefix("job-"))
    return None


def _ct_grid(index: Index, ct_series_uid: str) -> Grid:
    paths = index.instance_paths(ct_series_uid)
    if not paths:
        raise Refusal(QaOutcome.NO_AI_RESULT, f"the images of series {ct_series_uid} are no longer stored "
                      "(retention deleted them), so the contours cannot be placed")
    try:
        return Grid.of(build_volume(read_series(paths)))
    except NodeError as exc:
        raise Refusal(QaOutcome.REJECTED, f"the images of series {ct_series_uid} do not form a volume: {exc}") from exc


def assess(index: Index, cfg: NodeConfig, instance: EditedInstance, series_uid: str,
           now: float | None = None) -> QaSet:
    """Compare one edited set with the node's result; every refusal becomes the record's outcome and reason."""
    base = QaSet(sop_instance_uid=instance.sop_instance_uid, series_uid=series_uid, path=str(instance.path),
                 outcome=QaOutcome.REJECTED, calling_ae=instance.calling_ae, received_at=instance.received_at)
    label, ct_uid, jobs = "", "", tuple[int, ...]()
    try:
        try:
            ds = dcmread(instance.path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise Refusal(QaOutcome.REJECTED, f"not a readable DICOM file ({exc})") from exc
        label = _text(ds, "StructureSetLabel") or _text(ds, "ContentLabel")
        if _text(ds, "SOPClassUID") not in (RT_STRUCTURE_SET_STORAGE, SEGMENTATION_STORAGE):
            raise Refusal(QaOutcome.REJECTED, f"SOP class {_text(ds, 'SOPClassUID') or 'missing'} is neither an RT "
                          "Structure Set nor a Segmentation")
        if (own := _own_result(index, cfg, instance.sop_instance_uid)) is not None:
            raise Refusal(QaOutcome.OWN_RESULT, f"this is job {own}'s own result coming back, not an edit of it")
        rois = len(ds.get("StructureSetROISequence", None) or [])
        if rois > cfg.qa.max_rois:
            raise Refusal(QaOutcome.REJECTED, f"the structure set has {rois} ROIs, more than qa.max_rois "
                          f"({cfg.qa.max_rois}); it was not compared")
        ct_uid = referenced_ct(index, ds)
        results = our_results(index, ct_uid)
        jobs = tuple(r.job_id for r in results)
        grid = _ct_grid(index, ct_uid)
        _, theirs = read_side(ds, grid, max_rois=cfg.qa.max_rois)
        ours = read_ours(results, grid, theirs, cfg.qa.alias_table())
        bundles = edited_bundles(ours, theirs, cfg.qa)
        jobs = tuple(r.job_id for r in results if r.bundle in bundles)
        structures = compare_structures([s for s in ours if s.bundle in bundles], theirs, grid, cfg.qa)
    except Refusal as refusal:
        outcome, reason = refusal.outcome, refusal.reason
    except EditedSetError as exc:
        outcome, reason = QaOutcome.REJECTED, str(exc)
    except MemoryError:
        outcome, reason = QaOutcome.REJECTED, "the comparison ran out of memory"
    else:
        return _done(base, label, ct_uid, jobs, QaOutcome.COMPARED, "", now, structures)
    log.info("edited set %s: %s: %s", instance.sop_instance_uid, outcome.value, reason)
    return _done(base, label, ct_uid, jobs, outcome, reason, now)


def _done(base: QaSet, label: str, ct_uid: str, jobs: Iterable[int], outcome: QaOutcome, reason: str,
          now: float | None, structures: list[StructureQa] | None = None) -> QaSet:
    return replace(base, label=label, ct_series_uid=ct_uid, result_jobs=tuple(jobs), outcome=outcome, reason=reason,
                   compared_at=time.time() if now is None else now, structures=structures or [])
