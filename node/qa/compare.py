"""One edited structure set against the node's result for the same images: structure by structure.

Both sides are rasterised on the CT's own grid (the images the node segmented): the node's RTSTRUCT
(or, without one, its SEG) and the clinician's RTSTRUCT or SEG. A mask is made only while its structure
is measured, so a set of many ROIs on a large CT needs two masks' memory at a time, not one per ROI.

Whatever is wrong with a single ROI (contours off the image planes, open contours, an image that is not
the CT's) becomes that structure's note with the verdict "not compared"; what is wrong with the set as a
whole (unreadable, too many ROIs) raises :class:`EditedSetError`, which the qa job records as its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.config_qa import QaConfig
from node.errors import NodeError, Permanent
from node.model.enums import EditVerdict
from node.model.qa_records import StructureQa
from node.model.volume import Geometry, Volume
from node.qa.checks import contour_problems
from node.qa.match import canonical, pair_by_name
from node.qa.metrics import overlap, volume_ml
from node.qa.verdict import judge
from node.read import Roi, rasterise, read_structure_set
from node.read.rtstruct import RT_STRUCTURE_SET_STORAGE
from node.read.seg import SEGMENTATION_STORAGE, read_segmentation

log = logging.getLogger(__name__)


class EditedSetError(Permanent):
    """An edited structure set that cannot be compared at all (the sentence says why)."""


@dataclass(frozen=True)
class Grid:
    """The CT the node segmented, its voxels dropped: where both sides' contours are placed."""

    volume: Volume

    @classmethod
    def of(cls, volume: Volume) -> Grid:
        return cls(Volume(voxels=np.zeros((0, 0, 0), dtype=np.int16), geometry=volume.geometry,
                          headers=volume.headers))

    @property
    def geometry(self) -> Geometry:
        return self.volume.geometry

    @property
    def sop_instance_uids(self) -> list[str]:
        return self.volume.sop_instance_uids


@dataclass
class Structure:
    """One structure of one side: its name, and how to make its mask (None: nothing to fill; see problems)."""

    name: str
    bundle: str
    make: Callable[[], np.ndarray] | None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OurResult:
    """A result the node wrote for the CT: the job, its bundle, and its RTSTRUCT (or SEG) files: one, or one per
    distinct structure selection of the site's destinations ([output] structures, node/write/selection.py)."""

    job_id: int
    bundle: str
    paths: tuple[Path, ...]


def _read(path: Path | Dataset, what: str) -> Dataset:
    if isinstance(path, Dataset):
        return path
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise EditedSetError(f"{what} {path.name} is not a readable DICOM file ({exc})") from exc


def _rtstruct_side(ds: Dataset, grid: Grid, bundle: str, *, max_rois: int | None) -> tuple[str, list[Structure]]:
    rois = ds.get("StructureSetROISequence", None) or []
    if max_rois is not None and len(rois) > max_rois:
        raise EditedSetError(f"the structure set has {len(rois)} ROIs, more than qa.max_rois ({max_rois}); "
                             "it was not compared")
    try:
        ss = read_structure_set(ds)
    except NodeError as exc:
        raise EditedSetError(f"the structure set cannot be read: {exc}") from exc
    structures = []
    for roi in ss.rois:
        problems, closed = contour_problems(roi, grid.geometry)
        structures.append(Structure(roi.name, bundle, _filler(roi, grid) if closed else None, problems))
    return ss.label, structures


def _filler(roi: Roi, grid: Grid) -> Callable[[], np.ndarray]:
    """Rasterise ``roi`` on the CT when called (contours placed by their image, else by their plane)."""
    return lambda: rasterise(roi, grid.volume)


def _seg_side(ds: Dataset, grid: Grid, bundle: str) -> tuple[str, list[Structure]]:
    try:
        seg = read_segmentation(ds, grid.geometry, grid.sop_instance_uids)
    except NodeError as exc:
        raise EditedSetError(f"the segmentation cannot be read: {exc}") from exc
    return seg.label, [Structure(s.label, bundle, _held(s.mask)) for s in seg.segments]


