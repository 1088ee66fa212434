"""nnU-Net v2 trained-model folders with the real architecture of a CT model, for the speed benchmark.

No trained weights can be downloaded here, so the plans come from nnU-Net's own ``ExperimentPlanner``
run on a dataset fingerprint like TotalSegmentator's training data (whole-body and abdominal CTs,
about 0.8 x 0.8 mm pixels, 1.5 mm slices; the CT intensity statistics of the tests' fixture), with the
target spacing overwritten as TotalSegmentator trains its models: 3 mm isotropic (``total_fast``) and
1.5 mm isotropic (``total``). The planner then picks the patch size, the number of stages, the pooling
and the features per stage exactly as it does for a real dataset. The weights are random (seeded) with
BatchNorm in place of InstanceNorm (``batch_norm``): in eval mode a voxel's output then does not depend on
which tile computed it, so two pipelines that place and blend tiles the same way agree as for a trained
model, and the agreement figures measure the pipelines. Needs torch and nnunetv2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: Preset target spacings (mm) of TotalSegmentator's CT models.
PRESETS = {"3mm": (3.0, 3.0, 3.0), "1.5mm": (1.5, 1.5, 1.5)}
#: Fingerprint of the dataset the planner sees: 200 CTs of 1.5 mm slices, 0.8 mm pixels, whole-body extent.
_CASES = 200
_SPACING = [1.5, 0.8, 0.8]
_SHAPE = [400, 512, 512]
_INTENSITY = {"max": 3071.0, "mean": 60.0, "median": 50.0, "min": -1024.0, "percentile_00_5": -980.0,
              "percentile_99_5": 1200.0, "std": 300.0}


def planned(spacing: tuple[float, float, float], classes: int, name: str = "Dataset990_Bench") -> dict[str, Any]:
    """nnU-Net's ExperimentPlanner's plans.json for the fingerprint above at ``spacing`` (3d_fullres only)."""
    with tempfile.TemporaryDirectory(prefix="nnunet-plan-") as tmp:
        raw, pre = Path(tmp) / "raw", Path(tmp) / "pre"
        (raw / name).mkdir(parents=True)
        (pre / name).mkdir(parents=True)
        labels = {"background": 0, **{f"class_{i}": i for i in range(1, classes)}}
        dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": _CASES, "file_ending": ".nii.gz",
                   "overwrite_image_reader_writer": "SimpleITKIO",
                   "dataset": {f"c{i}": {"images": [f"c{i}.nii.gz"], "label": f"c{i}.nii.gz"} for i in range(_CASES)}}
        (raw / name / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
        fingerprint = {"spacings": [_SPACING] * _CASES, "shapes_after_crop": [_SHAPE] * _CASES,
                       "foreground_intensity_properties_per_channel": {"0": _INTENSITY},
                       "median_relative_size_after_cropping": 1.0}
        (pre / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint), encoding="utf-8")
        os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = str(raw), str(pre)  # noqa: SIM112 (its names)
        os.environ.setdefault("nnUNet_results", str(Path(tmp) / "results"))  # noqa: SIM112
        import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as planner_module
        import nnunetv2.paths

        for module in (nnunetv2.paths, planner_module):  # nnunetv2 reads the folders at import time
            module.nnUNet_raw, module.nnUNet_preprocessed = str(raw), str(pre)
        planner = planner_module.ExperimentPlanner(name, overwrite_target_spacing=[float(s) for s in spacing])
        planner.lowres_creation_threshold = 0.0  # 3d_fullres is what is benchmarked; skip the lowres search
        with contextlib.redirect_stdout(io.StringIO()):  # the planner prints every configuration it tries
            planner.plan_experiment()
        plans: dict[str, Any] = json.loads((pre / name / "nnUNetPlans.json").read_text(encoding="utf-8"))
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    return plans


def make_model_folder(dst: Path, spacing: tuple[float, float, float], classes: int, *, batch_norm: bool = True,
                      seed: int = 0) -> Path:
    """An nnU-Net v2 trained-model folder (plans, dataset.json, fold_0/checkpoint_final.pth) at ``dst``."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = planned(spacing, classes)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    if batch_norm:
        arch["arch_kwargs"]["norm_op"] = "torch.nn.modules.batchnorm.BatchNorm3d"
    dataset = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": _CASES,
               "labels": {"background": 0, **{f"class_{i}": i for i in range(1, classes)}}}
    dst.mkdir(parents=True)
    (dst / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (dst / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    torch.manual_seed(seed)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                 classes, allow_init=True, deep_supervision=False)
    net.eval()
    (dst / "fold_0").mkdir()
    torch.save({"network_weights": net.state_dict(),
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1},
               dst / "fold_0" / "checkpoint_final.pth")
    return dst


def labels_csv(dst: Path, classes: int) -> Path:
    """A --labels-map CSV for the generated classes (a SNOMED code the importer accepts, reused per class)."""
    header, row = _template_rows()
    lines = [header] + [row.replace("{name}", f"class_{i}") for i in range(1, classes)]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def _template_rows() -> tuple[str, str]:
    fixture = Path(__file__).resolve().parents[1] / "tests" / "data" / "nnunet" / "tiny" / "labels.csv"
    lines = fixture.read_text(encoding="utf-8").splitlines()
    first = lines[1].split(",", 1)
    return lines[0], "{name}," + first[1]
