"""Parity: an imported nnU-Net v2 model gives, through the node, the labels nnU-Net's own ``nnUNetPredictor``
gives for the same CT and the same weights.

The model is the tiny fixture (tests/data/nnunet/tiny: nnU-Net's schema, a 3-stage PlainConvUNet, patch
16x64x64) trained here for a few hundred iterations on CT intensity bands, so its labels follow the
anatomy (random weights would give argmax noise). The CT is the real 20-slice abdomen in
../shared/data (512², 0.98 mm, 2 mm slices). Settings that match on both sides: fold 0, mirroring off
(``use_mirroring=False``; imported without ``--mirror``), step 0.5, Gaussian weighting, target spacing,
CT normalisation (clip to the plans' 0.5/99.5 percentiles, (x − mean) / std), softmax + argmax.
The tiles and their Gaussian weights are nnU-Net's (node/infer/window.py); the importer writes
``resampling = "nnunet"``, so the node also crops to the nonzero box, resamples the image with nnU-Net's
order-3 spline and the (log-)probabilities back with order 1 (node/infer/resample_nnunet.py). What still
differs: the node averages the tiles' softmax, nnU-Net their logits (in float16).

The native-grid test runs on the CT with a 0-filled margin (a reduced field of view padded with 0, as a
converted or cropped CT can be): nnU-Net crops to the nonzero box, and so must the node, or its tiles
would fall elsewhere. It also makes that test about twice as fast. The resampled test runs on the CT as
it is (air is −1024 HU there: the nonzero box is the whole volume). The third test runs the speed benchmark
(benchmarks/import_parity.py) on the same trained model, so the command the README reports figures from keeps
working; its 3 mm / 1.5 mm figures are read on a quiet machine, not asserted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.assemble.volume import build_volume, read_series
from node.model.volume import Volume
from tests.harness.nnunet_parity import Agreement

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CT = SHARED / "ct" / "totalseg-abdomen-20-j2k"
HAVE_IMPORT_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2"))
ITERATIONS = 300
#: What the issue asks of parity, on the native grid and resampled alike.
MIN_AGREEMENT = 0.995
MIN_DICE = 0.99
#: The field of view kept in the native-grid test (rows, columns); the rest is set to 0.
FOV = (slice(150, 490), slice(50, 470))

pytestmark = [
    pytest.mark.skipif(not CT.is_dir(), reason=f"real abdomen CT not found at {CT}"),
    pytest.mark.skipif(not HAVE_IMPORT_EXTRA, reason="torch/nnunetv2 (the [import] extra) not installed"),
    # Training (first test's setup) and nnUNetPredictor on torch's CPU: ~3.5 min a test on 2 idle cores, more when
    # the cores are shared.
    pytest.mark.timeout(1200),
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


def _zero_margin(volume: Volume) -> Volume:
    voxels = np.zeros_like(volume.voxels)
    voxels[(slice(None), *FOV)] = volume.voxels[(slice(None), *FOV)]
    return dataclasses.replace(volume, voxels=voxels)


def test_on_the_native_grid_node_labels_equal_nnunet_predictor_labels(volume: Volume, trained: Path,
                                                                      tmp_path: Path) -> None:
    """No resampling on either side (the plans' spacing is the CT's), both crop to the nonzero box: the
    pipelines must agree, and nothing may be labelled in the 0-filled margin."""
    margin = _zero_margin(volume)
    result = _compare(margin, trained, tmp_path / "bundle")
    assert result.voxel_agreement >= MIN_AGREEMENT
    assert min(result.dice.values()) >= MIN_DICE, result.dice


def test_resampled_to_the_plans_spacing_node_labels_equal_nnunet_predictor_labels(volume: Volume, trained: Path,
                                                                                  tmp_path: Path) -> None:
    """3d_fullres at 1.5 mm in-plane: nnU-Net resamples the image with order 3 and the logits back with order 1,
    and so does the node (resampling = "nnunet")."""
    model = _with_configuration(trained, "3d_fullres", tmp_path / "model")
    result = _compare(volume, model, tmp_path / "bundle")
    assert result.voxel_agreement >= MIN_AGREEMENT
    assert min(result.dice.values()) >= MIN_DICE, result.dice


def test_the_speed_benchmark_runs_both_pipelines_and_prints_their_figures(trained: Path) -> None:
    """benchmarks/import_parity.py (node vs nnUNetPredictor: seconds, peak RSS, agreement) on a model of one's
    own (``--model``), each pipeline in its own process: the table's row carries both pipelines' figures and
    the labels agree as the parity tests require. No time is asserted (speed is read from the benchmark's
    table on a quiet machine, README "Speed and memory"); this keeps the benchmark itself working."""
    from tests.harness.nnunet_tiny import LABELS_CSV

    command = [sys.executable, str(ROOT / "benchmarks" / "import_parity.py"), "--model", str(trained),
               "--labels-map", str(LABELS_CSV), "--ct", str(CT), "--slices", "20", "--slice-mm", "0",
               "--threads", "2", "--backend", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1100, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    row = lines[header + 1].split()
    assert row[0] == trained.name, lines[header + 1]
    tiles, node_s, node_mb, nnunet_s, nnunet_mb, speed_up, memory, agree, min_dice = row[-9:]
    assert int(tiles) > 1 and speed_up.endswith("x"), lines[header + 1]
    assert min(float(node_s), float(nnunet_s), float(node_mb), float(nnunet_mb)) > 0, lines[header + 1]
    assert float(speed_up[:-1]) == pytest.approx(float(nnunet_s) / float(node_s), rel=0.02)
    assert float(memory) == pytest.approx(float(node_mb) / float(nnunet_mb), abs=0.01)
    assert float(agree) >= MIN_AGREEMENT and float(min_dice) >= MIN_DICE, "\n".join(lines[header:])
    title = next(line for line in lines if line.startswith("CT "))
    assert "ONNX Runtime" in title and f"from {CT}" in title, title
