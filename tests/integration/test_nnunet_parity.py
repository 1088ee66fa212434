"""Parity: an imported nnU-Net v2 model gives, through the node, the labels nnU-Net's own ``nnUNetPredictor``
gives for the same CT and the same weights.

The model is the tiny fixture (tests/data/nnunet/tiny: nnU-Net's schema, a 3-stage PlainConvUNet, patch
16x64x64) trained here for a few hundred iterations on CT intensity bands, so its labels follow the
anatomy (random weights would give argmax noise). The CT is the real 20-slice abdomen in
../shared/data (512², 0.98 mm, 2 mm slices). Settings that match on both sides: fold 0, mirroring off
(``use_mirroring=False``; imported without ``--mirror``), step 0.5, Gaussian weighting, target spacing,
CT normalisation (clip to the plans' 0.5/99.5 percentiles, (x − mean) / std), softmax + argmax.
What differs: the node averages the tiles' softmax, nnU-Net their logits (in float16); nnU-Net's
Gaussian is centred at patch // 2, the node's at the patch centre; and resampling (3d_fullres, 1.5 mm
in-plane): nnU-Net order 3 for the image and order 1 for the logits, the node linear for both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from node.assemble.volume import build_volume, read_series
from node.model.volume import Volume

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = SHARED / "ct" / "totalseg-abdomen-20-j2k"
HAVE_IMPORT_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2"))
ITERATIONS = 300

pytestmark = [
    pytest.mark.skipif(not CT.is_dir(), reason=f"real abdomen CT not found at {CT}"),
    pytest.mark.skipif(not HAVE_IMPORT_EXTRA, reason="torch/nnunetv2 (the [import] extra) not installed"),
]


@pytest.fixture(scope="module")
def volume() -> Volume:
    return build_volume(read_series(sorted(CT.glob("CT.*"))))


@pytest.mark.parametrize("configuration", ["3d_native", "3d_fullres"])
def test_node_labels_equal_nnunet_predictor_labels(tmp_path: Path, volume: Volume, configuration: str) -> None:
    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_parity import agreement, nnunet_labels, node_labels
    from tests.harness.nnunet_tiny import LABELS_CSV, make_model_folder

    model = make_model_folder(tmp_path / "model", configuration=configuration,
                              hu=volume.voxels.astype(np.float32), iterations=ITERATIONS)
    report = import_nnunet(model, tmp_path / "bundle", labels_map=LABELS_CSV)
    assert report.max_difference <= 1e-3
    ours, node_s = node_labels(volume, report.bundle, threads=2)
    theirs, nnunet_s = nnunet_labels(volume, model, ("0",), threads=2)
    result = agreement(ours, theirs, [1, 2, 3])
    print(f"{configuration}: voxel agreement {result.voxel_agreement:.4f}, Dice "
          f"{ {k: round(v, 4) for k, v in result.dice.items()} }, node {node_s:.1f} s, nnUNetPredictor {nnunet_s:.1f} s")
    assert ours.shape == theirs.shape == volume.voxels.shape
    assert set(result.dice) == {1, 2, 3}, f"a label is missing from both: {result.dice}"
    assert result.voxel_agreement >= 0.995
    assert min(result.dice.values()) >= 0.99, result.dice
