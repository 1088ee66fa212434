"""An nnU-Net v2 trained-model folder's ``plans.json`` and ``dataset.json`` as typed settings.

Only what inference needs: the configuration's target spacing, patch size, normalisation, resampling and
network, the transpose, the foreground intensity properties (CT normalisation) and the labels. Everything that
the node cannot reproduce is refused here with a sentence naming the file and what was expected.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import BundleError
from node.model.bundle import NnunetResampling

CHECKPOINT = "checkpoint_final.pth"


class Normalisation(enum.StrEnum):
    """``normalization_schemes`` the node reproduces (node.infer.transforms: normalise, zscore)."""

    CT = "CTNormalization"  # clip to the foreground's 0.5/99.5 percentiles, then (x - mean) / std
    ZSCORE = "ZScoreNormalization"  # per image (x - mean) / std; inside the nonzero mask with use_mask_for_norm
    NONE = "NoNormalization"


#: The resampling function the node reproduces (node.infer.resample_nnunet), for the image and the probabilities.
RESAMPLING_FN = "resample_data_or_seg_to_shape"


@dataclass(frozen=True)
class Intensity:
    """``foreground_intensity_properties_per_channel["0"]``: what CT normalisation uses."""

    mean: float
    std: float
    lower: float  # percentile_00_5
    upper: float  # percentile_99_5


@dataclass(frozen=True)
class Configuration:
    """One configuration of the plans (``3d_fullres``, …), inheritance resolved."""

    name: str
    spacing: tuple[float, float, float]  # mm, in the (transposed) array order the network sees
    patch: tuple[int, int, int]
    normalisation: Normalisation
    use_mask_for_norm: bool  # z-score inside the nonzero mask
    resampling: NnunetResampling  # resampling_fn_data_kwargs / resampling_fn_probabilities_kwargs
    network_class_name: str
    arch_kwargs: dict[str, Any]
    arch_kwargs_requires_import: tuple[str, ...]


@dataclass(frozen=True)
class Plans:
    directory: Path
    dataset_name: str
    plans_name: str
    transpose_forward: tuple[int, int, int]
    intensity: Intensity | None
    channel: str  # dataset.json channel_names["0"], e.g. "CT"
    labels: tuple[tuple[int, str], ...]  # (value, name), background excluded, in value order
    configurations: dict[str, dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    def configuration(self, name: str) -> Configuration:
        return _configuration(self, name)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path.parent}: no {path.name} here; expected an nnU-Net v2 trained-model folder "
                          f"(dataset.json, plans.json, fold_*/{CHECKPOINT})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in data:
        raise BundleError(f"{where}: has no {key!r}; expected it in an nnU-Net v2 file")
    value = data[key]
    if not isinstance(value, kind):
        raise BundleError(f"{where}: {key!r} is {value!r}; expected a {getattr(kind, '__name__', kind)}")
    return value


def _triple(value: Any, key: str, where: Path, kind: type) -> tuple[Any, Any, Any]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int | float) for v in value)):
        raise BundleError(f"{where}: {key!r} is {value!r}; expected three numbers (a 3D configuration)")
    return (kind(value[0]), kind(value[1]), kind(value[2]))


def _labels(dataset: dict[str, Any], where: Path) -> tuple[tuple[int, str], ...]:
    raw = _require(dataset, "labels", dict, where)
    labels = []
    for name, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise BundleError(f"{where}: label {name!r} is {value!r}; region-based models (a list of labels) "
                              "are not supported, expected an integer label value")
        if value != 0:
            labels.append((value, str(name)))
    labels.sort()
    values = [v for v, _ in labels]
    if values != list(range(1, len(values) + 1)):
        raise BundleError(f"{where}: label values are {values}; expected 1, 2, … without gaps as nnU-Net requires")
    if not labels or values[-1] > 255:
        raise BundleError(f"{where}: has {len(labels)} foreground labels; expected 1 to 255")
    return tuple(labels)


def _intensity(plans: dict[str, Any], where: Path) -> Intensity | None:
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
    if props is None:
        return None
    try:
        return Intensity(mean=float(props["mean"]), std=float(props["std"]),
                         lower=float(props["percentile_00_5"]), upper=float(props["percentile_99_5"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: foreground_intensity_properties_per_channel[\"0\"] lacks {exc}; expected "
                          "mean, std, percentile_00_5 and percentile_99_5") from None


def read_plans(directory: Path) -> Plans:
    """Read ``directory``'s plans.json and dataset.json; refuse what the node cannot run."""
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a directory; expected an nnU-Net v2 trained-model folder")
    plans_path, dataset_path = directory / "plans.json", directory / "dataset.json"
    plans, dataset = _read_json(plans_path), _read_json(dataset_path)
    channels = _require(dataset, "channel_names", dict, dataset_path)
    if len(channels) != 1:
        raise BundleError(f"{dataset_path}: has {len(channels)} input channels {sorted(channels.values())}; "
                          "expected one (the node feeds one series to a network)")
    transpose = _triple(_require(plans, "transpose_forward", list, plans_path), "transpose_forward", plans_path, int)
    if sorted(transpose) != [0, 1, 2]:
        raise BundleError(f"{plans_path}: transpose_forward is {list(transpose)}; expected a permutation of [0, 1, 2]")
    return Plans(
        directory=directory,
        dataset_name=str(plans.get("dataset_name", directory.name)),
        plans_name=str(plans.get("plans_name", "nnUNetPlans")),
        transpose_forward=transpose,
        intensity=_intensity(plans, plans_path),
        channel=str(next(iter(channels.values()))),
        labels=_labels(dataset, dataset_path),
        configurations=_require(plans, "configurations", dict, plans_path),
    )


