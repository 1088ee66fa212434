"""Constants the writer tests share: the bundled body model, a fixed provenance, three orientations."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from node.infer.manifest import discover_bundles
from node.write.provenance import Provenance

BUNDLE = discover_bundles(Path(__file__).resolve().parents[2] / "engines", ("body-threshold",))[0]
PROV = Provenance(created=dt.datetime(2026, 1, 2, 3, 4, 5))
ORIENTATIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "tilted": (1, 0, 0, 0, float(np.cos(np.deg2rad(17))), float(-np.sin(np.deg2rad(17)))),
    "sagittal": (0, 1, 0, 0, 0, -1),
}
