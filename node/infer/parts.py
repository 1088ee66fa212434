"""Bundles of several networks (``[model] kind = "parts"``): one engine per part, one label map.

Every part is a complete single-network bundle (node.model.bundle.Part), so each part's engine is made,
cached and checked by the same loader and backends as any other bundle's. :class:`PartsEngine` only holds
them together; the combination is the bundle's ``combine``:

- ``overlay``: each part runs on the whole volume through the ordinary single-network path; its classes
  are mapped to the bundle's label values and written into one label map, a later part overwriting an
  earlier one where it found something (the order TotalSegmentator merges the parts of ``total`` in). Each
  part's probabilities are reduced to labels before the next part runs, so the memory is one part's.
- ``deepbet``: node.infer.brain runs a locator network, then the brain network inside its box.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from node.errors import BundleError
from node.infer.engine import Engine
from node.model.bundle import Bundle
from node.model.enums import PartsCombine
from node.model.volume import Volume

log = logging.getLogger(__name__)

#: segment_volume's signature: (volume, single-network bundle, its engine) → labels on the volume's grid.
SegmentOne = Callable[[Volume, Bundle, Engine | None], np.ndarray]


@dataclass
class PartsEngine:
    """The engines of a parts bundle's networks, by part name. Not itself a network: ``run`` refuses."""

    name: str
    parts: dict[str, Engine]

    def run(self, tiles: np.ndarray) -> np.ndarray:
        raise BundleError(f"{self.name} is a bundle of several networks ({', '.join(self.parts)}); "
                          "run one of its parts' engines")

    def close(self) -> None:
        """Nothing: the loader owns and closes each part's engine."""


def part_engines(bundle: Bundle, engine: Engine | None) -> dict[str, Engine]:
    """``engine``'s engine per part, checked against ``bundle``'s parts."""
    engines = getattr(engine, "parts", None)
    if not isinstance(engines, dict) or set(engines) != {part.name for part in bundle.parts}:
        raise BundleError(f"bundle {bundle.name} has parts {[p.name for p in bundle.parts]} and needs an engine "
                          f"for each; got {engine!r}")
    return engines


def overlay_parts(volume: Volume, bundle: Bundle, engines: dict[str, Engine], segment_one: SegmentOne) -> np.ndarray:
    """Each part on the whole volume, its classes mapped to the bundle's values, later parts on top."""
    labels = np.zeros(volume.geometry.shape, dtype=np.uint8)
    for part in bundle.parts:
        mapped = part.lookup()[segment_one(volume, part.bundle, engines[part.name])]
        found = mapped > 0
        labels[found] = mapped[found]
        log.debug("%s: part %s labelled %d voxels", bundle.name, part.name, int(found.sum()))
        del mapped, found
    return labels


def segment_parts(volume: Volume, bundle: Bundle, engine: Engine | None, segment_one: SegmentOne) -> np.ndarray:
    """A parts bundle's label map (before the bundle's own post-processing)."""
    engines = part_engines(bundle, engine)
    if bundle.combine is PartsCombine.DEEPBET:
        from node.infer.brain import segment_brain

        labels: np.ndarray = segment_brain(volume, bundle, engines)
        return labels
    return overlay_parts(volume, bundle, engines, segment_one)
