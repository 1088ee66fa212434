"""A bundle of many structures (TotalSegmentator scale) and a synthetic label map of them, for the write benchmark
and the many-structures tests.

The labels are coded like an imported TotalSegmentator bundle: when the ``totalsegmentator`` package is installed,
names, SNOMED CT codes and colours come from its own mapping (``totalsegmentator_snomed_mapping.csv``, in its class
order); otherwise a few real codes are repeated (not each structure's own) under the TG-263 table's label names, then
numbered names. A handful carry TG-263 ROI names.

The label map puts one ellipsoid per structure in a grid of cells over the volume (5 × 5 in-plane, as many layers
along the stack as needed), each with its own radii: organ-sized pieces spanning tens of slices, so a SEG that keeps
only non-empty frames has a few thousand frames for 117 structures on 300 slices, as a real whole-body result has.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np

from node.infer.manifest import discover_bundles
from node.model.bundle import Bundle, Code, Label

ENGINES = Path(__file__).resolve().parents[2] / "engines"
SCT = "SCT"
ANATOMY = Code(SCT, "123037004", "Anatomical Structure")
#: TG-263 names of some TotalSegmentator structures (the importer sets them for every one).
TG263 = {"spinal_cord": "SpinalCord", "kidney_left": "Kidney_L", "kidney_right": "Kidney_R", "heart": "Heart",
         "liver": "Liver", "spleen": "Spleen", "esophagus": "Esophagus", "urinary_bladder": "Bladder",
         "femur_left": "Femur_L", "femur_right": "Femur_R", "brain": "Brain", "trachea": "Trachea"}
#: Used when totalsegmentator is not installed: real SNOMED CT codes, repeated under numbered names.
FALLBACK_TYPES = (Code(SCT, "10200004", "Liver"), Code(SCT, "64033007", "Kidney"), Code(SCT, "80891009", "Heart"),
                  Code(SCT, "78961009", "Spleen"), Code(SCT, "15825003", "Aorta"), Code(SCT, "39607008", "Lung"))
GRID = 5  # cells per in-plane axis


def _coded() -> list[tuple[str, Code, tuple[int, int, int]]]:
    """(name, type, colour) of TotalSegmentator's structures, from its own SNOMED mapping; [] without the package."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or spec.origin is None:
        return []
    mapping = Path(spec.origin).parent / "resources" / "totalsegmentator_snomed_mapping.csv"
    if not mapping.is_file():
        return []
    from totalsegmentator.map_to_binary import class_map

    with mapping.open(newline="", encoding="utf-8") as f:
        rows = {row["Structure"]: row for row in csv.DictReader(f)}
    coded = []
    for name in class_map["total"].values():
        row = rows.get(name)
        if row is None:
            continue
        meaning = row["SegmentedPropertyTypeCodeSequence.CodeMeaning"]
        modifier = row.get("SegmentedPropertyTypeModifierCodeSequence.CodeMeaning") or ""
        rgb = tuple(int(v) for v in row["DicomRGBColor"].split(","))
        coded.append((name, Code(row["SegmentedPropertyTypeCodeSequence.CodingSchemeDesignator"],
                                 row["SegmentedPropertyTypeCodeSequence.CodeValue"],
                                 f"{meaning} {modifier}".strip()[:64]), (rgb[0], rgb[1], rgb[2])))
    return coded


def many_structure_bundle(count: int = 117) -> Bundle:
    """The built-in body-threshold bundle with ``count`` (1–255) organ labels instead of its own."""
    if not 1 <= count <= 255:
        raise ValueError(f"count is {count}; expected 1 to 255 structures (one uint8 label value each)")
    base = discover_bundles(ENGINES, ("body-threshold",))[0]
    coded = _coded()
    labels = []
    for value in range(1, count + 1):
        if value <= len(coded):
            name, code, rgb = coded[value - 1]
        else:  # the TG-263 ones first, so that tests can name them either way
            code = FALLBACK_TYPES[value % len(FALLBACK_TYPES)]
            name = list(TG263)[value - 1] if value <= len(TG263) else f"structure_{value:03d}"
            rgb = ((value * 53) % 256, (value * 97) % 256, (value * 193) % 256)
        labels.append(Label(value, name, ANATOMY, code, rgb, "ORGAN", roi_name=TG263.get(name, "")))
    return dataclasses.replace(base, name="many-structures", labels=tuple(labels))


def many_structure_labels(shape: tuple[int, int, int], count: int = 117, seed: int = 12) -> np.ndarray:
    """A (slices, rows, cols) uint8 label map holding label values 1..``count``, one ellipsoid each."""
    slices, rows, cols = shape
    layers = math.ceil(count / GRID**2)
    depth, height, width = slices / layers, rows / GRID, cols / GRID
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, count + 1):
        cell = value - 1
        layer, row, col = cell // GRID**2, (cell // GRID) % GRID, cell % GRID
        centre = ((layer + 0.5) * depth, (row + 0.5) * height, (col + 0.5) * width)
        radii = (depth * rng.uniform(0.25, 0.5), height * rng.uniform(0.2, 0.45), width * rng.uniform(0.2, 0.45))
        lo = [max(0, int(c - r)) for c, r in zip(centre, radii, strict=True)]
        hi = [min(n, int(math.ceil(c + r)) + 1) for c, r, n in zip(centre, radii, shape, strict=True)]
        k, i, j = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = (((k - centre[0]) / radii[0]) ** 2 + ((i - centre[1]) / radii[1]) ** 2
                  + ((j - centre[2]) / radii[2]) ** 2) <= 1.0
        box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box[inside] = value
    return labels
