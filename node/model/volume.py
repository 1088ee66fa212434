"""A series' voxels and where they are in the patient: the types every stage after assembly shares."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

#: Two gaps between slices are "the same" when they differ by at most this many mm or this fraction
#: of the gap, whichever is larger (headers round positions to a few decimals).
GAP_SAME_MM = 0.02
GAP_SAME_FRACTION = 0.01


class MixedFrames(enum.StrEnum):
    """``[assemble] mixed_frames_of_reference``: a series whose instances carry several
    FrameOfReferenceUIDs but form one regular stack."""

    SEGMENT = "segment"  # segment it; the results carry one of the UIDs, the rule and the choice noted
    DECLINE = "decline"  # decline every job of the series, with the reason


class UnevenSlices(enum.StrEnum):
    """``[preprocess] uneven_slices`` of a network bundle: what it does with a stack whose slices are
    not evenly spaced (built-in, slice-by-slice bundles always segment one)."""

    DECLINE = "decline"  # declined, with the gaps in the reason (the default: a network runs on a regular grid)
    RESAMPLE = "resample"  # resampled along the slices to a regular grid first (for networks that resample anyway)


@dataclass(frozen=True)
class Geometry:
    """Voxel (k, i, j) = (slice, row, column) → patient position in mm (LPS).

    position = origin + k*slice_step + i*spacing[1]*col_dir + j*spacing[2]*row_dir
    where row_dir is IOP[0:3] (along a row, increasing column index) and col_dir IOP[3:6].
    ``slice_step`` is the vector from one slice's ImagePositionPatient to the next: along the normal
    for an ordinary stack, with an in-plane component for gantry-tilted CT, whose image planes are
    tilted while the table moves along z (a sheared stack). ``spacing[0]`` is the distance between
    slice planes (along the normal), which is what resampling and voxel volumes use.

    A stack whose slices are not evenly spaced (a head protocol of 4 mm slices then 7 mm slices)
    carries every slice's ImagePositionPatient in ``positions``: ``k`` then indexes those (piecewise
    linearly between them for a fractional ``k``), and ``slice_step`` and ``spacing[0]`` are the mean
    step and mean distance, which only rules that work slice by slice or approximately may use.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    slice_step: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    #: (slices, 3) ImagePositionPatient of every slice when they are not evenly spaced; None for a regular stack.
    positions: np.ndarray | None = None

    @property
    def is_uniform(self) -> bool:
        """True when the slices are evenly spaced (``k`` maps linearly to the patient)."""
        return self.positions is None

    def _slice_origins(self, k: np.ndarray) -> np.ndarray:
        """(..., 1) slice coordinates → (..., 3) position of that (fractional) slice's first voxel."""
        if self.positions is None:
            return self.origin + k * self.slice_step
        p = self.positions
        lo = np.clip(np.floor(k), 0, len(p) - 2).astype(np.int64)
        w = k - lo
        return p[lo[..., 0]] * (1.0 - w) + p[lo[..., 0] + 1] * w

    def to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Map (..., 3) arrays of (k, i, j) voxel coordinates (may be fractional) to LPS mm."""
        kij = np.asarray(kij, dtype=np.float64)
        return (
            self._slice_origins(kij[..., 0:1])
            + kij[..., 1:2] * self.spacing[1] * self.col_dir
            + kij[..., 2:3] * self.spacing[2] * self.row_dir
        )

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        if self.positions is not None:
            return np.asarray(self.positions[k], dtype=np.float64)
        return self.origin + k * self.slice_step

    def along_normal(self) -> np.ndarray:
        """Each slice's distance from the first along the normal, mm (increasing)."""
        if self.positions is None:
            return np.arange(self.shape[0], dtype=np.float64) * self.spacing[0]
        return (self.positions - self.positions[0]) @ self.normal

    def gaps(self) -> np.ndarray:
        """The distances between neighbouring slice planes, mm (``slices − 1`` of them)."""
        return np.diff(self.along_normal())

    def slice_thicknesses(self) -> np.ndarray:
        """The slab each slice stands for along the normal (half the gap to each neighbour; an end slice
        its one gap), mm: what a voxel's volume uses on an uneven stack. The spacing for a regular one."""
        gaps = self.gaps()
        if self.positions is None or gaps.size == 0:
            return np.full(self.shape[0], self.spacing[0], dtype=np.float64)
        padded = np.concatenate([gaps[:1], gaps, gaps[-1:]])
        return (padded[:-1] + padded[1:]) / 2.0

    def gap_summary(self) -> str:
        """The gaps grouped by size, most frequent first: "13 gaps of 4.0 mm, 13 of 7.0 mm, 1 of 1.08 mm"."""
        return describe_gaps(self.gaps())

    @property
    def is_sheared(self) -> bool:
        """True for gantry-tilted stacks (slices offset within their plane from one to the next)."""
        lateral = self.slice_step - (self.slice_step @ self.normal) * self.normal
        return bool(np.linalg.norm(lateral) > 1e-3)


def describe_gaps(gaps: np.ndarray) -> str:
    """Group gaps of (nearly) the same size, in order of count (ties: first seen first), as a phrase."""
    groups: list[list[float]] = []
    for gap in (float(g) for g in gaps):
        for group in groups:
            if abs(gap - group[0]) <= max(GAP_SAME_MM, GAP_SAME_FRACTION * group[0]):
                group.append(gap)
                break
        else:
            groups.append([gap])
    ranked = sorted(groups, key=lambda g: -len(g))  # stable: ties stay in the order first seen
    parts = []
    for n, group in enumerate(ranked):
        text = f"{float(np.median(group)):.2f}".rstrip("0")
        text += "0" if text.endswith(".") else ""
        count = len(group)
        parts.append(f"{count} gap{'s' if count > 1 else ''} of {text} mm" if n == 0 else f"{count} of {text} mm")
    return ", ".join(parts)


@dataclass
class Volume:
    """A series' pixels in Hounsfield units (or the modality's rescaled unit), in slice order."""

    #: (slices, rows, columns): int16 when every rescaled value is an integer that fits (CT in HU:
    #: half the memory of float32), else float32. Consumers that compute take float32 copies of what they need.
    voxels: np.ndarray
    geometry: Geometry
    headers: list[Dataset]  # per slice, pixel data removed, same order as voxels
    #: What the user should know about how the volume was formed (a frame of reference chosen among
    #: several): each a sentence, carried into the job's note and the log.
    notes: list[str] = field(default_factory=list)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]
