"""Coded labels for an imported model: every ``dataset.json`` label needs a SNOMED CT code for the SEG.

The codes come from a ``--labels-map`` CSV with a header row::

    name,code,meaning,rt_roi_type,color
    liver,10200004,Liver,ORGAN,#dd8265

``name`` is the label's name in dataset.json; ``code`` and ``meaning`` its SNOMED CT code (scheme SCT,
category "Anatomical Structure" unless ``category_code``/``category_meaning`` columns say otherwise);
``rt_roi_type`` the RTSTRUCT interpreted type; ``color`` ``#rrggbb`` or ``r g b``. A label without a row
is refused: the importer never invents a code.
"""

from __future__ import annotations

import csv
from pathlib import Path

from node.errors import BundleError
from node.model.bundle import RT_ROI_TYPES, Code, Label

ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
REQUIRED = ("name", "code", "meaning", "rt_roi_type", "color")


def _color(text: str, where: str) -> tuple[int, int, int]:
    text = text.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16))
        parts = [int(p) for p in text.replace(",", " ").replace(";", " ").split()]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise BundleError(f"{where}: color {text!r}; expected #rrggbb or three integers 0-255")
    return (parts[0], parts[1], parts[2])


def read_labels_map(path: Path) -> dict[str, Label]:
    """The CSV's rows by label name (value 0: the caller sets it)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BundleError(f"{path}: cannot read the labels map ({exc})") from None
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if not rows or missing:
        raise BundleError(f"{path}: expected a header row with the columns {', '.join(REQUIRED)} and one row per "
                          f"label; missing {missing or 'every row'}")
    found: dict[str, Label] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        values = {k: (row.get(k) or "").strip() for k in (*REQUIRED, "category_code", "category_meaning")}
        if not all(values[c] for c in REQUIRED):
            raise BundleError(f"{where}: empty {[c for c in REQUIRED if not values[c]]}; every column is needed")
        if not values["code"].isdigit():
            raise BundleError(f"{where}: code {values['code']!r}; expected a SNOMED CT concept id (digits)")
        if values["rt_roi_type"] not in RT_ROI_TYPES:
            raise BundleError(f"{where}: rt_roi_type {values['rt_roi_type']!r}; expected one of {sorted(RT_ROI_TYPES)}")
        category = ANATOMICAL_STRUCTURE
        if values["category_code"]:
            category = Code("SCT", values["category_code"], values["category_meaning"] or values["category_code"])
        found[values["name"]] = Label(value=0, name=values["name"], category=category,
                                      type=Code("SCT", values["code"], values["meaning"]),
                                      color_rgb=_color(values["color"], where), rt_roi_type=values["rt_roi_type"])
    return found


def coded_labels(labels: tuple[tuple[int, str], ...], labels_map: Path | None, dataset_json: Path) -> tuple[Label, ...]:
    """Each (value, name) of dataset.json with its code; refuse, naming them, the labels without one."""
    known = read_labels_map(labels_map) if labels_map is not None else {}
    missing = [name for _, name in labels if name not in known]
    if missing:
        source = f"{labels_map} has no row for them" if labels_map else "no --labels-map was given"
        raise BundleError(
            f"{dataset_json}: labels {missing} have no SNOMED CT code ({source}); pass --labels-map CSV with the "
            f"header {','.join(REQUIRED)} and one row per label (e.g. liver,10200004,Liver,ORGAN,#dd8265); "
            "the importer never invents a code")
    out = []
    for value, name in labels:
        label = known[name]
        out.append(Label(value=value, name=name, category=label.category, type=label.type,
                         color_rgb=label.color_rgb, rt_roi_type=label.rt_roi_type))
    return tuple(out)
