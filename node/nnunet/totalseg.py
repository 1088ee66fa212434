"""Import TotalSegmentator's weights, as they lie on disk, as one node bundle per task.

``dicom-seg-node bundles import-totalseg WEIGHTS_DIR --task total`` finds the task's dataset folders
(node.nnunet.totalseg_layout), exports each network to ONNX with the nnU-Net importer's own code
(node.nnunet.export: rebuilt from the plans, checked against PyTorch), and writes a parts bundle
(``[model] kind = "parts"``, ``combine = "overlay"``): one part per network in TotalSegmentator's merge
order, later parts overwriting earlier ones where they found something, as
``totalsegmentator.nnunet.nnUNet_predict_image`` merges them. Labels: node.nnunet.totalseg_labels.

What each part reproduces of TotalSegmentator's run (``totalsegmentator(input, task=…)``, defaults):

- orientation: TotalSegmentator reorients to the closest canonical RAS; nnU-Net's reader for these models
  (``image_reader_writer``: SimpleITKIO, NibabelIO or NibabelIOWithReorient — all give the NIfTI's array
  transposed to (k, j, i)) hands the network the axes (S, A, R): ``orientation = "SAR"``;
- resampling: TotalSegmentator's own ``change_spacing`` to the task's spacing (linear, end voxel centres
  aligned, rounded toward zero to integers; the label map back by nearest neighbour) —
  ``resampling = "totalseg"`` (node.infer.resample_totalseg); nnU-Net then finds nothing to resample;
- CT normalisation from each part's plans (clip to the 0.5/99.5 foreground percentiles, (x − mean) / std);
- the patch, Gaussian sliding window at TotalSegmentator's step (0.8 for the ``total`` family: overlap 0.2),
  fold 0, no mirroring (TotalSegmentator runs without test-time augmentation), softmax + argmax;
- no body crop and no "remove small blobs": TotalSegmentator's defaults (``body_seg=False``,
  ``remove_small_blobs=False``; ``total`` has no ``crop``) run neither, so the bundle has none.

Everything is written to a temporary folder beside the target, read back with the node's manifest reader,
and renamed into place only then.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from node.errors import BundleError
from node.infer.manifest import load_bundle
from node.model.bundle import Bundle, Label
from node.model.enums import Resampling
from node.nnunet.plans import Configuration, Normalisation, Plans, fold_directories, read_plans
from node.nnunet.totalseg_labels import CodedClass, coded_classes, without_tg263
from node.nnunet.totalseg_layout import Network, Task, load_task, model_folder

#: nnU-Net readers that hand the network a canonical-RAS NIfTI as (S, A, R) (the array transposed (2, 1, 0)).
SAR_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
#: TotalSegmentator's own resampling (node.infer.resample_totalseg).
RESAMPLING = Resampling.TOTALSEG.value


@dataclass(frozen=True)
class PartReport:
    part: str
    model_dir: Path
    max_difference: float
    name_mismatches: tuple[tuple[int, str, str], ...]  # (class, dataset.json's name, TotalSegmentator's name)


@dataclass(frozen=True)
class TotalsegImport:
    bundle: Bundle
    task: Task
    parts: tuple[PartReport, ...]
    without_tg263: tuple[str, ...]
    resampling: str = RESAMPLING


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _floats(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _code_toml(key: str, scheme: str, value: str, meaning: str) -> str:
    return f"{key} = {{ scheme = {_q(scheme)}, value = {_q(value)}, meaning = {_q(meaning)} }}\n"


def _label_toml(coded: CodedClass) -> str:
    label: Label = coded.label
    c, t = label.category, label.type
    text = (f"[[labels]]\nvalue = {label.value}\nname = {_q(label.name)}\n"
            + _code_toml("category", c.scheme, c.value, c.meaning) + _code_toml("type", t.scheme, t.value, t.meaning)
            + f"color_rgb = [{', '.join(map(str, label.color_rgb))}]\nrt_roi_type = {_q(label.rt_roi_type)}\n")
    if label.roi_name:
        text += f"roi_name = {_q(label.roi_name)}\n"
    if label.type_modifier is not None:  # laterality: kidney_left is Kidney + Left
        m = label.type_modifier
        text += _code_toml("type_modifier", m.scheme, m.value, m.meaning)
    return text


def _with_architecture(plans: Plans) -> Plans:
    """TotalSegmentator's v2 weights use nnU-Net's old plans format (no ``architecture``); nnU-Net's own
    ConfigurationManager rebuilds it, exactly as nnUNetPredictor does when it loads them."""
    if all("architecture" in c or "UNet_class_name" not in c for c in plans.configurations.values()):
        return plans
    try:
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    except ImportError:
        raise BundleError(f"{plans.directory / 'plans.json'}: in nnU-Net's old plans format, which needs "
                          "nnunetv2 to read; pip install 'dicom-seg-node[import]'") from None
    converted = {}
    for name, config in plans.configurations.items():
        if "architecture" not in config and "UNet_class_name" in config:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    config = ConfigurationManager(copy.deepcopy(config)).configuration
            except (KeyError, RuntimeError) as exc:
                raise BundleError(f"{plans.directory / 'plans.json'}: configuration {name!r} in the old plans "
                                  f"format cannot be converted ({exc}); expected PlainConvUNet or "
                                  "ResidualEncoderUNet") from None
        converted[name] = config
    return dataclasses.replace(plans, configurations=converted)


def _check_reader(model_dir: Path) -> None:
    plans = json.loads((model_dir / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((model_dir / "dataset.json").read_text(encoding="utf-8"))
    reader = dataset.get("overwrite_image_reader_writer") or plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in SAR_READERS:
        raise BundleError(f"{model_dir}: nnU-Net reads its images with {reader!r}; the importer knows which axes "
                          f"the network saw only for {', '.join(SAR_READERS)}")


def _normalisation(plans: Plans, config: Configuration) -> tuple[tuple[float, float], float, float]:
    if config.normalisation is not Normalisation.CT or plans.intensity is None:
        raise BundleError(f"{plans.directory / 'plans.json'}: normalises with {config.normalisation.value}; the "
                          "TotalSegmentator importer reproduces CTNormalization (CT tasks)")
    i = plans.intensity
    return (i.lower, i.upper), -i.mean, 1.0 / max(i.std, 1e-8)


def _part_toml(network: Network, plans: Plans, config: Configuration, task: Task, file: str, sha256: str) -> str:
    clip, offset, scale = _normalisation(plans, config)
    values = ", ".join(f"[{k}, {v}]" for k, v in _part_values(network, task))
    return f"""
