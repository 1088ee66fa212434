"""The check a freshly built plan must pass before the node uses it (node/infer/gpu/check.py), with ONNX
Runtime engines standing in for the plan: the same model passes, a shifted, noisy or NaN one fails
with the figures; and a failed plan is removed from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.errors import InferenceError
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.gpu.check import agreement, check_input, verify_against_reference
from node.infer.gpu.plan_cache import PlanCache, PlanKey, TensorProfile
from node.infer.manifest import load_bundle

ENGINES = Path(__file__).resolve().parents[2] / "engines"
BODY = load_bundle(ENGINES / "body-threshold")


def ort() -> OnnxRuntimeEngine:
    assert BODY.model_file is not None
    return OnnxRuntimeEngine(BODY.model_file, input_name=BODY.input_name, output_name=BODY.output_name)


class Disturbed:
    """Another engine's output, changed as a bad reduced-precision plan would change it."""

    name = "disturbed"

    def __init__(self, how: str) -> None:
        self.inner = ort()
        self.how = how

    def run(self, tiles: np.ndarray) -> np.ndarray:
        out = self.inner.run(tiles)
        if self.how == "shift":
            return out + np.float32(0.08)
        if self.how == "nan":
            out.flat[123] = np.nan
            return out
        flip = np.random.default_rng(0).random(out.shape) < 0.05  # 5 % of voxels flipped
        return np.where(flip, 1.0 - out, out).astype(np.float32)


def test_the_check_input_spans_the_normalised_range_and_is_deterministic() -> None:
    a, b = check_input(BODY), check_input(BODY)
    assert a.shape == (1, 1, *BODY.window.patch) and np.array_equal(a, b)
    lo = (BODY.preprocess.clip[0] + BODY.preprocess.offset) * BODY.preprocess.scale
    hi = (BODY.preprocess.clip[1] + BODY.preprocess.offset) * BODY.preprocess.scale
    assert lo <= a.min() < a.max() <= hi and a.std() > 0.05 * (hi - lo)


def test_a_plan_that_agrees_passes() -> None:
    summary = verify_against_reference(BODY, ort(), ort(), "FP16")
    assert "max |Δ| 0.0000" in summary and "Dice 1.0000" in summary


@pytest.mark.parametrize("how, message", [
    ("shift", r"max \|Δ\| 0.0800 \(≤ 0.05\)"),
    ("nan", r"max \|Δ\| inf"),
    ("flip", r"max .*, Dice 0\.9[0-8]\d+ \(≥ 0.99\)"),
])
def test_a_plan_that_disagrees_is_refused_with_the_figures(how: str, message: str) -> None:
    with pytest.raises(InferenceError, match=r"the FP16 plan of bundle body-threshold disagrees with ONNX Runtime: "
                                             + message):
        verify_against_reference(BODY, Disturbed(how), ort(), "FP16")


def test_agreement_of_empty_masks_is_perfect() -> None:
    zeros = np.zeros((1, 2, 4, 4, 4), np.float32)
    assert agreement(zeros, zeros, 0.5) == (0.0, 1.0)
    with pytest.raises(InferenceError, match="cannot be compared"):
        agreement(zeros, zeros[:, :1], 0.5)


def test_a_discarded_plan_is_gone_and_rebuilt(tmp_path: Path) -> None:
    key = PlanKey("body-threshold@0.1.0", "7c08", "11.4.0.106", "NVIDIA L4", "8.9", "fp16",
                  (TensorProfile("image", (1, 1, 8, 8, 8), (1, 1, 8, 8, 8), (2, 1, 8, 8, 8)),))
    cache = PlanCache(tmp_path)
    built = cache.get_or_build(key, lambda timing: (b"plan", b"timing"))
    cache.discard(key)
    assert not built.path.exists() and not built.path.with_suffix(".json").exists()
    assert cache.lookup(key) is None
    assert cache.get_or_build(key, lambda timing: (b"plan2", b"timing")).built