def _resolved(plans: Plans, name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    where = plans.directory / "plans.json"
    if name not in plans.configurations:
        raise BundleError(f"{where}: has no configuration {name!r}; it has {sorted(plans.configurations)}")
    if name in seen:
        raise BundleError(f"{where}: configuration {name!r} inherits from itself ({' -> '.join(seen)})")
    config = dict(plans.configurations[name])
    parent = config.pop("inherits_from", None)
    if parent is None:
        return config
    return {**_resolved(plans, str(parent), (*seen, name)), **config}


def _spline(config: dict[str, Any], key: str, name: str, where: Path) -> tuple[int, int, bool | None, float | None]:
    """(order, order_z, force_separate_z, separate_z_anisotropy_threshold) of ``resampling_fn_<key>``."""
    function = _require(config, f"resampling_fn_{key}", str, where)
    if function != RESAMPLING_FN:
        raise BundleError(f"{where}: configuration {name!r} resamples the {key} with {function!r}; the node reproduces "
                          f"nnU-Net's default {RESAMPLING_FN!r} only")
    kwargs = _require(config, f"resampling_fn_{key}_kwargs", dict, where)
    known = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
    unknown = sorted(set(kwargs) - known)
    order, order_z, force = kwargs.get("order", 3), kwargs.get("order_z", 0), kwargs.get("force_separate_z")
    threshold = kwargs.get("separate_z_anisotropy_threshold")
    if (unknown or kwargs.get("is_seg", False) or order not in (0, 1, 3) or order_z not in (0, 1)
            or force not in (None, True, False) or not (threshold is None or isinstance(threshold, int | float))):
        raise BundleError(f"{where}: configuration {name!r} has resampling_fn_{key}_kwargs {kwargs}; the node "
                          "reproduces is_seg false, order 0, 1 or 3, order_z 0 or 1, force_separate_z null/true/false "
                          "and a numeric separate_z_anisotropy_threshold")
    return int(order), int(order_z), force, None if threshold is None else float(threshold)


def _resampling(config: dict[str, Any], name: str, where: Path) -> NnunetResampling:
    order, order_z, force, threshold = _spline(config, "data", name, where)
    back, back_z, force_back, threshold_back = _spline(config, "probabilities", name, where)
    if (force, threshold) != (force_back, threshold_back):
        raise BundleError(f"{where}: configuration {name!r} separates the low-resolution axis differently for the data "
                          f"({force}, {threshold}) and the probabilities ({force_back}, {threshold_back}); the node "
                          "expects the same force_separate_z and separate_z_anisotropy_threshold for both")
    return NnunetResampling(order=order, order_z=order_z, probabilities_order=back, probabilities_order_z=back_z,
                            force_separate_z=force, anisotropy_threshold=3.0 if threshold is None else threshold)


def _configuration(plans: Plans, name: str) -> Configuration:
    where = plans.directory / "plans.json"
    config = _resolved(plans, name)
    schemes = _require(config, "normalization_schemes", list, where)
    try:
        normalisation = Normalisation(schemes[0])
    except (ValueError, IndexError):
        raise BundleError(f"{where}: configuration {name!r} normalises with {schemes}; the importer supports "
                          f"{[n.value for n in Normalisation]}") from None
    if normalisation is Normalisation.CT and plans.intensity is None:
        raise BundleError(f"{where}: CTNormalization without foreground_intensity_properties_per_channel[\"0\"]; "
                          "expected the percentiles, mean and std nnU-Net's fingerprint records")
    arch = _require(config, "architecture", dict, where)
    return Configuration(
        name=name,
        spacing=_triple(_require(config, "spacing", list, where), "spacing", where, float),
        patch=_triple(_require(config, "patch_size", list, where), "patch_size", where, int),
        normalisation=normalisation,
        use_mask_for_norm=bool(any(_require(config, "use_mask_for_norm", list, where))),
        resampling=_resampling(config, name, where),
        network_class_name=str(_require(arch, "network_class_name", str, where)),
        arch_kwargs=dict(_require(arch, "arch_kwargs", dict, where)),
        arch_kwargs_requires_import=tuple(arch.get("_kw_requires_import", ())),
    )


def fold_directories(directory: Path, folds: tuple[str, ...]) -> list[Path]:
    """The ``fold_<f>`` folders to load: those named (``"0"``, …, ``"all"``), or every one that holds a
    final checkpoint, as nnUNetPredictor picks them when given no folds."""
    if not folds:
        found = sorted(d for d in directory.glob("fold_*") if (d / CHECKPOINT).is_file())
        if not found:
            raise BundleError(f"{directory}: no fold_*/{CHECKPOINT}; expected at least one trained fold")
        return found
    paths = []
    for fold in folds:
        if fold != "all" and not fold.isdigit():
            raise BundleError(f"fold {fold!r}: expected a fold number or \"all\"")
        checkpoint = directory / f"fold_{fold}" / CHECKPOINT
        if not checkpoint.is_file():
            have = sorted(d.name for d in directory.glob("fold_*") if (d / CHECKPOINT).is_file())
            raise BundleError(f"{checkpoint}: missing; expected fold {fold}'s final checkpoint (folds with one: "
                              f"{have or 'none'})")
        paths.append(checkpoint.parent)
    return paths