[[parts]]
name = {_q(network.part)}
file = {_q(file)}
sha256 = "{sha256}"
values = [{values}]
# {network.folder_name}: {len(network.classes)} classes, {task.trainer}__{task.plans}__{config.name}, fold 0

[parts.preprocess]
spacing_mm = {_floats(config.spacing)}
orientation = "SAR"           # canonical RAS, then nnU-Net's reader's (2, 1, 0) transpose
resampling = {_q(RESAMPLING)}
uneven_slices = "resample"
clip = {_floats(clip)}
offset = {offset!r}
scale = {scale!r}

[parts.window]
mode = "sliding"
patch = [{', '.join(map(str, config.patch))}]
overlap = {round(1.0 - task.step_size, 6)!r}   # TotalSegmentator's step {task.step_size}
batch = 1
pad_value = 0.0
"""


def _part_values(network: Network, task: Task) -> list[tuple[int, int]]:
    """(the network's class, the bundle's label value): TotalSegmentator's lookup from part to combined map."""
    combined = {name: value for value, name in task.classes.items()}
    missing = [name for name in network.classes.values() if name not in combined]
    if missing:
        raise BundleError(f"{network.folder_name}: classes {missing} are not in TotalSegmentator's class map for "
                          f"{task.ts_task}; expected the part's classes to be part of the task's")
    return [(k, combined[name]) for k, name in sorted(network.classes.items())]


