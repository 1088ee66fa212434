"""Reorienting a volume's (slice, row, column) array to the patient directions a model was trained in.

A model trained on, say, axial CT in "SAR" order (axis 0 inferior→superior, 1 posterior→anterior,
2 patient left→right) must see every series that way, whatever the scanner's slice order, patient
position (head/feet first, supine/prone) or in-plane orientation. A :class:`Reorientation` is a
transpose and flips of the array (no resampling): each target axis takes the array axis that points
most nearly along it, and the labels go back through :meth:`Reorientation.undo`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from node.model.volume import Geometry

#: Unit vector in DICOM patient coordinates (LPS: +x left, +y posterior, +z superior) of each direction.
DIRECTIONS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}


def array_axes(geometry: Geometry) -> np.ndarray:
    """(3, 3) LPS unit vectors of array axes 0 (slice), 1 (row index) and 2 (column index)."""
    step = geometry.slice_step
    normal = geometry.normal if float(step @ geometry.normal) >= 0 else -geometry.normal
    return np.stack([normal, geometry.col_dir, geometry.row_dir])


@dataclass(frozen=True)
class Reorientation:
    """Target axis t is array axis ``permutation[t]``, reversed where ``flips[t]``."""

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    #: Largest angle, in degrees, between a target direction and the array axis that stands for it.
    obliquity_deg: float

    def _flip_index(self) -> tuple[slice, ...]:
        return tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The array in the target orientation (a view: no copy)."""
        return np.transpose(array, self.permutation)[self._flip_index()]

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Back from the target orientation to the acquisition's (slice, row, column) order."""
        inverse = tuple(int(i) for i in np.argsort(self.permutation))
        return np.transpose(array[self._flip_index()], inverse)

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        return (spacing[self.permutation[0]], spacing[self.permutation[1]], spacing[self.permutation[2]])

    def shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return (shape[self.permutation[0]], shape[self.permutation[1]], shape[self.permutation[2]])


def reorientation(geometry: Geometry, code: str) -> Reorientation:
    """How to bring ``geometry``'s array into the orientation ``code`` (e.g. ``"SAR"``)."""
    axes = array_axes(geometry)
    targets = np.array([DIRECTIONS[c] for c in code])
    cosines = targets @ axes.T  # [target, array axis]
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(cosines[t, p[t]]) for t in range(3)))
    flips = tuple(bool(cosines[t, best[t]] < 0) for t in range(3))
    worst = min(abs(float(cosines[t, best[t]])) for t in range(3))
    angle = math.degrees(math.acos(min(1.0, worst)))
    return Reorientation(permutation=best, flips=flips, obliquity_deg=angle)  # type: ignore[arg-type]


def normal_angle_to(geometry: Geometry, direction: str) -> float:
    """Degrees between the slice normal and the patient axis of ``direction`` (0 = slices ⟂ that axis)."""
    cosine = abs(float(np.dot(geometry.normal, DIRECTIONS[direction])))
    return math.degrees(math.acos(min(1.0, cosine)))
