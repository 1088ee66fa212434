"""TotalSegmentator's tasks and where their weights lie, read from the installed ``totalsegmentator`` package.

Nothing here is retyped from TotalSegmentator: the task's dataset ids, resampling, trainer and folds come
from ``totalsegmentator.map_tasks_config`` (``TASK_CONFIGS``, ``TASK_ID_WEIGHTS_CONFIGS``), the class
names and the parts' class maps from ``totalsegmentator.map_to_binary`` (``class_map``,
``class_map_5_parts`` …). What this module adds is the node's task names (``total``, ``total_fast``,
``total_fastest``; the same for ``total_v3`` and ``total_mr``) and the search of a weights folder laid
out as TotalSegmentator lays it out::

    ~/.totalsegmentator/nnunet/results/           (TOTALSEG_HOME_DIR/nnunet/results, or TOTALSEG_WEIGHTS_PATH)
        Dataset291_TotalSegmentator_part1_organs_1559subj/
            nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
                dataset.json  plans.json  fold_0/checkpoint_final.pth
        Dataset292_… Dataset295_…                  (the other parts of "total", 1.5 mm)
        Dataset297_TotalSegmentator_total_3mm_1559subj/
            nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/ …   ("total_fast", 3 mm)

A dataset folder is found as TotalSegmentator (nnU-Net's ``maybe_convert_to_dataset_name``) finds it: the
one folder whose name starts with ``Dataset<id>_``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import BundleError

#: TotalSegmentator's own task names whose parts merge into one class map, with the names of its tables
#: (in ``totalsegmentator.map_to_binary``) that give each part's classes: the dispatch
#: ``totalsegmentator.nnunet.nnUNet_predict_image`` makes on the task name.
PART_TABLES = {
    "total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
    "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
    "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr"),
}
#: Sub-modes as node task suffixes: ``total`` (default), ``total_fast``, ``total_fastest``.
MODES = {"": "default", "_fast": "fast", "_fastest": "fastest"}
#: TotalSegmentator runs these tasks' networks with step 0.8 (fewer overlapping tiles), others with 0.5.
STEP_08_TASKS = ("total", "total_v3", "total_mr")
INSTALL = "pip install 'dicom-seg-node[import]' (TotalSegmentator, torch and nnunetv2)"


def ts_module(module: str) -> Any:
    try:
        return importlib.import_module(f"totalsegmentator.{module}")
    except ImportError:
        raise BundleError("importing TotalSegmentator weights needs the totalsegmentator package (its class "
                          f"names, SNOMED CT mapping and task settings), which is not installed; {INSTALL}") from None


def task_names() -> tuple[str, ...]:
    """The node task names this importer understands (whether or not their weights are present)."""
    return tuple(f"{task}{suffix}" for task in PART_TABLES for suffix in MODES)


@dataclass(frozen=True)
class Network:
    """One nnU-Net network of a task: a TotalSegmentator dataset and the classes it outputs."""

    dataset_id: int
    folder_name: str  # as TotalSegmentator downloads it, e.g. Dataset297_TotalSegmentator_total_3mm_1559subj
    part: str  # the part's short name in the bundle: organs, vertebrae, … or the task for a single network
    classes: dict[int, str]  # network output class → TotalSegmentator class name


@dataclass(frozen=True)
class Task:
    name: str  # the node's name: total, total_fast, …
    ts_task: str  # TotalSegmentator's task name: total, total_v3, total_mr
    mode: str  # default, fast, fastest
    spacing_mm: tuple[float, float, float]  # TotalSegmentator's resample, in the network's (S, A, R) axis order
    trainer: str
    plans: str
    configuration: str
    folds: tuple[str, ...]
    step_size: float
    classes: dict[int, str]  # the combined class map: bundle label value → TotalSegmentator class name
    networks: tuple[Network, ...]  # in TotalSegmentator's merge order
    modality: str  # CT or MR


def _split(name: str) -> tuple[str, str]:
    for suffix in sorted(MODES, key=len, reverse=True):
        base = name[: len(name) - len(suffix)] if suffix else name
        if (name.endswith(suffix) or not suffix) and base in PART_TABLES:
            return base, MODES[suffix]
    raise BundleError(f"task {name!r}: not a TotalSegmentator task the importer knows; expected one of "
                      f"{', '.join(task_names())}")


def _spacing(resample: Any, name: str) -> tuple[float, float, float]:
    values = [float(resample)] * 3 if isinstance(resample, int | float) else [float(v) for v in resample or ()]
    if len(values) != 3:
        raise BundleError(f"task {name!r}: TotalSegmentator's resample is {resample!r}; expected a spacing")
    return (values[2], values[1], values[0])  # TotalSegmentator's [x, y, z] → the network's (z, y, x)


def load_task(name: str) -> Task:
    """The node task ``name`` as TotalSegmentator's installed tables define it."""
    ts_task, mode = _split(name)
    config_module, binary = ts_module("map_tasks_config"), ts_module("map_to_binary")
    config = {**config_module.DEFAULT_CONFIG, **config_module.TASK_CONFIGS[ts_task]["sub_modes"].get(mode, {})}
    if mode not in config_module.TASK_CONFIGS[ts_task]["sub_modes"]:
        raise BundleError(f"task {name!r}: TotalSegmentator has no {mode!r} mode for {ts_task!r}")
    weights = config_module.TASK_ID_WEIGHTS_CONFIGS
    combined: dict[int, str] = dict(binary.class_map[ts_task])
    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    networks = []
    if len(ids) > 1:
        parts_table, partnames = (getattr(binary, t) for t in PART_TABLES[ts_task])
        for dataset_id in ids:
            part_name = partnames[dataset_id]
            networks.append(Network(dataset_id=dataset_id, folder_name=weights[dataset_id]["foldername"],
                                    part=part_name.removeprefix("class_map_part_"),
                                    classes=dict(parts_table[part_name])))
    else:
        networks.append(Network(dataset_id=ids[0], folder_name=weights[ids[0]]["foldername"], part=name,
                                 classes=combined))
    folds = config.get("folds") or [0]
    return Task(name=name, ts_task=ts_task, mode=mode, spacing_mm=_spacing(config["resample"], name),
                trainer=str(config["trainer"]), plans=str(config.get("plans") or "nnUNetPlans"),
                configuration=str(config.get("model") or "3d_fullres"), folds=tuple(str(f) for f in folds),
                step_size=0.8 if ts_task in STEP_08_TASKS else 0.5, classes=combined, networks=tuple(networks),
                modality="MR" if ts_task.endswith("_mr") else "CT")