def _held(mask: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: mask


def read_side(source: Path | Dataset, grid: Grid, *, bundle: str = "", max_rois: int | None = None,
              what: str = "the edited set") -> tuple[str, list[Structure]]:
    """The label and structures of an RTSTRUCT or SEG (a file or a dataset), to be placed on ``grid``."""
    ds = _read(source, what)
    name = source.name if isinstance(source, Path) else str(ds.get("SOPInstanceUID", "?"))
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == RT_STRUCTURE_SET_STORAGE:
        return _rtstruct_side(ds, grid, bundle, max_rois=max_rois)
    if sop_class == SEGMENTATION_STORAGE:
        return _seg_side(ds, grid, bundle)
    raise EditedSetError(f"{what} {name} is neither an RT Structure Set nor a Segmentation (SOP class "
                         f"{sop_class or 'missing'})")


def read_ours(results: Sequence[OurResult], grid: Grid, theirs: Sequence[Structure] = (),
              aliases: dict[str, str] | None = None) -> list[Structure]:
    """The node's structures for the CT, from each bundle's newest result (in job order).

    Where a bundle's result was written once per structure selection (a TPS sent 5 OARs, the PACS all 117),
    the one the edited set came from is the one most of ``theirs``' names match (through ``aliases``), then the
    one with the fewest structures the set does not carry; where no name matches, the largest. Comparing with
    another selection would call structures the clinician never received "deleted", or ones they did "added".
    """
    aliases = aliases or {}
    keys = {canonical(s.name, aliases) for s in theirs}
    structures: list[Structure] = []
    for result in results:
        best: tuple[int, int] | None = None
        chosen: list[Structure] = []
        for path in result.paths:
            _, found = read_side(path, grid, bundle=result.bundle, what=f"job {result.job_id}'s result")
            matches = sum(canonical(s.name, aliases) in keys for s in found)
            unmatched = len(found) - matches
            score = (matches, -unmatched) if matches else (0, len(found))
            if best is None or score > best:
                best, chosen = score, found
        structures.extend(chosen)
    return structures


def edited_bundles(ours: Sequence[Structure], theirs: Sequence[Structure], cfg: QaConfig) -> set[str]:
    """The bundles whose results the edited set derives from: those with a structure its ROI names match.

    Each bundle writes its own structure set; a clinician who edits one of them has not deleted the
    others' structures. When no name matches at all, every bundle is compared (all deleted, all added).
    """
    aliases = cfg.alias_table()
    keys = {canonical(s.name, aliases) for s in theirs}
    matched = {s.bundle for s in ours if canonical(s.name, aliases) in keys}
    return matched or {s.bundle for s in ours}


def _mask(structure: Structure, whose: str) -> tuple[np.ndarray | None, str]:
    """The structure's mask (None when it has nothing to fill) and, when it cannot be made, why."""
    if structure.make is None:
        return None, ""
    try:
        return structure.make(), ""
    except (NodeError, ValueError) as exc:
        return None, f"{whose} {structure.name!r} could not be placed on the CT: {exc}"


def compare_structures(ours: Sequence[Structure], theirs: Sequence[Structure], grid: Grid,
                       cfg: QaConfig) -> list[StructureQa]:
    """Pair the two sides by name and measure each pair; ours without a partner were deleted, theirs added."""
    spacing = grid.geometry.spacing
    pairing = pair_by_name([s.name for s in ours], [s.name for s in theirs], cfg.alias_table())
    by_ours = {s.name: s for s in reversed(ours)}
    by_theirs = {s.name: s for s in reversed(theirs)}
    out: list[StructureQa] = []
    for our_name, their_name in pairing.pairs:
        out.append(_pair(by_ours[our_name], by_theirs[their_name], spacing, cfg))
    for name in pairing.deleted:
        mask, error = _mask(by_ours[name], "our structure")
        ours_ml = None if mask is None else round(volume_ml(mask, spacing), 2)
        out.append(StructureQa(name, "", by_ours[name].bundle,
                               EditVerdict.NOT_COMPARED if error else EditVerdict.DELETED,
                               ours_ml=ours_ml, theirs_ml=0.0, change_ml=None if ours_ml is None else -ours_ml,
                               change_pct=None if ours_ml is None else -100.0,
                               removed_slices=0 if mask is None else int(mask.any(axis=(1, 2)).sum()), note=error))
    for name in pairing.added:
        structure = by_theirs[name]
        mask, error = _mask(structure, "their ROI")
        notes = [*structure.problems, error]
        if mask is None or not mask.any():
            if structure.problems or error:  # something was drawn, but nothing could be filled
                out.append(StructureQa(name, name, "", EditVerdict.NOT_COMPARED, note="; ".join(filter(None, notes))))
            continue  # an empty ROI (planning systems keep placeholders): nothing was added
        theirs_ml = round(volume_ml(mask, spacing), 2)
        out.append(StructureQa(name, name, "", EditVerdict.ADDED, ours_ml=0.0, theirs_ml=theirs_ml,
                               change_ml=theirs_ml, added_slices=int(mask.any(axis=(1, 2)).sum()),
                               note="; ".join(filter(None, notes))))
    return out


def _pair(ours: Structure, theirs: Structure, spacing: tuple[float, float, float], cfg: QaConfig) -> StructureQa:
    our_mask, our_error = _mask(ours, "our structure")
    their_mask, their_error = _mask(theirs, "their ROI")
    notes = [*theirs.problems, our_error, their_error]
    note = "; ".join(filter(None, notes))
    if our_error or their_error or our_mask is None or (their_mask is None and theirs.problems):
        why = note or f"their ROI {theirs.name!r} has no closed contour"
        return StructureQa(ours.name, theirs.name, ours.bundle, EditVerdict.NOT_COMPARED, note=why)
    ours_ml = round(volume_ml(our_mask, spacing), 2)
    if their_mask is None or not their_mask.any():  # the ROI is there, emptied
        return StructureQa(ours.name, theirs.name, ours.bundle, EditVerdict.DELETED, ours_ml=ours_ml, theirs_ml=0.0,
                           change_ml=-ours_ml, change_pct=-100.0,
                           removed_slices=int(our_mask.any(axis=(1, 2)).sum()), note=note)
    if not our_mask.any():
        return StructureQa(ours.name, theirs.name, ours.bundle, EditVerdict.NOT_COMPARED,
                           note=f"our structure {ours.name!r} is empty on this CT")
    m = overlap(our_mask, their_mask, spacing)
    del our_mask, their_mask
    change = m.theirs_ml - m.ours_ml
    return StructureQa(
        name=ours.name, their_name=theirs.name, bundle=ours.bundle, verdict=judge(m, cfg),
        dice=round(m.dice, 4), surface_dice_1mm=round(m.surface_dice_1mm, 4),
        surface_dice_2mm=round(m.surface_dice_2mm, 4), hd95_mm=round(m.hd95_mm, 2), msd_mm=round(m.msd_mm, 3),
        ours_ml=round(m.ours_ml, 2), theirs_ml=round(m.theirs_ml, 2), change_ml=round(change, 2),
        change_pct=round(100.0 * change / m.ours_ml, 2) if m.ours_ml else None,
        added_slices=m.added_slices, removed_slices=m.removed_slices, note=note,
    )
