"""The writer's check of its contours: per ROI, how many contours, holes and tiny parts it holds.

A planning system shows every contour of an ROI; an External of thousands of specks and nested holes
is what issue 16 saw on a real chest CT. After cleaning (node/write/clean.py) an ROI should hold one
outer contour per part and slice, no hole its rule does not keep and nothing tiny; this check counts
what the RTSTRUCT really holds, so the job record and the log say so, and a departure is seen.

A contour's area here is what its traced outline encloses plus the half pixel its chamfered corners
cut (``Contours.areas_px``): the pixel area the cleaning rules measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.model.bundle import Bundle, Label
from node.model.volume import Geometry
from node.write.contours import Contours


@dataclass(frozen=True)
class RoiCheck:
    """What one ROI of an RTSTRUCT holds."""

    name: str
    contours: int  # every contour, outer and inner
    holes: int  # inner contours (holes in a part)
    tiny: int  # parts under the ROI's min_island_mm2, holes under its min_hole_mm2
    slices: int  # slices with at least one contour

    def describe(self) -> str:
        return f"{self.name} {self.contours} on {self.slices} slices, {self.holes} holes, {self.tiny} tiny"


def check_roi(label: Label, contours: Contours, bundle: Bundle, geometry: Geometry) -> RoiCheck:
    """Count the contours, holes and tiny parts of one ROI's traced contours."""
    rule = bundle.contours.rule(label)
    _, dy, dx = geometry.spacing
    areas_mm2 = (np.abs(contours.areas_px) + 0.5) * abs(dy * dx)
    hole = contours.areas_px < 0
    tiny = np.where(hole, areas_mm2 < rule.min_hole_mm2, areas_mm2 < rule.min_island_mm2)
    return RoiCheck(label.name, len(contours), int(np.count_nonzero(hole)), int(np.count_nonzero(tiny)),
                    int(np.unique(contours.slices).size))


def check_contours(found: list[Label], traced: list[Contours], bundle: Bundle, geometry: Geometry) -> list[RoiCheck]:
    """:func:`check_roi` of each ROI, in ``found`` order."""
    return [check_roi(label, contours, bundle, geometry) for label, contours in zip(found, traced, strict=True)]


def describe(checks: list[RoiCheck] | tuple[RoiCheck, ...]) -> str:
    """One line for the job note and the log: ``BODY 275 on 275 slices, 0 holes, 0 tiny; Lung_L …``."""
    return "; ".join(check.describe() for check in checks)
