"""A tiny nnU-Net v2 trained-model folder made in the tests (no weights can be downloaded here).

The plans and dataset.json are the committed fixture in tests/data/nnunet/tiny (nnU-Net's exact schema, a
3-stage PlainConvUNet, 16x64x64 patch). The checkpoints are written as nnU-Net's trainer writes them
(``network_weights``, ``init_args``, ``trainer_name``, ``inference_allowed_mirroring_axes``), with weights
of the real architecture trained for a few dozen iterations on CT intensity bands: random weights give a
near-uniform softmax whose argmax is noise, a trained band model gives labels that follow the anatomy, so
parity between two pipelines is meaningful. Needs torch and nnunetv2 (the ``[import]`` extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "nnunet" / "tiny"
LABELS_CSV = FIXTURE / "labels.csv"
#: HU bands of the labels: fat, soft tissue ("liver"), bone; the rest is background.
BANDS = ((1, -190.0, -30.0), (2, 20.0, 150.0), (3, 250.0, 4000.0))


def band_labels(hu: np.ndarray) -> np.ndarray:
    out = np.zeros(hu.shape, dtype=np.int64)
    for value, lo, hi in BANDS:
        out[(hu >= lo) & (hu <= hi)] = value
    return out


def _network(plans: dict[str, Any], configuration: str) -> Any:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"]["3d_fullres"]["architecture"]
    del configuration  # every configuration of the fixture shares 3d_fullres's architecture
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 4, allow_init=True, deep_supervision=False)


def _train(net: Any, hu: np.ndarray, plans: dict[str, Any], iterations: int, seed: int) -> None:
    import torch

    props = plans["foreground_intensity_properties_per_channel"]["0"]
    image = (np.clip(hu, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    target = band_labels(hu)
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    patch = (16, 32, 32)  # smaller than the inference patch: 4x cheaper steps, the convolutions do not mind
    net.train()
    for _ in range(iterations):
        starts = [[int(rng.integers(0, max(1, s - p + 1))) for s, p in zip(hu.shape, patch, strict=True)]
                  for _ in range(4)]
        crop = [tuple(slice(a, a + p) for a, p in zip(st, patch, strict=True)) for st in starts]
        x = torch.from_numpy(np.stack([image[c] for c in crop])[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack([target[c] for c in crop]))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()


def make_model_folder(dst: Path, *, folds: tuple[str, ...] = ("0",), configuration: str = "3d_fullres",
                      hu: np.ndarray | None = None, iterations: int = 0, batch_norm: bool = False) -> Path:
    """Write an nnU-Net v2 trained-model folder at ``dst``: the fixture's plans and dataset.json, and per
    fold a checkpoint_final.pth (trained ``iterations`` steps on the bands of ``hu`` when given).

    ``batch_norm``: the plans' norm_op becomes BatchNorm3d (a choice nnU-Net's plans allow). In eval mode
    its statistics are the running ones, so the network's output at a voxel does not depend on which tile
    it was computed in, as InstanceNorm's does: a weakly trained model is then as tile-consistent as a
    fully trained one, and agreement measures the pipelines, not the model's tile-to-tile disagreement."""
    import torch

    dst.mkdir(parents=True)
    shutil.copy(FIXTURE / "dataset.json", dst / "dataset.json")
    plans = json.loads((FIXTURE / "plans.json").read_text(encoding="utf-8"))
    if batch_norm:
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["norm_op"] = (
            "torch.nn.modules.batchnorm.BatchNorm3d")
    (dst / "plans.json").write_text(json.dumps(plans, indent=4), encoding="utf-8")
    for i, fold in enumerate(folds):
        torch.manual_seed(i)
        net = _network(plans, configuration)
        if hu is not None and iterations:
            _train(net, hu, plans, iterations, seed=i)
        (dst / f"fold_{fold}").mkdir()
        torch.save({"network_weights": net.state_dict(),
                    "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                                  "dataset_json": json.loads((FIXTURE / "dataset.json").read_text(encoding="utf-8"))},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
                    "current_epoch": 1},
                   dst / f"fold_{fold}" / "checkpoint_final.pth")
    return dst
