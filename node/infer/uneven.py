"""A network bundle on an unevenly spaced stack (``[preprocess] uneven_slices = "resample"``).

A network runs on a regular grid. A bundle that resamples every series to its own ``spacing_mm``
anyway (the liver U-Net goes to 1.5 mm, then 3 mm) loses nothing honest by first resampling an uneven
stack along the slices to a regular one: the stack is interpolated linearly between its real slice
positions onto evenly spaced planes at most the bundle's finest spacing apart, from the first slice
to the last, segmented there exactly like an even series (coverage, crop, network, post-processing),
and each real slice takes the labels of the regular plane nearest to it (at most half that spacing
away). Slices, positions and UIDs of the result are the source's own; only the network's input was
resampled. Coverage is judged on the real stack before (``node.infer.coverage``: the widest real gap
against the bundle's slice spacing limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from node.errors import Declined
from node.infer.engine import Engine
from node.infer.transforms import resample_slices_at
from node.model.bundle import Bundle
from node.model.volume import Geometry, Volume

Segmenter = Callable[[Volume, Bundle, "Engine | None"], np.ndarray]

#: Largest regular grid built (as float32, ≈ 2.4 GiB); the same bound as assembling a series.
MAX_REGULAR_VOXELS = 600_000_000


def regular_spacing(bundle: Bundle) -> float:
    """The finest spacing the bundle's preprocessing resamples to (no coarser plane spacing is useful)."""
    pre = bundle.preprocess
    spacings = [s for grid in (pre.spacing_mm, pre.intermediate_spacing_mm) if grid for s in grid]
    if not spacings:
        raise Declined(f"{bundle.name} runs on the native grid, so it cannot resample an uneven stack")
    return min(spacings)


def regularise(volume: Volume, spacing_mm: float, name: str = "the bundle") -> tuple[Volume, np.ndarray]:
    """(``volume`` resampled along the slices onto evenly spaced planes at most ``spacing_mm`` apart,
    each real slice's index on that grid)."""
    g = volume.geometry
    assert g.positions is not None, "only an uneven stack is regularised"
    along = g.along_normal()
    span = float(along[-1])
    n = max(2, math.ceil(span / spacing_mm - 1e-6) + 1)
    if n * g.shape[1] * g.shape[2] > MAX_REGULAR_VOXELS:
        raise Declined(f"{name}: this series resampled to {span / (n - 1):.2f} mm would be {n} slices of "
                       f"{g.shape[1]}×{g.shape[2]}, more than the node builds")
    targets = np.linspace(0.0, span, n)
    voxels = resample_slices_at(volume.voxels, along, targets)
    step = (g.positions[-1] - g.positions[0]) / (n - 1)
    geometry = Geometry(origin=np.asarray(g.positions[0], dtype=np.float64), row_dir=g.row_dir, col_dir=g.col_dir,
                        normal=g.normal, slice_step=step, spacing=(span / (n - 1), g.spacing[1], g.spacing[2]),
                        shape=(n, g.shape[1], g.shape[2]))
    nearest = np.clip(np.rint(along / (span / (n - 1))).astype(np.int64), 0, n - 1)
    return Volume(voxels=voxels, geometry=geometry, headers=[]), nearest


def segment_uneven(volume: Volume, bundle: Bundle, engine: Engine | None, segment: Segmenter) -> np.ndarray:
    """Labels on ``volume``'s own (uneven) slices from ``bundle`` run by ``segment`` (the whole infer
    stage: node.infer.segment.segment_volume) on the regularised stack."""
    regular, nearest = regularise(volume, regular_spacing(bundle), bundle.name)
    labels = segment(regular, bundle, engine)
    return np.ascontiguousarray(labels[nearest])
