"""The Engine protocol: a model that maps a batch of tiles to per-class probabilities.

Backends take and return numpy arrays only (never Datasets). Heavy libraries are imported lazily
inside each backend, and ``backend_status()`` says whether one can run here and, if not, what to
install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Engine(Protocol):
    """Runs one model. ``run`` takes (N, 1, D, H, W) float32 and returns (N, K, D, H, W) float32."""

    name: str

    def run(self, tiles: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # the version when available, else what is missing and how to install it


def device_pipeline(engine: Engine | None) -> Any:
    """The engine's GPU-resident pre/post-processing (node.infer.gpu.resident.ResidentPipeline) when it has
    one that works here, else None (ONNX Runtime engines have none)."""
    make = getattr(engine, "resident_pipeline", None)
    return make() if make is not None else None
