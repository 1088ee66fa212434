"""The TotalSegmentator importer: its tasks and weights layout (read from the installed totalsegmentator
package), the label table (TotalSegmentator's values and SNOMED CT codes, TG-263 ROI names), its refusals,
and TotalSegmentator's resampling as node.infer.resample_totalseg reproduces it."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.errors import BundleError
from node.infer.resample_totalseg import labels_to_native, to_model_grid_totalseg
from node.model.bundle import Preprocess

HAVE_TS = importlib.util.find_spec("totalsegmentator") is not None
needs_ts = pytest.mark.skipif(not HAVE_TS, reason="totalsegmentator (the [import] extra) not installed")


def _snomed_csv() -> dict[str, dict[str, str]]:
    """TotalSegmentator's shipped mapping, read here with the csv module (not with the importer's reader)."""
    spec = importlib.util.find_spec("totalsegmentator")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "resources" / "totalsegmentator_snomed_mapping.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["Structure"]: row for row in csv.DictReader(handle)}


@needs_ts
def test_total_is_five_parts_in_totalsegmentators_order_and_fast_is_one_3mm_network() -> None:
    from totalsegmentator.map_to_binary import class_map

    from node.nnunet.totalseg_layout import load_task

    total = load_task("total")
    assert [n.dataset_id for n in total.networks] == [291, 292, 293, 294, 295]
    assert [n.part for n in total.networks] == ["organs", "vertebrae", "cardiac", "muscles", "ribs"]
    assert total.spacing_mm == (1.5, 1.5, 1.5) and total.trainer == "nnUNetTrainerNoMirroring"
    assert total.step_size == 0.8 and total.folds == ("0",)
    names = [name for n in total.networks for name in n.classes.values()]
    assert sorted(names) == sorted(class_map["total"].values()) and len(names) == len(set(names)) == 117
    fast = load_task("total_fast")
    assert [n.dataset_id for n in fast.networks] == [297] and fast.spacing_mm == (3.0, 3.0, 3.0)
    assert fast.networks[0].folder_name == "Dataset297_TotalSegmentator_total_3mm_1559subj"
    assert fast.networks[0].classes == class_map["total"] == fast.classes
    with pytest.raises(BundleError, match="'liver_vessels'.*total_fast"):
        load_task("liver_vessels")


@needs_ts
def test_labels_carry_totalsegmentators_values_codes_colours_and_tg263_names() -> None:
    from totalsegmentator.map_to_binary import class_map

    from node.nnunet.totalseg_labels import coded_classes

    rows = _snomed_csv()
    coded = coded_classes(class_map["total"])
    assert [c.label.value for c in coded] == sorted(class_map["total"]) and max(c.label.value for c in coded) <= 255
    for c in coded:
        row = rows[c.label.name]
        assert c.label.name == class_map["total"][c.label.value]
        assert (c.label.type.value, c.label.type.meaning) == (row["SegmentedPropertyTypeCodeSequence.CodeValue"],
                                                              row["SegmentedPropertyTypeCodeSequence.CodeMeaning"])
        assert c.label.category.value == row["SegmentedPropertyCategoryCodeSequence.CodeValue"]
        assert ",".join(map(str, c.label.color_rgb)) == row["DicomRGBColor"].replace(" ", "")
        assert c.label.rt_roi_type == "ORGAN"
        modifier = row["SegmentedPropertyTypeModifierCodeSequence.CodeValue"]
        assert (c.type_modifier.value if c.type_modifier else "") == modifier
        assert c.label.type_modifier == c.type_modifier
    roi = {c.label.name: c.label.structure_set_name for c in coded}
    assert (roi["spinal_cord"], roi["kidney_left"], roi["kidney_right"], roi["lung_upper_lobe_left"]) == (
        "SpinalCord", "Kidney_L", "Kidney_R", "Lung_LUL")
    assert (roi["urinary_bladder"], roi["esophagus"], roi["vertebrae_T9"], roi["rib_right_12"]) == (
        "Bladder", "Esophagus", "VB_T09", "Rib12_R")
    assert (roi["adrenal_gland_left"], roi["aorta"], roi["inferior_vena_cava"]) == (
        "Glnd_Adrenal_L", "A_Aorta", "V_Venacava_I")
    assert roi["gluteus_maximus_left"] == "gluteus_maximus_left"  # no TG-263 name: TotalSegmentator's own
    assert len(set(roi.values())) == len(roi)  # no two structures share an RTSTRUCT name


@needs_ts
def test_a_class_without_a_code_is_refused_naming_it_unless_the_labels_map_has_it(tmp_path: Path) -> None:
    from node.nnunet.totalseg_labels import coded_classes

    classes = {1: "liver", 2: "carpal_tunnel_thing"}
    with pytest.raises(BundleError, match=r"\['carpal_tunnel_thing'\].*--labels-map.*never invents"):
        coded_classes(classes)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("name,code,meaning,rt_roi_type,color\ncarpal_tunnel_thing,123456,Thing,AVOIDANCE,#102030\n",
                        encoding="utf-8")
    coded = coded_classes(classes, csv_path)
    assert coded[1].label.type.value == "123456" and coded[1].label.rt_roi_type == "AVOIDANCE"
    assert coded[0].label.type.value == _snomed_csv()["liver"]["SegmentedPropertyTypeCodeSequence.CodeValue"]
    with pytest.raises(BundleError, match="1-255"):
        coded_classes({256: "liver"})


@needs_ts
def test_weights_layout_is_found_as_totalsegmentator_lays_it_out_and_gaps_are_named(tmp_path: Path) -> None:
    from node.nnunet.totalseg_layout import load_task, model_folder

    task = load_task("total")
    home = tmp_path / ".totalsegmentator"
    results = home / "nnunet" / "results"
    for network in task.networks[:4]:
        (results / network.folder_name / f"{task.trainer}__nnUNetPlans__3d_fullres").mkdir(parents=True)
    for root in (results, home):  # the results folder, or TotalSegmentator's home above it
        found = model_folder(root, task, task.networks[0])
        assert found == results / "Dataset291_TotalSegmentator_part1_organs_1559subj" / \
            "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    with pytest.raises(BundleError, match="Dataset295_TotalSegmentator_part5_ribs_1559subj: missing.*ribs.*"
                                          "totalseg_download_weights -t total"):
        model_folder(results, task, task.networks[4])
    fast = load_task("total_fast")
    (results / fast.networks[0].folder_name / "nnUNetTrainer__nnUNetPlans__3d_fullres").mkdir(parents=True)
    with pytest.raises(BundleError, match="nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres: missing.*"
                                          "found: \\['nnUNetTrainer__nnUNetPlans__3d_fullres'\\]"):
        model_folder(results, fast, fast.networks[0])
    with pytest.raises(BundleError, match="not a directory"):
        model_folder(tmp_path / "nowhere", fast, fast.networks[0])


@needs_ts
def test_import_refuses_missing_parts_before_writing_anything(tmp_path: Path) -> None:
    from node.nnunet.totalseg import import_totalseg

    (tmp_path / "results" / "Dataset291_TotalSegmentator_part1_organs_1559subj").mkdir(parents=True)
    (tmp_path / "engines").mkdir()
    with pytest.raises(BundleError, match="nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres: missing"):
        import_totalseg(tmp_path / "results", tmp_path / "engines" / "ts", task_name="total")
    assert list((tmp_path / "engines").iterdir()) == []


def test_resampling_is_totalsegmentators_zoom_order_1_rounded_toward_zero_and_order_0_back() -> None:
    rng = np.random.default_rng(3)
    hu = rng.normal(0.0, 400.0, (9, 23, 17)).astype(np.float32)
    pre = Preprocess(spacing_mm=(3.0, 3.0, 3.0), clip=(-1e6, 1e6), scale=1.0, offset=0.0)
    spacing = (2.0, 0.9765625, 0.9765625)
    got = to_model_grid_totalseg(hu, spacing, pre)
    expected = ndimage.zoom(hu.astype(np.float64), np.array(spacing) / 3.0, order=1, mode="nearest").astype(np.int32)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1.0  # float32 vs float64 at a rounding
    assert np.mean(got == expected) > 0.999
    same = to_model_grid_totalseg(hu, (3.0, 3.0, 3.0), pre)  # at the target spacing: untouched, not rounded
    assert np.array_equal(same, hu)
    labels = rng.integers(0, 6, (7, 11, 13)).astype(np.uint8)
    for shape in ((20, 40, 39), (7, 11, 13), (3, 30, 5)):
        reference = ndimage.zoom(labels, np.array(shape) / np.array(labels.shape), order=0, mode="nearest")
        assert np.array_equal(labels_to_native(labels, shape), reference)
