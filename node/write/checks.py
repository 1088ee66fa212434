"""Preconditions every writer shares."""

from __future__ import annotations

import numpy as np

from node.assemble.volume import Volume
from node.errors import WriteError
from node.infer.bundle import Label


def require_result(volume: Volume, labels: np.ndarray, found: list[Label]) -> None:
    """A label volume on the image grid, with at least one structure in it."""
    if labels.shape != volume.voxels.shape:
        raise WriteError(f"label volume shape {labels.shape} differs from the image volume {volume.voxels.shape}")
    if not found:
        raise WriteError("no structure was found, so there is nothing to write")
