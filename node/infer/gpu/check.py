"""A freshly built plan is compared with ONNX Runtime before the node uses it.

Reduced precision and TensorRT's tactic choices change a network's numbers; the bundle states how
far they may move (``[gpu] max_abs_difference``, ``min_dice``). After each build the plan and ONNX
Runtime run the same deterministic input (smooth structures plus noise in the normalised intensity
range); a plan outside the bundle's tolerance is deleted and the bundle runs on the CPU, with the
figures in the reason. Done once per build, not per start (a cached plan passed when it was built).
"""

from __future__ import annotations

import numpy as np

from node.errors import InferenceError
from node.infer.engine import Engine
from node.model.bundle import Bundle
from node.model.enums import IntensityScheme

#: A clip bound this large means "no clip" (an imported nnU-Net model without normalisation writes ±1e6).
UNBOUNDED = 1e5
#: What the check feeds in place of an unbounded clip: the 12-bit CT range, HU (±1e6 would overflow FP16's
#: 65504 in the first layer and no series holds such values).
CT_RANGE = (-1024.0, 3071.0)
#: What the check feeds a network whose input is z-scored per image: four standard deviations either side.
ZSCORE_RANGE = (-4.0, 4.0)


def input_range(bundle: Bundle) -> tuple[float, float]:
    """The (low, high) network input the bundle's preprocessing produces, as the check feeds it."""
    pre = bundle.preprocess
    if pre.normalisation is not IntensityScheme.FIXED:
        return ZSCORE_RANGE
    low = CT_RANGE[0] if pre.clip[0] <= -UNBOUNDED else pre.clip[0]
    high = CT_RANGE[1] if pre.clip[1] >= UNBOUNDED else pre.clip[1]
    a, b = sorted(((low + pre.offset) * pre.scale, (high + pre.offset) * pre.scale))
    return a, b


def check_input(bundle: Bundle, batch: int = 1) -> np.ndarray:
    """(batch, 1, *tile) float32: blobs and a gradient in the bundle's normalised range, plus noise."""
    spatial = bundle.window.network_input
    lo, hi = input_range(bundle)
    rng = np.random.default_rng(20261124)
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in spatial], indexing="ij")
    out = np.empty((batch, 1, *spatial), dtype=np.float32)
    for b in range(batch):
        centre = rng.uniform(-0.4, 0.4, size=3)
        radius = rng.uniform(0.3, 0.6)
        blob = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=False)) < radius**2
        field = 0.5 * (1 + grids[0] * rng.uniform(-0.5, 0.5)) + 0.4 * blob
        noisy = field + rng.normal(0.0, 0.05, size=field.shape)
        out[b, 0] = lo + (hi - lo) * np.clip(noisy, 0.0, 1.0)
    return out


def agreement(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> tuple[float, float]:
    """(largest |difference|, Dice of the masks > threshold; 1.0 when both are empty), as
    :func:`node.infer.gpu.mixed_precision.precision_agreement` measures them; a non-finite value in
    ``candidate`` is the worst disagreement there is."""
    from node.infer.gpu.mixed_precision import precision_agreement

    if reference.shape != candidate.shape:
        raise InferenceError(f"outputs of shapes {reference.shape} and {candidate.shape} cannot be compared")
    measured = precision_agreement(reference, candidate, threshold)
    if measured["nonfinite"]:
        return float("inf"), 0.0
    return measured["max_abs_diff"], measured["dice"]


def verify_against_reference(bundle: Bundle, plan_engine: Engine, reference: Engine, label: str) -> str:
    """Raise InferenceError when ``plan_engine`` is outside the bundle's tolerance; else a summary."""
    tiles = check_input(bundle)
    worst, dice = agreement(reference.run(tiles), plan_engine.run(tiles), bundle.postprocess.threshold)
    limits = bundle.gpu
    summary = f"max |Δ| {worst:.4f} (≤ {limits.max_abs_difference}), Dice {dice:.4f} (≥ {limits.min_dice})"
    if worst > limits.max_abs_difference or dice < limits.min_dice:
        raise InferenceError(f"the {label} plan of bundle {bundle.name} disagrees with ONNX Runtime: {summary}")
    return summary
