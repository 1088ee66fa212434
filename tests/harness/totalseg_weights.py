"""A TotalSegmentator weights folder made in the tests (no weights can be downloaded here).

Laid out exactly as ``totalseg_download_weights`` lays it out (``Dataset<id>_<name>/<trainer>__nnUNetPlans__
3d_fullres/{dataset.json, plans.json, fold_0/checkpoint_final.pth}``), with TotalSegmentator's dataset ids,
folder names, trainers and class names, read from the installed ``totalsegmentator`` package, and plans in
nnU-Net's OLD format (``UNet_class_name`` …, no ``architecture``) as TotalSegmentator's v2 weights have them.
The architecture is tiny (a 3-stage PlainConvUNet, 8-32 features, patch 10x60x60: steps of 0.8 x patch are
whole voxels, so nnU-Net and the node place the very same tiles).

One small network is trained for a few hundred iterations on labels that follow the CT (bone, soft tissue,
fat) and on three DIRECTIONAL labels (intensity rising toward patient right, anterior, superior): a network
seen through the wrong axes labels the opposite edges, so a parity test with it fails on any orientation
error. Every network of a task is that trained trunk with its output layer rearranged: the chosen
TotalSegmentator classes of the part take the trained classes' weights, the others a bias that never wins.
Needs torch, nnunetv2 and totalsegmentator.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PATCH = (10, 60, 60)
#: The trained trunk's classes: 0 background, 1 bone, 2 soft tissue, 3 fat, 4/5/6 HU rising toward R/A/S.
TRUNK_CLASSES = 7
BANDS = ((1, 250.0, 4000.0), (2, 20.0, 150.0), (3, -190.0, -30.0))
EDGE_HU = 150.0
#: Which TotalSegmentator classes a trunk class may become, in order: in each network the FIRST of them that
#: the network has takes the trunk class's output row (its other classes get a bias that never wins). Each
#: trunk class lands in one part of "total" — except bone, which the vertebrae part (vertebrae_L1) and the later
#: muscles part (hip_left) both claim with the same competitors, so the merge order alone decides: hip_left.
TARGETS: dict[int, tuple[str, ...]] = {
    1: ("vertebrae_L1", "hip_left"),
    2: ("liver",),
    3: ("small_bowel",),
    4: ("aorta",),
    5: ("kidney_left",),
    6: ("rib_left_1",),
}
INTENSITY = {"max": 1839.0, "mean": 60.0, "median": 50.0, "min": -1024.0, "percentile_00_5": -980.0,
             "percentile_99_5": 1200.0, "std": 300.0}


def trunk_targets(hu: np.ndarray) -> np.ndarray:
    """The trunk's training labels for a (S, A, R) array: bands, directional edges on top, bone on top of all."""
    out = np.zeros(hu.shape, dtype=np.int64)
    for value, low, high in BANDS:
        out[(hu >= low) & (hu <= high)] = value
    for axis, value in ((2, 4), (1, 5), (0, 6)):
        rising = np.zeros(hu.shape, dtype=bool)
        before: list[slice] = [slice(None)] * 3
        after: list[slice] = [slice(None)] * 3
        mid: list[slice] = [slice(None)] * 3
        before[axis], after[axis], mid[axis] = slice(0, -2), slice(2, None), slice(1, -1)
        rising[tuple(mid)] = (hu[tuple(after)] - hu[tuple(before)]) > EDGE_HU
        out[rising] = value
    out[hu >= BANDS[0][1]] = 1  # bone whole, edges or not: the class two parts of "total" claim
    return out


def old_format_plans(dataset_name: str, spacing: float) -> dict[str, Any]:
    """nnU-Net plans as TotalSegmentator's v2 weights carry them (old format), with a tiny network."""
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [100, 160, 160],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(PATCH),
            "median_image_size_in_voxels": [100.0, 160.0, 160.0],
            "spacing": [spacing] * 3,
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": 8,
            "n_conv_per_stage_encoder": [2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2],
            "num_pool_per_axis": [1, 2, 2],
            "pool_op_kernel_sizes": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "unet_max_num_features": 32,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "batch_dice": True,
        }},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(INTENSITY)},
    }


