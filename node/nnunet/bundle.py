"""Write an imported nnU-Net model as a node bundle: ``model.onnx`` + ``manifest.toml``.

Everything goes into a temporary folder beside the target, is read back with the node's own manifest
reader, and only then renamed into place: a failed import leaves nothing half-written in ``engines/``.

The manifest reproduces nnU-Net's inference with the node's settings:

- target spacing: the configuration's ``spacing``, written in the image's own (slice, row, column) order (the
  order nnU-Net's SimpleITK reader gives), and ``transpose`` = ``transpose_forward`` (the network's axes);
- nnU-Net's own resampling (``resampling = "nnunet"``: crop to the nonzero box, spline order 3 in, order 1 back,
  order 0 along a separate low-resolution axis; the orders from the plans' resampling kwargs);
- CT normalisation: clip to the foreground's 0.5 and 99.5 percentiles, then (x − mean) / std, written as
  ``clip``, ``offset = −mean``, ``scale = 1 / std``; z-score per image (``normalisation = "zscore"``, or
  ``"zscore-nonzero"`` with use_mask_for_norm);
- the patch size, Gaussian-weighted sliding window at step 0.5 (``overlap = 0.5``), padding with 0 after
  normalisation as nnU-Net pads;
- softmax + argmax (the folds' logits averaged inside the ONNX graph), the labels of dataset.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node.errors import BundleError
from node.infer.manifest import load_bundle
from node.model.bundle import Bundle, Label
from node.nnunet.labels import coded_labels
from node.nnunet.plans import Configuration, Normalisation, Plans, fold_directories, read_plans

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ImportReport:
    bundle: Bundle
    folds: tuple[str, ...]
    configuration: str
    max_difference: float
    mirrored: bool


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _floats(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _label_toml(label: Label) -> str:
    c, t = label.category, label.type
    return (f"[[labels]]\nvalue = {label.value}\nname = {_q(label.name)}\n"
            f"category = {{ scheme = {_q(c.scheme)}, value = {_q(c.value)}, meaning = {_q(c.meaning)} }}\n"
            f"type = {{ scheme = {_q(t.scheme)}, value = {_q(t.value)}, meaning = {_q(t.meaning)} }}\n"
            f"color_rgb = [{', '.join(map(str, label.color_rgb))}]\nrt_roi_type = {_q(label.rt_roi_type)}\n")


def _normalisation(plans: Plans, config: Configuration) -> tuple[tuple[float, float], float, float]:
    """(clip, offset, scale) so that (clip(x) + offset) * scale is nnU-Net's normalisation."""
    if config.normalisation is Normalisation.CT:
        assert plans.intensity is not None  # Plans.configuration refuses CT normalisation without it
        i = plans.intensity
        return (i.lower, i.upper), -i.mean, 1.0 / max(i.std, 1e-8)
    return (-1e6, 1e6), 0.0, 1.0


def _scheme(config: Configuration) -> str:
    if config.normalisation is Normalisation.ZSCORE:
        return "zscore-nonzero" if config.use_mask_for_norm else "zscore"
    return "fixed"


def _resampling_toml(config: Configuration) -> str:
    r = config.resampling
    force = "" if r.force_separate_z is None else f"force_separate_z = {str(r.force_separate_z).lower()}\n"
    return (f"resampling = \"nnunet\"      # nnU-Net's resample_data_or_seg_to_shape, crop to nonzero\n"
            f"resampling_order = [{r.order}, {r.order_z}]    # image: in-plane, along a separate low-resolution axis\n"
            f"probabilities_order = [{r.probabilities_order}, {r.probabilities_order_z}]\n"
            f"separate_z_anisotropy = {r.anisotropy_threshold!r}\n{force}")


