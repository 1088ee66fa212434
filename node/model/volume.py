"""A series' voxels and where they are in the patient: the types every stage after assembly shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class Geometry:
    """Voxel (k, i, j) = (slice, row, column) → patient position in mm (LPS).

    position = origin + k*slice_step + i*spacing[1]*col_dir + j*spacing[2]*row_dir
    where row_dir is IOP[0:3] (along a row, increasing column index) and col_dir IOP[3:6].
    ``slice_step`` is the vector from one slice's ImagePositionPatient to the next: along the normal
    for an ordinary stack, with an in-plane component for gantry-tilted CT, whose image planes are
    tilted while the table moves along z (a sheared stack). ``spacing[0]`` is the distance between
    slice planes (along the normal), which is what resampling and voxel volumes use.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    slice_step: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Map (..., 3) arrays of (k, i, j) voxel coordinates (may be fractional) to LPS mm."""
        kij = np.asarray(kij, dtype=np.float64)
        return (
            self.origin
            + kij[..., 0:1] * self.slice_step
            + kij[..., 1:2] * self.spacing[1] * self.col_dir
            + kij[..., 2:3] * self.spacing[2] * self.row_dir
        )

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + k * self.slice_step

    @property
    def is_sheared(self) -> bool:
        """True for gantry-tilted stacks (slices offset within their plane from one to the next)."""
        lateral = self.slice_step - (self.slice_step @ self.normal) * self.normal
        return bool(np.linalg.norm(lateral) > 1e-3)


@dataclass
class Volume:
    """A series' pixels in Hounsfield units (or the modality's rescaled unit), in slice order."""

    #: (slices, rows, columns): int16 when every rescaled value is an integer that fits (CT in HU:
    #: half the memory of float32), else float32. Consumers that compute take float32 copies of what they need.
    voxels: np.ndarray
    geometry: Geometry
    headers: list[Dataset]  # per slice, pixel data removed, same order as voxels

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]
