"""`bundles import-nnunet`: what a good nnU-Net v2 folder becomes, and what a bad one is told.

The plans-only checks need nothing; those that load checkpoints need the ``[import]`` extra (torch,
nnunetv2) and are skipped with the reason where it is not installed. Every failure must leave nothing in
the engines folder.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from node.cli import main
from node.errors import BundleError
from node.infer.manifest import load_bundle
from node.model.bundle import Bundle, NnunetResampling
from node.model.enums import IntensityScheme, Resampling
from node.nnunet.bundle import import_nnunet, manifest_text
from node.nnunet.labels import coded_labels
from node.nnunet.plans import read_plans
from tests.harness.nnunet_tiny import FIXTURE, LABELS_CSV, make_model_folder

HAVE_IMPORT_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2"))
needs_torch = pytest.mark.skipif(not HAVE_IMPORT_EXTRA, reason="torch/nnunetv2 (the [import] extra) not installed")
NODE = Path(__file__).resolve().parents[2] / "node"


def _plans_only(tmp_path: Path, edit: dict[str, object] | None = None, config_edit: dict[str, object] | None = None,
                ) -> Path:
    model = tmp_path / "model"
    model.mkdir(parents=True)
    shutil.copy(FIXTURE / "dataset.json", model / "dataset.json")
    plans = json.loads((FIXTURE / "plans.json").read_text(encoding="utf-8"))
    plans.update(edit or {})
    plans["configurations"]["3d_fullres"].update(config_edit or {})
    (model / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    return model


def _engines(tmp_path: Path) -> Path:
    engines = tmp_path / "engines"
    engines.mkdir(exist_ok=True)
    return engines


def _assert_nothing_written(engines: Path) -> None:
    assert list(engines.iterdir()) == [], f"left behind in engines/: {list(engines.iterdir())}"


def test_a_folder_that_is_not_an_nnunet_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    engines = _engines(tmp_path)
    with pytest.raises(BundleError, match=r"junk: no plans\.json here; expected an nnU-Net v2 trained-model folder"):
        import_nnunet(tmp_path / "junk", engines / "x", labels_map=LABELS_CSV)
    _assert_nothing_written(engines)


def test_plans_become_typed_settings() -> None:
    plans = read_plans(FIXTURE)
    config = plans.configuration("3d_fullres")
    assert plans.labels == ((1, "fat"), (2, "liver"), (3, "bone"))
    assert config.spacing == (2.0, 1.5, 1.5) and config.patch == (16, 64, 64)
    assert plans.intensity is not None and (plans.intensity.lower, plans.intensity.upper) == (-980.0, 1200.0)
    native = plans.configuration("3d_native")  # inherits_from 3d_fullres, overrides the spacing
    assert native.spacing == (2.0, 0.9765625, 0.9765625) and native.patch == config.patch


def test_unsupported_normalisation_is_refused(tmp_path: Path) -> None:
    model = _plans_only(tmp_path, config_edit={"normalization_schemes": ["RescaleTo01Normalization"]})
    with pytest.raises(BundleError, match=r"plans\.json: configuration '3d_fullres' normalises with "
                                          r"\['RescaleTo01Normalization'\]; the importer supports"):
        read_plans(model).configuration("3d_fullres")


def _manifest(model: Path, configuration: str = "3d_fullres") -> str:
    plans = read_plans(model)
    labels = coded_labels(plans.labels, LABELS_CSV, model / "dataset.json")
    return manifest_text("tiny", plans, plans.configuration(configuration), labels, "0" * 64, ("0",), False)


def _bundle_from(text: str, tmp_path: Path) -> Bundle:
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir(exist_ok=True)
    (bundle_dir / "manifest.toml").write_text(text, encoding="utf-8")
    return load_bundle(bundle_dir)


def test_the_manifest_asks_for_nnunets_resampling_with_the_plans_orders(tmp_path: Path) -> None:
    pre = _bundle_from(_manifest(FIXTURE), tmp_path).preprocess
    assert pre.resampling is Resampling.NNUNET and pre.normalisation is IntensityScheme.FIXED
    assert pre.nnunet == NnunetResampling(order=3, order_z=0, probabilities_order=1, probabilities_order_z=0,
                                          force_separate_z=None, anisotropy_threshold=3.0)
    model = _plans_only(tmp_path, config_edit={
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 1, "order_z": 1, "force_separate_z": True},
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 0, "order_z": 0, "force_separate_z": True}})
    pre = _bundle_from(_manifest(model), tmp_path).preprocess
    assert pre.nnunet == NnunetResampling(order=1, order_z=1, probabilities_order=0, probabilities_order_z=0,
                                          force_separate_z=True, anisotropy_threshold=3.0)


def test_resampling_the_node_does_not_reproduce_is_refused_naming_it(tmp_path: Path) -> None:
    model = _plans_only(tmp_path, config_edit={"resampling_fn_data": "resample_torch_fornnunet"})
    with pytest.raises(BundleError, match=r"resamples the data with 'resample_torch_fornnunet'; the node reproduces "
                                          r"nnU-Net's default 'resample_data_or_seg_to_shape' only"):
        read_plans(model).configuration("3d_fullres")
    model = _plans_only(tmp_path / "b", config_edit={
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 5, "order_z": 0, "force_separate_z": None}})
    with pytest.raises(BundleError, match=r"resampling_fn_probabilities_kwargs .*'order': 5.*order 0, 1 or 3"):
        read_plans(model).configuration("3d_fullres")


def test_zscore_plans_become_a_zscore_manifest(tmp_path: Path) -> None:
    model = _plans_only(tmp_path, config_edit={"normalization_schemes": ["ZScoreNormalization"],
                                               "use_mask_for_norm": [True]})
    pre = _bundle_from(_manifest(model), tmp_path).preprocess
    assert pre.normalisation is IntensityScheme.ZSCORE_NONZERO
    model = _plans_only(tmp_path / "b", config_edit={"normalization_schemes": ["ZScoreNormalization"]})
    assert _bundle_from(_manifest(model), tmp_path).preprocess.normalisation is IntensityScheme.ZSCORE


def test_a_transposed_plan_keeps_the_spacing_in_the_images_order(tmp_path: Path) -> None:
    model = _plans_only(tmp_path, edit={"transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]},
                        config_edit={"spacing": [0.8, 3.0, 1.5], "patch_size": [64, 16, 32]})
    bundle = _bundle_from(_manifest(model), tmp_path)
    # network axis j is the image's axis transpose[j]: 0.8 mm along the image's axis 2, 3.0 along 0, 1.5 along 1
    assert bundle.preprocess.transpose == (2, 0, 1) and bundle.preprocess.spacing_mm == (3.0, 1.5, 0.8)
    assert bundle.window.patch == (64, 16, 32)
    with pytest.raises(BundleError, match=r"transpose_forward is \[2, 2, 1\]; expected a permutation"):
        read_plans(_plans_only(tmp_path / "b", edit={"transpose_forward": [2, 2, 1]}))


@pytest.mark.parametrize(("edit", "error"), [
    ('resampling = "cubic"\n', r"resampling.* is 'cubic'; expected one of"),
    ('resampling_order = [3, 0]\n', r"resampling_order.* is set but resampling is 'linear'"),
    ('resampling = "nnunet"\nresampling_order = [2, 0]\n', r"resampling_order.* is \[2, 0\]; expected \[order, "),
    ('transpose = [0, 0, 1]\n', r"transpose.* is \[0, 0, 1\]; expected a permutation of \[0, 1, 2\]"),
    ('normalisation = "minmax"\n', r"normalisation.* is 'minmax'; expected one of"),
])
def test_bad_resampling_keys_in_a_manifest_are_refused(tmp_path: Path, edit: str, error: str) -> None:
    text = _manifest(FIXTURE)
    start = text.index("[preprocess]\n")
    end = text.index("[window]")
    lines = ['spacing_mm = [2.0, 1.5, 1.5]\n', edit]
    with pytest.raises(BundleError, match=error):
        _bundle_from(text[:start] + "[preprocess]\n" + "".join(lines) + "\n" + text[end:], tmp_path)


def test_labels_without_a_code_are_refused_naming_them(tmp_path: Path) -> None:
    model = _plans_only(tmp_path)
    engines = _engines(tmp_path)
    partial = tmp_path / "labels.csv"
    partial.write_text("\n".join(LABELS_CSV.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    with pytest.raises(BundleError, match=r"labels \['bone'\] have no SNOMED CT code .*--labels-map CSV"):
        import_nnunet(model, engines / "x", labels_map=partial)
    with pytest.raises(BundleError, match=r"labels \['fat', 'liver', 'bone'\] .*no --labels-map was given"):
        import_nnunet(model, engines / "x")
    _assert_nothing_written(engines)


def test_a_missing_fold_is_refused_naming_the_checkpoint(tmp_path: Path) -> None:
    model = _plans_only(tmp_path)
    engines = _engines(tmp_path)
    with pytest.raises(BundleError, match=r"fold_3/checkpoint_final\.pth: missing; expected fold 3's final checkpoint"):
        import_nnunet(model, engines / "x", folds=("3",), labels_map=LABELS_CSV)
    with pytest.raises(BundleError, match=r"no fold_\*/checkpoint_final\.pth; expected at least one trained fold"):
        import_nnunet(model, engines / "x", labels_map=LABELS_CSV)
    _assert_nothing_written(engines)


def test_no_runtime_module_imports_torch_or_nnunet() -> None:
    offenders = []
    for path in NODE.rglob("*.py"):
        if "nnunet" in path.relative_to(NODE).parts:
            continue
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                [n.module or ""] if isinstance(n, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in names if m.split(".")[0] in ("torch", "nnunetv2")]
    assert not offenders


def test_without_torch_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _plans_only(tmp_path)
    (model / "fold_0").mkdir()
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    engines = _engines(tmp_path)
    with pytest.raises(BundleError, match=r"needs torch and nnunetv2.*pip install 'dicom-seg-node\[import\]'"):
        import_nnunet(model, engines / "x", labels_map=LABELS_CSV)
    _assert_nothing_written(engines)


@needs_torch
def test_a_checkpoint_that_does_not_fit_the_plans_is_refused(tmp_path: Path) -> None:
    model = make_model_folder(tmp_path / "model")
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [16, 32, 64]
    (model / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    engines = _engines(tmp_path)
    with pytest.raises(BundleError, match=r"fold_0/checkpoint_final\.pth: its weights do not fit the network "
                                          r"plans\.json describes"):
        import_nnunet(model, engines / "x", labels_map=LABELS_CSV)
    _assert_nothing_written(engines)


@needs_torch
def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    model = _plans_only(tmp_path)
    (model / "fold_0").mkdir()
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    engines = _engines(tmp_path)
    with pytest.raises(BundleError, match=r"fold_0/checkpoint_final\.pth: not a readable PyTorch checkpoint"):
        import_nnunet(model, engines / "x", labels_map=LABELS_CSV)
    _assert_nothing_written(engines)


@needs_torch
def test_two_folds_import_as_one_ensemble_bundle_through_the_cli(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    from node.infer.manifest import discover_bundles

    model = make_model_folder(tmp_path / "model", folds=("0", "1"))
    engines = _engines(tmp_path)
    rc = main(["bundles", "import-nnunet", str(model), "-o", str(engines / "tiny"), "--labels-map", str(LABELS_CSV)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "folds 0, 1 (ensemble: mean of logits)" in out and "max |Δ| = " in out
    [bundle] = discover_bundles(engines)  # the node's own reader, sha256 verified
    assert sorted(p.name for p in engines.iterdir()) == ["tiny"]
    pre, win = bundle.preprocess, bundle.window
    assert pre.spacing_mm == (2.0, 1.5, 1.5) and pre.clip == (-980.0, 1200.0) and pre.transpose == (0, 1, 2)
    assert pre.resampling is Resampling.NNUNET and pre.normalisation is IntensityScheme.FIXED
    assert pre.offset == -60.0 and pre.scale == pytest.approx(1 / 300.0)
    assert win.patch == (16, 64, 64) and win.overlap == 0.5 and win.pad_value == 0.0
    assert [(lb.value, lb.name, lb.type.value, lb.rt_roi_type) for lb in bundle.labels] == [
        (1, "fat", "55603005", "ORGAN"), (2, "liver", "10200004", "ORGAN"), (3, "bone", "272673000", "ORGAN")]
    assert bundle.labels[2].color_rgb == (241, 214, 145)
    assert bundle.model_file is not None
    session = onnxruntime.InferenceSession(str(bundle.model_file), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"image": np.zeros((2, 1, 16, 64, 64), np.float32)})[0]  # dynamic batch
    assert probs.shape == (2, 4, 16, 64, 64) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(BundleError, match=r"tiny: already exists"):
        import_nnunet(model, engines / "tiny", labels_map=LABELS_CSV)


@needs_torch
def test_mirroring_goes_into_the_graph_and_leaves_a_flip_invariant_model(tmp_path: Path) -> None:
    import onnxruntime

    model = make_model_folder(tmp_path / "model")
    report = import_nnunet(model, _engines(tmp_path) / "tiny", labels_map=LABELS_CSV, mirror=True)
    assert report.mirrored and "mirrored" in report.bundle.description and report.max_difference <= 1e-3
    assert report.bundle.model_file is not None
    session = onnxruntime.InferenceSession(str(report.bundle.model_file), providers=["CPUExecutionProvider"])
    patch = np.random.default_rng(0).normal(size=(1, 1, 16, 64, 64)).astype(np.float32)
    probs = session.run(None, {"image": patch})[0]
    flipped = session.run(None, {"image": np.ascontiguousarray(patch[:, :, ::-1, :, ::-1])})[0]
    assert np.allclose(probs, flipped[:, :, ::-1, :, ::-1], atol=1e-4)  # the mean over all flips is flip-invariant
