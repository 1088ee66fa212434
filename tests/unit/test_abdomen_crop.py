"""The liver bundle's abdomen crop (issue 16, items 5 and 6).

Item 5: a head is declined with the width of the node's own BODY, not of an eroded tissue mask (on an
air-filled skull phantom with a thin wall, the old crop's 6 mm erosion left only the inserts: "at most
70 mm wide" for a 139 mm head).

Item 6: the box ends at the top of the pelvis (− 20 mm), as the crop the network was trained with
does. With the pelvis in the block the network over-segments: on TotalSegmentator's 336 mm abdomen CT
(its tests' ``example_ct.nii.gz``, liver 1,123 mL) the node gave 1,403 mL (1.25×, Dice 0.866), the excess
in the right kidney, the hepatic flexure and the small bowel; with the box above the pelvis 1,157 mL
(1.03×, Dice 0.960). That CT ships with the tests (``tests/data/totalseg-abdomen/``, Apache-2.0), and the crop's rule is
also tested on a synthetic trunk.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.assemble.volume import build_volume, read_series
from node.errors import Declined
from node.infer.anatomy import body_mask
from node.infer.crop import PELVIS_MIN_DEPTH_MM, abdomen_box, body_width_mm
from node.infer.manifest import load_bundle
from node.infer.orient import reorientation
from node.model.volume import Volume

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
HEAD = SHARED / "ct" / "philips-head-5mm" / "S2010"
#: TotalSegmentator's 336 mm abdomen CT, shipped with the tests (tests/data/totalseg-abdomen/README.md: Apache-2.0).
ABDOMEN = ROOT / "tests" / "data" / "totalseg-abdomen"
LIVER = load_bundle(ROOT / "engines" / "liver")
MAX_MM = (408.0, 408.0, 489.0)


def _engine():
    from node.infer.backends.onnxrt import OnnxRuntimeEngine

    assert LIVER.model_file is not None
    return OnnxRuntimeEngine(LIVER.model_file, input_name=LIVER.input_name, output_name=LIVER.output_name)


@pytest.mark.skipif(not HEAD.exists(), reason=f"{HEAD} is absent (shared test data)")
def test_a_head_is_declined_with_the_width_of_the_nodes_own_body() -> None:
    from node.infer.segment import segment_volume

    files = [p for p in sorted(HEAD.iterdir()) if p.is_file() and p.name != "DIRFILE"]
    volume = build_volume(read_series(files))
    # The skull phantom with its bone thinned to a 2 mm wall: inserts stand free in its air.
    hu = volume.voxels.copy()
    for k in range(hu.shape[0]):
        depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(hu[k] > -400)) * volume.geometry.spacing[1]
        hu[k][(depth > 2.0) & (depth < 15.0) & (hu[k] > -400)] = -1000.0
    with pytest.raises(Declined, match="needs the trunk in the field") as declined:
        segment_volume(Volume(hu, volume.geometry, []), LIVER, _engine())
    found = re.search(r"at most (\d+) mm wide", str(declined.value))
    assert found is not None, str(declined.value)
    turn = reorientation(volume.geometry, "SAR")
    body = turn.apply(body_mask(hu, volume.geometry))
    width = body_width_mm(body, turn.spacing(volume.geometry.spacing)[2])
    assert 130 <= width <= 150, f"BODY of the head phantom is {width:.0f} mm wide"
    # The crop measures BODY on ~3 mm block means: within one of their voxels, and the message rounds.
    assert abs(float(found.group(1)) - width) <= 3.5, f"{declined.value} — BODY is {width:.1f} mm wide"


def _trunk(slices: int, pelvis_mm: float | None,
           kidney_hu: float = 0.0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A "SAR" trunk at 3 mm: 0 HU ellipse on a couch, lungs in the top 90 mm, a spine, ribs down to
    120 mm below the lung base, kidneys (``kidney_hu``) below them, iliac wings from ``pelvis_mm`` down."""
    s = (3.0, 3.0, 3.0)
    z, y, x = np.meshgrid(np.arange(slices) * s[0], (np.arange(110) - 55) * s[1], (np.arange(130) - 65) * s[2],
                          indexing="ij")
    top = slices * s[0]
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    body = (x / 170) ** 2 + (y / 110) ** 2 < 1
    hu[body] = 0.0
    lungs = ((np.abs(x) - 75) / 55) ** 2 + (y / 75) ** 2 < 1
    hu[lungs & (z >= top - 90)] = -850.0
    hu[(x ** 2 + (y + 70) ** 2 < 18 ** 2) & body] = 400.0  # vertebral bodies
    ring = ((x / 160) ** 2 + (y / 100) ** 2 < 1) & ((x / 150) ** 2 + (y / 90) ** 2 > 1)
    ribs = ring & (np.cos(np.arctan2(y, x) * 12) > 0.6) & (z >= top - 210)
    hu[ribs] = 500.0
    kidneys = ((np.abs(x) - 70) / 30) ** 2 + ((y + 50) / 25) ** 2 < 1
    hu[kidneys & (z < top - 150) & (z >= top - 260)] = kidney_hu
    if pelvis_mm is not None:
        wings = ((np.abs(x) - 110) / 35) ** 2 + ((y + 30) / 45) ** 2 < 1
        hu[wings & (z < pelvis_mm)] = 450.0
    hu[:, 4:6, :] = 100.0  # the couch, posterior
    return hu, s


