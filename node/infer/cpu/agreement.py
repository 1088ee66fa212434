"""A freshly compiled BF16 model is compared with ONNX Runtime FP32 before the node uses it.

The same check as the TensorRT plans' (node/infer/gpu/check.py: the same deterministic input, the same
measures), against the bundle's ``[cpu]`` tolerances (``max_abs_difference``, ``min_dice``; the
``[gpu]`` ones when ``[cpu]`` does not give them). ONNX Runtime runs first and is released before
OpenVINO compiles, so the check's peak memory is the larger of the two engines', not their sum. The
verdict is recorded with the compiled model (node/infer/cpu/model_cache.py): done once per compile, not
per start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.infer.gpu.check import agreement, check_input
from node.model.bundle import Bundle


@dataclass(frozen=True)
class Verdict:
    passed: bool
    summary: str  # the figures against the limits: "max |Δ| 0.0639 (≤ 0.1), Dice 0.9911 (≥ 0.98)"


def reference_output(bundle: Bundle, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the check's input, ONNX Runtime FP32's output on it); the ONNX Runtime session is closed on return."""
    from node.infer.backends.onnxrt import OnnxRuntimeEngine

    assert bundle.model_file is not None  # built-in algorithms are never compiled
    tiles = check_input(bundle)
    reference = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                                  threads=threads)
    try:
        return tiles, reference.run(tiles)
    finally:
        del reference


def judge(bundle: Bundle, reference: np.ndarray, candidate: np.ndarray) -> Verdict:
    """``candidate`` (the BF16 model's output on the check input) against ONNX Runtime's, within ``bundle.cpu``."""
    worst, dice = agreement(reference, candidate, bundle.postprocess.threshold)
    limits = bundle.cpu
    summary = f"max |Δ| {worst:.4f} (≤ {limits.max_abs_difference:g}), Dice {dice:.4f} (≥ {limits.min_dice:g})"
    return Verdict(worst <= limits.max_abs_difference and dice >= limits.min_dice, summary)
