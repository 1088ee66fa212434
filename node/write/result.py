"""What every writer takes: one job's labels on the image grid, and what they mean."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.errors import WriteError
from node.model.bundle import Bundle, Label
from node.model.volume import Volume
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

    def mask(self, label: Label) -> np.ndarray:
        """Boolean mask of one structure on the image grid (overlapping structures included)."""
        return label_mask(self.labels, label)

    @classmethod
    def of(cls, volume: Volume, labels: np.ndarray, bundle: Bundle, uids: ResultUids,
           provenance: Provenance) -> Result:
        return cls(volume, labels, bundle, present_labels(labels, bundle), uids, provenance)
