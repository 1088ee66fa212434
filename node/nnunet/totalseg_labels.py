"""The labels of an imported TotalSegmentator task: TotalSegmentator's names and values, its SNOMED CT codes and
colours, RT ROI types, and TG-263 ROI names.

- value: TotalSegmentator's combined class index (``class_map[task]``), so the node's label map equals
  TotalSegmentator's own multilabel output;
- name: TotalSegmentator's class name (the SEG's segment label);
- category, type and type modifier (laterality: kidney_left is Kidney + Left): TotalSegmentator's
  ``resources/totalsegmentator_snomed_mapping.csv``, read with TotalSegmentator's own
  ``dicom_utils.load_snomed_mapping`` — never retyped;
- colour: the same file's ``DicomRGBColor`` (``dicom_utils.load_color_mapping``);
- rt_roi_type: ``ORGAN`` for every class. They are all anatomy; ``AVOIDANCE`` (PS3.3 C.8.8.8: "region in which
  dose is to be minimized") is a planning construct a planner draws (a PRV, a ring), not an organ a model
  finds, and ``EXTERNAL`` is the body outline, which ``total`` does not produce;
- roi_name: the TG-263 name (node.nnunet.tg263), else TotalSegmentator's name.

A class missing from TotalSegmentator's mapping is refused, naming it and the ``--labels-map`` CSV that can
supply it (the same CSV as ``import-nnunet``'s; its rows also override the mapping's code, RT ROI type or
colour for the classes they name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.errors import BundleError
from node.model.bundle import Code, Label
from node.nnunet.labels import REQUIRED, read_labels_map
from node.nnunet.tg263 import TG263
from node.nnunet.totalseg_layout import ts_module

RT_ROI_TYPE = "ORGAN"


@dataclass(frozen=True)
class CodedClass:
    """One class with everything the manifest needs (``type_modifier``: the laterality, also on the label)."""

    label: Label
    type_modifier: Code | None


def _code(entry: dict[str, str] | None) -> Code | None:
    if not entry or not entry.get("value"):
        return None
    return Code(scheme=entry["scheme"], value=entry["value"], meaning=entry["meaning"])


def totalseg_mapping() -> tuple[dict[str, dict[str, dict[str, str] | None]], dict[str, tuple[int, int, int]]]:
    """TotalSegmentator's own SNOMED CT and colour tables, by class name."""
    utils = ts_module("dicom_utils")
    return utils.load_snomed_mapping(), utils.load_color_mapping()


def coded_classes(classes: dict[int, str], labels_map: Path | None = None) -> tuple[CodedClass, ...]:
    """Every (value, name) of ``classes`` coded from TotalSegmentator's mapping (``labels_map`` rows first)."""
    snomed, colours = totalseg_mapping()
    extra = read_labels_map(labels_map) if labels_map is not None else {}
    bad = [v for v in classes if not 1 <= v <= 255]
    if bad:
        raise BundleError(f"TotalSegmentator class values {bad}: expected 1-255 (the node's label map is 8-bit)")
    missing = [n for n in classes.values() if n not in extra and (n not in snomed or n not in colours)]
    if missing:
        source = f"{labels_map} has no row for them either" if labels_map else "no --labels-map was given"
        raise BundleError(
            f"TotalSegmentator classes {missing} have no SNOMED CT code or colour in TotalSegmentator's "
            f"totalsegmentator_snomed_mapping.csv ({source}); pass --labels-map CSV with the header "
            f"{','.join(REQUIRED)} and one row per class (e.g. liver,10200004,Liver,ORGAN,#dd8265); "
            "the importer never invents a code")
    out = []
    for value, name in sorted(classes.items()):
        roi = TG263.get(name, "")
        if name in extra:
            row = extra[name]
            out.append(CodedClass(Label(value=value, name=name, category=row.category, type=row.type,
                                        color_rgb=row.color_rgb, rt_roi_type=row.rt_roi_type, roi_name=roi), None))
            continue
        entry = snomed[name]
        category, kind = _code(entry["property_category"]), _code(entry["property_type"])
        if category is None or kind is None:
            raise BundleError(f"TotalSegmentator's SNOMED CT mapping has an empty code for {name!r}; pass "
                              "--labels-map with a row for it")
        rgb, modifier = colours[name], _code(entry.get("property_modifier"))
        out.append(CodedClass(Label(value=value, name=name, category=category, type=kind,
                                    color_rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])), rt_roi_type=RT_ROI_TYPE,
                                    roi_name=roi, type_modifier=modifier), modifier))
    return tuple(out)


def without_tg263(classes: dict[int, str]) -> list[str]:
    """The classes whose ROI Name stays TotalSegmentator's own (no TG-263 name)."""
    return [name for _, name in sorted(classes.items()) if name not in TG263]