def test_the_box_ends_above_the_pelvis() -> None:
    hu, s = _trunk(150, pelvis_mm=150.0, kidney_hu=250.0)  # enhanced kidneys are no pelvis
    found = abdomen_box(hu, s, MAX_MM)
    assert found.lung_base_index is not None and abs(found.lung_base_index - 120) <= 2
    assert found.box[0].stop == found.lung_base_index + round(70.0 / 3.0)  # the lung base + 70 mm
    assert found.pelvis_index is not None and abs(found.pelvis_index * 3.0 - 150.0) <= 12.0
    assert found.box[0].start == found.pelvis_index - round(20.0 / 3.0)
    # No pelvis in the field: the model's whole height below the top (or the series' bottom).
    found = abdomen_box(_trunk(150, pelvis_mm=None, kidney_hu=250.0)[0], s, MAX_MM)
    assert found.pelvis_index is None and found.box[0] == slice(143 - 136, 143)
    # A pelvis close below the top (a short trunk): the box still reaches PELVIS_MIN_DEPTH_MM down.
    hu, s = _trunk(60, pelvis_mm=60 * 3.0 - 30.0)
    found = abdomen_box(hu, s, MAX_MM)
    top = found.box[0].stop
    assert found.pelvis_index is not None and (top - found.pelvis_index) * 3.0 >= PELVIS_MIN_DEPTH_MM


@pytest.mark.skipif(not (ABDOMEN / "example_ct.nii.gz").exists(),
                    reason=f"{ABDOMEN}/example_ct.nii.gz is absent (TotalSegmentator's 336 mm abdomen CT)")
def test_liver_is_not_over_segmented_on_an_abdomen_with_its_pelvis() -> None:
    from node.infer.segment import segment_volume
    from tests.harness.nifti import load_nifti_volume

    voxels, geometry = load_nifti_volume(ABDOMEN / "example_ct.nii.gz")
    reference = load_nifti_volume(ABDOMEN / "liver.nii.gz")[0] > 0.5
    labels = segment_volume(Volume(voxels.astype(np.float32), geometry, []), LIVER, _engine())
    liver = labels == 1
    ratio = liver.sum() / reference.sum()
    dice = 2 * (liver & reference).sum() / (liver.sum() + reference.sum())
    assert 0.92 <= ratio <= 1.08 and dice >= 0.95, f"liver {ratio:.3f}× the reference, Dice {dice:.4f}"