def manifest_text(name: str, task: Task, labels: tuple[CodedClass, ...], parts: list[str]) -> str:
    try:
        version = importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    folders = ", ".join(n.folder_name for n in task.networks)
    description = (f"TotalSegmentator {task.name} ({len(task.networks)} network"
                   f"{'s' if len(task.networks) > 1 else ''} at {task.spacing_mm[0]:g} mm, {len(labels)} "
                   f"structures), imported from TotalSegmentator {version}'s weights {folders}")
    return f"""# Imported by `dicom-seg-node bundles import-totalseg --task {task.name}`.
# Each part reproduces TotalSegmentator's own run of that network (canonical RAS, its resampling, nnU-Net's
# CT normalisation, Gaussian sliding window at step {task.step_size}, no mirroring, argmax); the parts are
# overlaid in TotalSegmentator's order. Labels: TotalSegmentator's names and values, its SNOMED CT mapping and
# colours, RT ROI type ORGAN, RTSTRUCT ROI names from AAPM TG-263. TotalSegmentator's weights are licensed
# by its authors (Apache-2.0 for the open tasks): see https://github.com/wasserth/TotalSegmentator.

[bundle]
name = {_q(name)}
version = "1.0.0"
description = {_q(description)}

[model]
kind = "parts"
combine = "overlay"

[select]
modalities = [{_q(task.modality)}]
min_slices = 1

[algorithm]
name = {_q(f"TotalSegmentator-{task.name}")}
family = {{ scheme = "DCM", value = "113076", meaning = "Segmentation" }}

""" + "\n".join(_label_toml(coded) for coded in labels) + "".join(parts)


def _check_target(out: Path) -> None:
    if out.exists():
        raise BundleError(f"{out}: already exists; expected a new bundle folder (remove it or pick another -o)")
    if not out.parent.is_dir():
        raise BundleError(f"{out.parent}: no such directory; expected the engines folder to write {out.name} into")


def _read_network(model_dir: Path, task: Task, network: Network) -> tuple[Plans, Configuration, list[Path],
                                                                           tuple[tuple[int, str, str], ...]]:
    _check_reader(model_dir)
    plans = _with_architecture(read_plans(model_dir))
    config = plans.configuration(task.configuration)
    if len(plans.labels) != len(network.classes):
        raise BundleError(f"{model_dir / 'dataset.json'}: {len(plans.labels)} labels; TotalSegmentator's class map "
                          f"for dataset {network.dataset_id} has {len(network.classes)}: these are not the weights "
                          "of the installed TotalSegmentator version")
    if any(abs(a - b) > 1e-3 for a, b in zip(config.spacing, task.spacing_mm, strict=True)):
        raise BundleError(f"{model_dir / 'plans.json'}: spacing {list(config.spacing)} differs from the "
                          f"{list(task.spacing_mm)} mm TotalSegmentator resamples to for {task.name}; nnU-Net would "
                          "resample a second time, which the importer does not reproduce")
    _normalisation(plans, config)  # refused here, before any export, if not CT normalisation
    mismatches = tuple((v, n, network.classes[v]) for v, n in plans.labels if network.classes.get(v) != n)
    return plans, config, fold_directories(model_dir, task.folds), mismatches


def import_totalseg(weights_dir: Path, out: Path, *, task_name: str = "total", name: str | None = None,
                    labels_map: Path | None = None) -> TotalsegImport:
    """Import TotalSegmentator task ``task_name`` from ``weights_dir`` as the bundle folder ``out``."""
    _check_target(out)
    task = load_task(task_name)
    labels = coded_classes(task.classes, labels_map)  # before the slow part
    found = [(network, model_folder(weights_dir, task, network)) for network in task.networks]
    read = [(network, model_dir, *_read_network(model_dir, task, network)) for network, model_dir in found]
    from node.nnunet.export import export_onnx, load_folds

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        parts_toml, reports = [], []
        for network, model_dir, plans, config, fold_dirs, mismatches in read:
            file = f"{network.part}.onnx"
            print(f"{network.part}: exporting {model_dir}")
            difference = export_onnx(plans, config, load_folds(fold_dirs), staging / file, mirror=False)
            sha256 = hashlib.sha256((staging / file).read_bytes()).hexdigest()
            parts_toml.append(_part_toml(network, plans, config, task, file, sha256))
            reports.append(PartReport(network.part, model_dir, difference, mismatches))
        text = manifest_text(name or out.name, task, labels, parts_toml)
        (staging / "manifest.toml").write_text(text, encoding="utf-8")
        load_bundle(staging)  # the node's own reader must accept what was written
        _check_target(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TotalsegImport(bundle=load_bundle(out), task=task, parts=tuple(reports),
                          without_tg263=tuple(without_tg263(task.classes)))
