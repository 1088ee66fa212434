"""Where the slices of a series lie: their order along the normal, and whether they form one stack.

A stack is evenly spaced (every gap within ``SPACING_TOLERANCE`` of the median), or uneven: a real
protocol may change its spacing along the series (a GE head: 4 mm slices through the skull base,
one 1.08 mm gap, 7 mm slices above). An uneven stack is still one stack when its slices lie on one
line and no gap is a hole: a gap a whole number of times (≥ 2) the larger of its neighbouring gaps
is slices missing (the series arrived incomplete), a gap more than ``MAX_GAP_RATIO`` times it is
two stacks in one series; both are refused, as are duplicate positions and in-plane steps that are
not regular. Built-in bundles that work slice by slice segment an uneven stack as it is; a network
bundle resamples it or declines it, as its manifest says (``node.infer.uneven``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.errors import VolumeError

#: Slice spacing may vary by this fraction of the median and the stack is still evenly spaced; a
#: gap within this fraction of a whole multiple of its neighbours' is slices missing.
SPACING_TOLERANCE = 0.1
#: A gap more than this many times the larger of its neighbouring gaps separates two stacks.
MAX_GAP_RATIO = 3.0


@dataclass(frozen=True)
class Stack:
    """The slices in order along the normal, and how they step."""

    order: np.ndarray  # indices into the given positions, in slice order
    positions: np.ndarray  # (n, 3) ImagePositionPatient in slice order
    step: np.ndarray  # the step from one slice to the next (the mean step of an uneven stack)
    spacing: float  # distance between slice planes (the mean distance of an uneven stack)
    uniform: bool


def stack_of(positions: np.ndarray, normal: np.ndarray, uids: Sequence[str]) -> Stack:
    """Sort ``positions`` (n ≥ 2, one per instance named by ``uids``) along ``normal`` and check that
    they form one stack; :class:`VolumeError` naming the slices and the gap otherwise."""
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    placed = positions[order]
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        a, b = uids[order[dup[0]]], uids[order[dup[0] + 1]]
        raise VolumeError(
            f"instances {a} and {b} share the position {along[dup[0]]:.2f} mm along the slice normal; "
            "duplicate slices cannot form a volume"
        )
    median = float(np.median(steps))
    vectors = np.diff(placed, axis=0)
    if np.all(np.abs(steps - median) <= SPACING_TOLERANCE * median):
        # The step from slice to slice must be the same vector throughout. Along the normal for an
        # ordinary stack; gantry tilt adds a constant in-plane component (a sheared stack).
        slice_step = np.median(vectors, axis=0)
        deviation = np.linalg.norm(vectors - slice_step, axis=1)
        if deviation.max() > SPACING_TOLERANCE * np.linalg.norm(slice_step) + 1e-3:
            k = int(np.argmax(deviation))
            raise VolumeError(
                f"slice positions do not form a regular stack: the step from slice {k} to {k + 1} is "
                f"{np.round(vectors[k], 2).tolist()} mm where the series mostly steps "
                f"{np.round(slice_step, 2).tolist()} mm"
            )
        return Stack(order=order, positions=placed, step=slice_step, spacing=median, uniform=True)
    _check_holes(steps, along)
    # Uneven: every slice on the line from the first to the last (a constant direction of travel).
    line = placed[-1] - placed[0]
    line = line / np.linalg.norm(line)
    lateral = np.linalg.norm(vectors - (vectors @ line)[:, None] * line, axis=1)
    bad = np.flatnonzero(lateral > SPACING_TOLERANCE * np.linalg.norm(vectors, axis=1) + 1e-3)
    if bad.size:
        k = int(bad[0])
        raise VolumeError(
            f"slice positions do not form a regular stack: the step from slice {k} to {k + 1} is "
            f"{np.round(vectors[k], 2).tolist()} mm, {lateral[k]:.2f} mm off the line through the first and last "
            "slices"
        )
    n = len(placed)
    return Stack(order=order, positions=placed, step=(placed[-1] - placed[0]) / (n - 1),
                 spacing=float(along[-1] - along[0]) / (n - 1), uniform=False)


def _check_holes(steps: np.ndarray, along: np.ndarray) -> None:
    """Refuse a gap that is slices missing or the space between two stacks (see the module's text)."""
    for k, gap in enumerate(float(g) for g in steps):
        neighbours = [float(steps[j]) for j in (k - 1, k + 1) if 0 <= j < len(steps)]
        if not neighbours:
            continue
        ref = max(neighbours)
        whole = round(gap / ref)
        where = f"{gap:.2f} mm between slices {k} and {k + 1} (at {along[k] - along[0]:.1f} mm along the normal)"
        if whole >= 2 and abs(gap - whole * ref) <= SPACING_TOLERANCE * ref:
            raise VolumeError(
                f"slice spacing is not uniform: {where} where the neighbouring slices are {ref:.2f} mm apart; "
                f"slices are missing ({whole - 1} between them)"
            )
        if gap > MAX_GAP_RATIO * ref:
            raise VolumeError(
                f"slice positions do not form one stack: a gap of {where}, more than {MAX_GAP_RATIO:g} times the "
                f"{ref:.2f} mm between the neighbouring slices; the series holds separate stacks or slices are "
                "missing"
            )
