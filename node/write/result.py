"""What every writer takes: one job's labels on the image grid, and what they mean."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from node.errors import WriteError
from node.model.bundle import Bundle, Label
from node.model.volume import Volume
from node.write.contours import Box, Outlines, label_boxes
from node.write.provenance import Provenance
from node.write.uids import ResultUids


def present_labels(labels: np.ndarray, bundle: Bundle) -> list[Label]:
    """The bundle's labels that occur in ``labels`` (themselves or a label they include), in manifest order."""
    counts = np.bincount(labels.ravel(), minlength=256)
    return [label for label in bundle.labels if counts[[label.value, *label.includes]].sum() > 0]


def label_mask(labels: np.ndarray, label: Label) -> np.ndarray:
    """Boolean mask of ``label``: its own voxels and those of the labels it includes (BODY ⊃ lungs)."""
    if not label.includes:
        return labels == label.value
    return np.isin(labels, (label.value, *label.includes))


@dataclass(frozen=True)
class Result:
    """A label volume on ``volume``'s grid with at least one of ``bundle``'s structures in it.

    ``found`` lists the structures present, in manifest order; their position in it is their
    segment number (SEG) and ROI number (RTSTRUCT), starting at 1.
    """

    volume: Volume
    labels: np.ndarray
    bundle: Bundle
    found: list[Label]
    uids: ResultUids
    provenance: Provenance
    #: The site's RTSTRUCT ROI renames ([output.roi_names]): a structure's ROI name or label name → the site's name.
    roi_names: tuple[tuple[str, str], ...] = ()
    #: Outlines the cleaning traced that still hold for ``labels``, by label value (node/write/clean.py): the
    #: RTSTRUCT uses them instead of tracing those structures again.
    outlines: dict[int, Outlines] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.labels.shape != self.volume.voxels.shape:
            raise WriteError(
                f"label volume shape {self.labels.shape} differs from the image volume {self.volume.voxels.shape}"
            )
        if not self.found:
            raise WriteError("no structure was found, so there is nothing to write")

    @property
    def overlapping(self) -> bool:
        """True when some structure includes another's voxels (segments overlap)."""
        return any(label.includes for label in self.found)

    def roi_name(self, label: Label) -> str:
        """The RTSTRUCT ROI Name of ``label``: the site's rename of its ROI name or of its label name, else its ROI
        name (``Label.roi_name``, else its label name). The SEG keeps the label name and the coded meaning."""
        renames = dict(self.roi_names)
        return renames.get(label.structure_set_name) or renames.get(label.name) or label.structure_set_name

    @cached_property
    def boxes(self) -> dict[int, Box]:
        """The bounding box of each label value present (node.write.contours.label_boxes), found once for
        both writers: they trace and pack each structure within its box."""
        return label_boxes(self.labels)

    def mask(self, label: Label) -> np.ndarray:
        """Boolean mask of one structure on the image grid (overlapping structures included)."""
        return label_mask(self.labels, label)

    @classmethod
    def of(cls, volume: Volume, labels: np.ndarray, bundle: Bundle, uids: ResultUids,
           provenance: Provenance, roi_names: tuple[tuple[str, str], ...] = (),
           outlines: dict[int, Outlines] | None = None) -> Result:
        return cls(volume, labels, bundle, present_labels(labels, bundle), uids, provenance, roi_names,
                   outlines or {})