def manifest_text(name: str, plans: Plans, config: Configuration, labels: tuple[Label, ...], sha256: str,
                  folds: tuple[str, ...], mirrored: bool) -> str:
    clip, offset, scale = _normalisation(plans, config)
    backward = sorted(range(3), key=lambda a: plans.transpose_forward[a])  # argsort: array axis -> network axis
    spacing = tuple(config.spacing[backward[i]] for i in range(3))  # the image's own axis order
    modality = "CT" if config.normalisation is Normalisation.CT else plans.channel
    description = (f"nnU-Net v2 {plans.dataset_name} {config.name}, folds {', '.join(folds)}"
                   f"{', mirrored' if mirrored else ''} (imported)")
    return f"""# Imported by `dicom-seg-node bundles import-nnunet` from {plans.directory}.
# nnU-Net's inference: transpose, crop to nonzero, normalisation (CT: clip to the foreground 0.5/99.5
# percentiles, then (x - mean) / std = (clip(x) + offset) * scale; or z-score), nnU-Net's resampling,
# Gaussian sliding window at step 0.5, softmax, order-1 resampling back, argmax.

[bundle]
name = {_q(name)}
version = "1.0.0"
description = {_q(description)}

[model]
kind = "onnx"
file = "{MODEL_FILE}"
sha256 = "{sha256}"
input = "image"           # (N, 1, {', '.join(map(str, config.patch))}) float32, normalised
output = "probabilities"  # (N, {plans.num_classes}, ...) softmax of the folds' mean logits
activation = "softmax"

[select]
modalities = [{_q(modality)}]
min_slices = 1

[preprocess]
spacing_mm = {_floats(spacing)}   # the image's (slice, row, column) order
transpose = [{', '.join(map(str, plans.transpose_forward))}]     # nnU-Net's transpose_forward: the network's axes
uneven_slices = "resample"
{_resampling_toml(config)}normalisation = "{_scheme(config)}"
clip = {_floats(clip)}
offset = {offset!r}
scale = {scale!r}

[window]
mode = "sliding"
patch = [{', '.join(map(str, config.patch))}]
overlap = 0.5             # nnU-Net's step 0.5
batch = 1
pad_value = 0.0           # nnU-Net pads the normalised image with 0

[algorithm]
name = {_q(f"nnunet-{plans.dataset_name}-{config.name}")}
family = {{ scheme = "DCM", value = "113076", meaning = "Segmentation" }}

""" + "\n".join(_label_toml(label) for label in labels)


def _check_target(out: Path) -> None:
    if out.exists():
        raise BundleError(f"{out}: already exists; expected a new bundle folder (remove it or pick another -o)")
    if not out.parent.is_dir():
        raise BundleError(f"{out.parent}: no such directory; expected the engines folder to write {out.name} into")


def import_nnunet(model_dir: Path, out: Path, *, folds: tuple[str, ...] = (), name: str | None = None,
                  labels_map: Path | None = None, mirror: bool = False) -> ImportReport:
    """Import ``model_dir`` (an nnU-Net v2 trained-model folder) as the bundle folder ``out``."""
    _check_target(out)
    plans = read_plans(model_dir)
    labels = coded_labels(plans.labels, labels_map, model_dir / "dataset.json")  # before the slow part
    fold_dirs = fold_directories(model_dir, folds)
    from node.nnunet.export import export_onnx, load_folds

    loaded = load_folds(fold_dirs)
    if not loaded.configuration.startswith("3d"):
        raise BundleError(f"{loaded.paths[0]}: trained with configuration {loaded.configuration!r}; the importer "
                          "supports 3D configurations (3d_fullres, 3d_lowres)")
    config = plans.configuration(loaded.configuration)
    fold_names = tuple(d.name.removeprefix("fold_") for d in fold_dirs)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        difference = export_onnx(plans, config, loaded, staging / MODEL_FILE, mirror=mirror)
        sha256 = hashlib.sha256((staging / MODEL_FILE).read_bytes()).hexdigest()
        text = manifest_text(name or out.name, plans, config, labels, sha256, fold_names, mirror)
        (staging / "manifest.toml").write_text(text, encoding="utf-8")
        load_bundle(staging)  # the node's own reader must accept what was written
        _check_target(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportReport(bundle=load_bundle(out), folds=fold_names, configuration=config.name,
                        max_difference=difference, mirrored=mirror)