def _network(plans: dict[str, Any], num_classes: int) -> Any:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    arch = ConfigurationManager(copy.deepcopy(plans["configurations"]["3d_fullres"])).configuration["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, num_classes, allow_init=True, deep_supervision=False)


def train_trunk(hu_sar: np.ndarray, iterations: int, seed: int = 0) -> dict[str, Any]:
    """The trained trunk's state dict, from a CT already as the network sees it ((S, A, R), task spacing)."""
    import torch

    torch.manual_seed(seed)
    plans = old_format_plans("Dataset000_Trunk", 3.0)
    net = _network(plans, TRUNK_CLASSES)
    image = (np.clip(hu_sar, INTENSITY["percentile_00_5"], INTENSITY["percentile_99_5"]) - INTENSITY["mean"]) \
        / INTENSITY["std"]
    target = trunk_targets(hu_sar.astype(np.float32))
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    crop_shape = (8, 40, 40)
    net.train()
    for _ in range(iterations):
        starts = [[int(rng.integers(0, max(1, s - p + 1))) for s, p in zip(hu_sar.shape, crop_shape, strict=True)]
                  for _ in range(4)]
        crops = [tuple(slice(a, a + p) for a, p in zip(st, crop_shape, strict=True)) for st in starts]
        x = torch.from_numpy(np.stack([image[c] for c in crops])[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack([target[c] for c in crops]))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def part_weights(trunk: dict[str, Any], classes: dict[int, str]) -> dict[str, Any]:
    """The trunk with its output layers rearranged for a network whose classes are ``classes``."""
    import torch

    present = set(classes.values())
    wanted = {next(n for n in names if n in present): trunk_class
              for trunk_class, names in TARGETS.items() if any(n in present for n in names)}
    state = {}
    for key, value in trunk.items():
        if not key.startswith("decoder.seg_layers."):
            state[key] = value.clone()
            continue
        shape = (max(classes) + 1, *value.shape[1:])
        new = torch.zeros(shape, dtype=value.dtype) if key.endswith("weight") else torch.full(shape, -30.0)
        new[0] = value[0]
        for cls, name in classes.items():
            if name in wanted:
                new[cls] = value[wanted[name]]
        state[key] = new
    return state


def checkpoint_trainer(trainer: str) -> str:
    """The trainer name the checkpoints carry: TotalSegmentator's, when nnU-Net can find that class here.

    nnU-Net looks a checkpoint's trainer up by importing its trainer modules one by one; on this machine that
    walk dies in ``primus_trainers`` (timm imports torchvision 0.28.0, whose compiled ops do not load against
    torch 2.13+cpu: "operator torchvision::nms does not exist") before it reaches
    ``nnUNetTrainerNoMirroring`` / ``nnUNetTrainer_4000epochs_NoMirroring``. Their base class
    ``nnUNetTrainer`` is found first and builds the same network (the subclasses differ in epochs and
    training-time mirroring only; TotalSegmentator predicts without mirroring either way). The model FOLDER
    keeps TotalSegmentator's trainer name, which is what TotalSegmentator looks up.
    """
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        recursive_find_trainer_class_by_name(trainer)
        return trainer
    except Exception:  # the broken import above raises RuntimeError; a missing class raises RuntimeError too
        return "nnUNetTrainer"


@dataclass(frozen=True)
class WrittenNetwork:
    model_dir: Path
    classes: dict[int, str]


def write_task(results: Path, task_name: str, trunk: dict[str, Any], *,
               skip: tuple[int, ...] = ()) -> list[WrittenNetwork]:
    """Write every network of node task ``task_name`` under ``results`` (TotalSegmentator's weights folder) as
    TotalSegmentator's downloads lay them out; dataset ids in ``skip`` are left out."""
    import torch

    from node.nnunet.totalseg_layout import load_task

    task = load_task(task_name)
    trainer_name = checkpoint_trainer(task.trainer)
    written = []
    for network in task.networks:
        if network.dataset_id in skip:
            continue
        model_dir = results / network.folder_name / f"{task.trainer}__{task.plans}__{task.configuration}"
        (model_dir / "fold_0").mkdir(parents=True)
        plans = old_format_plans(network.folder_name, task.spacing_mm[0])
        dataset = {"channel_names": {"0": "CT"},
                   "labels": {"background": 0, **{name: cls for cls, name in sorted(network.classes.items())}},
                   "numTraining": 1, "file_ending": ".nii.gz", "name": network.folder_name}
        (model_dir / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
        (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
        torch.save({"network_weights": part_weights(trunk, network.classes),
                    "init_args": {"plans": plans, "configuration": task.configuration, "fold": 0,
                                  "dataset_json": dataset},
                    "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1, 2),
                    "current_epoch": 1},
                   model_dir / "fold_0" / "checkpoint_final.pth")
        written.append(WrittenNetwork(model_dir, dict(network.classes)))
    return written
