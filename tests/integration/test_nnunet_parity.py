"""Parity: an imported nnU-Net v2 model gives, through the node, the labels nnU-Net's own ``nnUNetPredictor``
gives for the same CT and the same weights.

The model is the tiny fixture (tests/data/nnunet/tiny: nnU-Net's schema, a 3-stage PlainConvUNet, patch
16x64x64) trained here for a few hundred iterations on CT intensity bands, so its labels follow the
anatomy (random weights would give argmax noise). The CT is the real 20-slice abdomen in
../shared/data (512², 0.98 mm, 2 mm slices). Settings that match on both sides: fold 0, mirroring off
(``use_mirroring=False``; imported without ``--mirror``), step 0.5, Gaussian weighting, target spacing,
CT normalisation (clip to the plans' 0.5/99.5 percentiles, (x − mean) / std), softmax + argmax.
The tiles and their Gaussian weights are nnU-Net's (node/infer/window.py). What differs: the node
averages the tiles' softmax, nnU-Net their logits (in float16); and resampling (3d_fullres, 1.5 mm
in-plane): nnU-Net order 3 for the image and order 1 for the logits, the node linear for both.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.assemble.volume import build_volume, read_series
from node.model.volume import Volume
from tests.harness.nnunet_parity import Agreement

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CT = SHARED / "ct" / "totalseg-abdomen-20-j2k"
HAVE_IMPORT_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2"))
ITERATIONS = 300
#: What the resampling difference may cost (measured: see the README's parity table).
RESAMPLED_MIN_AGREEMENT = 0.99
RESAMPLED_MIN_DICE = 0.85

pytestmark = [
    pytest.mark.skipif(not CT.is_dir(), reason=f"real abdomen CT not found at {CT}"),
    pytest.mark.skipif(not HAVE_IMPORT_EXTRA, reason="torch/nnunetv2 (the [import] extra) not installed"),
]


@pytest.fixture(scope="module")
def volume() -> Volume:
    return build_volume(read_series(sorted(CT.glob("CT.*"))))


@pytest.fixture(scope="module")
def trained(volume: Volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder (configuration 3d_native), trained once for both tests."""
    from tests.harness.nnunet_tiny import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("nnunet") / "model", configuration="3d_native",
                             hu=volume.voxels.astype(np.float32), iterations=ITERATIONS, batch_norm=True)


def _with_configuration(model: Path, configuration: str, dst: Path) -> Path:
    """The same weights, trained as ``configuration`` (what nnUNetPredictor reads from init_args)."""
    import torch

    shutil.copytree(model, dst)
    path = dst / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["init_args"]["configuration"] = configuration
    torch.save(checkpoint, path)
    return dst


def _compare(volume: Volume, model: Path, bundle_dir: Path) -> Agreement:
    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_parity import agreement, nnunet_labels, node_labels
    from tests.harness.nnunet_tiny import LABELS_CSV

    report = import_nnunet(model, bundle_dir, labels_map=LABELS_CSV)
    assert report.max_difference <= 1e-3
    ours, node_s = node_labels(volume, report.bundle, threads=2)
    theirs, nnunet_s = nnunet_labels(volume, model, ("0",), threads=2)
    assert ours.shape == theirs.shape == volume.voxels.shape
    result = agreement(ours, theirs, [1, 2, 3])
    print(f"{report.configuration}: voxel agreement {result.voxel_agreement:.4f}, Dice "
          f"{ {k: round(v, 4) for k, v in result.dice.items()} }, node {node_s:.1f} s, "
          f"nnUNetPredictor {nnunet_s:.1f} s")
    assert set(result.dice) == {1, 2, 3}, f"a label is missing from both: {result.dice}"
    return result


def test_on_the_native_grid_node_labels_equal_nnunet_predictor_labels(volume: Volume, trained: Path,
                                                                      tmp_path: Path) -> None:
    """No resampling on either side (the plans' spacing is the CT's): the pipelines must agree."""
    result = _compare(volume, trained, tmp_path / "bundle")
    assert result.voxel_agreement >= 0.995
    assert min(result.dice.values()) >= 0.99, result.dice


def test_resampled_to_the_plans_spacing_agreement_stays_high(volume: Volume, trained: Path, tmp_path: Path) -> None:
    """3d_fullres at 1.5 mm in-plane: nnU-Net resamples the image with order 3 and the logits with order 1,
    the node linearly both ways (end voxel centres aligned): what that costs, measured and bounded."""
    model = _with_configuration(trained, "3d_fullres", tmp_path / "model")
    result = _compare(volume, model, tmp_path / "bundle")
    assert result.voxel_agreement >= RESAMPLED_MIN_AGREEMENT
    assert min(result.dice.values()) >= RESAMPLED_MIN_DICE, result.dice