def download_command(dataset_id: int) -> str:
    """The ``totalseg_download_weights`` call that fetches ``dataset_id`` (from its own task table)."""
    try:
        table = ts_module("bin.totalseg_download_weights").TASK_TO_ID
    except (BundleError, AttributeError):
        return "totalseg_download_weights"
    for name, ids in table.items():
        if dataset_id in (ids if isinstance(ids, list) else [ids]):
            return f"totalseg_download_weights -t {name}"
    return "totalseg_download_weights"


def results_folder(weights_dir: Path) -> Path:
    """``weights_dir`` itself, or its ``nnunet/results`` when given TotalSegmentator's home folder."""
    if not weights_dir.is_dir():
        raise BundleError(f"{weights_dir}: not a directory; expected TotalSegmentator's weights folder "
                          "(~/.totalsegmentator/nnunet/results, where totalseg_download_weights puts them)")
    nested = weights_dir / "nnunet" / "results"
    return nested if nested.is_dir() and not any(weights_dir.glob("Dataset*_*")) else weights_dir


def model_folder(weights_dir: Path, task: Task, network: Network) -> Path:
    """The trained-model folder of ``network``: ``Dataset<id>_*/<trainer>__<plans>__<configuration>``."""
    results = results_folder(weights_dir)
    found = sorted(d for d in results.glob(f"Dataset{network.dataset_id:03d}_*") if d.is_dir())
    download = download_command(network.dataset_id)
    if not found:
        raise BundleError(f"{results / network.folder_name}: missing; task {task.name} needs TotalSegmentator's "
                          f"dataset {network.dataset_id} ({network.part}) there (fetch it with {download})")
    if len(found) > 1:
        raise BundleError(f"{results}: several folders for dataset {network.dataset_id} "
                          f"({', '.join(d.name for d in found)}); expected one, as TotalSegmentator finds it")
    model = found[0] / f"{task.trainer}__{task.plans}__{task.configuration}"
    if not model.is_dir():
        have = sorted(d.name for d in found[0].iterdir() if d.is_dir())
        raise BundleError(f"{model}: missing; TotalSegmentator runs task {task.name} with trainer {task.trainer}, "
                          f"plans {task.plans}, configuration {task.configuration} (found: {have or 'nothing'})")
    return model
