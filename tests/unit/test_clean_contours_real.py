"""Clean External contours on real CT (issue 16, item 1), read back as a planning system reads them.

Real series from ``../shared/data`` (skipped when it is absent):

- the 20-slice Siemens abdomen, its BODY from the node's rules, with the noise a real chest CT's BODY
  had (issue 16) added to the label volume here: specks of 1–19 px outside the skin and pockets of
  1–46 px where the back meets the table;
- the Philips 5 mm head phantom through the whole offline pipeline (``run_job``), whose separate
  phantom parts are genuine parts.

Each RTSTRUCT must hold, per slice, one outer contour per part of the SEG's BODY (no hole, nothing under
the minimum area); its contours, filled by pixel centres, must give back the SEG's pixels exactly; and
no contour point may lie half a pixel from the traced outline of those pixels.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from scipy import ndimage

from node.assemble.volume import build_volume, read_series
from node.infer.manifest import discover_bundles
from node.infer.segment import segment_volume
from node.jobs.pipeline import derive_missing_filing_uids, run_job
from node.model.bundle import Bundle
from node.model.volume import Volume
from node.write.clean import clean_labels
from node.write.contour_check import check_contours
from node.write.contours import mask_contours_px, trace_label
from node.write.files import write_results
from node.write.result import Result, present_labels
from node.write.uids import ResultUids
from tests.harness.contour_geometry import add_body_noise, distance_to_outline, rasterise, rtstruct_polygons_px
from tests.harness.writing import PROV

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ABDOMEN = SHARED / "ct" / "totalseg-abdomen-20-j2k"
HEAD = SHARED / "ct" / "philips-head-5mm" / "S2010"
ENGINES = Path(__file__).resolve().parents[2] / "engines"
FOUR = ndimage.generate_binary_structure(2, 1)


def _need(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared real-data folder is not on this machine)")


def _bundle() -> Bundle:
    return discover_bundles(ENGINES, ("body-lungs",))[0]


def _check_rtstruct_against_seg(rt_path: Path, seg_path: Path, volume: Volume, bundle: Bundle) -> np.ndarray:
    """The RTSTRUCT's BODY against the SEG's: parts, holes, areas, pixels, displacement. The SEG's BODY."""
    headers = volume.headers
    seg = hd.seg.segread(seg_path)
    numbers = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    uids = [str(h.SOPInstanceUID) for h in headers]
    seg_body = seg.get_pixels_by_source_instance(uids, segment_numbers=[numbers["BODY"]],
                                                 combine_segments=False)[..., 0] > 0
    rt: Dataset = dcmread(rt_path)
    polygons = rtstruct_polygons_px(rt, headers)["BODY"]
    body = next(label for label in bundle.labels if label.name == "BODY")
    rule = bundle.contours.rule(body)
    pixel_mm2 = abs(volume.geometry.spacing[1] * volume.geometry.spacing[2])
    traced: dict[int, list[np.ndarray]] = {}
    for k, outline in mask_contours_px(seg_body):
        traced.setdefault(k, []).append(outline)
    for k in range(len(headers)):
        parts, count = ndimage.label(seg_body[k], structure=FOUR)
        sizes = np.bincount(parts.ravel())[1:] * pixel_mm2
        contours = polygons.get(k, [])
        assert len(contours) == count, f"slice {k}: {len(contours)} contours for {count} parts"
        assert (sizes >= rule.min_island_mm2).all(), f"slice {k}: parts of {np.round(sizes, 1)} mm²"
        assert not ndimage.binary_fill_holes(seg_body[k])[~seg_body[k]].any(), f"slice {k} has a hole"
        if not contours:
            continue
        assert np.array_equal(rasterise(contours, seg_body.shape[1:]), seg_body[k]), f"slice {k}"
        moved = distance_to_outline(np.concatenate(contours), traced[k])
        assert moved.max() < 0.5, f"slice {k}: a contour point {moved.max():.3f} px from the traced outline"
    return seg_body


def test_noisy_real_abdomen_body_is_one_clean_outline_per_part(tmp_path: Path) -> None:
    _need(ABDOMEN)
    volume = build_volume(read_series(sorted(p for p in ABDOMEN.iterdir() if p.name.startswith("CT."))))
    derive_missing_filing_uids(volume)
    bundle = _bundle()
    labels = segment_volume(volume, bundle, None)
    original = labels > 0
    specks, pockets = add_body_noise(labels, np.random.default_rng(16))
    assert specks.any() and pockets.any()
    noisy = check_contours(list(bundle.labels[:1]), [trace_label(labels, 1, volume.geometry, (2, 3))], bundle,
                           volume.geometry)[0]
    assert noisy.holes > 0 and noisy.tiny > 0  # what issue 16 saw, before cleaning
    clean_labels(labels, bundle, volume.geometry)
    result = Result(volume, labels, bundle, present_labels(labels, bundle), ResultUids.for_job("real"), PROV)
    objects = {o.kind: o for o in write_results(result, tmp_path)}
    [check] = [c for c in objects["RTSTRUCT"].contour_checks if c.name == "BODY"]
    assert (check.holes, check.tiny) == (0, 0)
    seg_body = _check_rtstruct_against_seg(objects["RTSTRUCT"].path, objects["SEG"].path, volume, bundle)
    assert not (seg_body & specks).any()  # every speck dropped
    assert seg_body[pockets].all() and (seg_body >= original).all()  # every pocket filled, nothing of the body lost


def test_real_head_through_the_pipeline_reports_clean_contours(tmp_path: Path) -> None:
    _need(HEAD)
    bundle = _bundle()
    files = sorted(p for p in HEAD.iterdir() if p.name != "DIRFILE")  # the DICOMDIR-like index is no image
    outcome = run_job(files, bundle, None, tmp_path / "out", provenance=PROV)
    body_note = next(part for part in outcome.contours.split("; ") if part.startswith("BODY "))
    assert body_note.endswith(", 0 holes, 0 tiny"), outcome.contours
    assert "clean" in outcome.timings
    paths = {o.kind: o.path for o in outcome.objects}
    volume = build_volume(read_series(files))
    seg_body = _check_rtstruct_against_seg(paths["RTSTRUCT"], paths["SEG"], volume, bundle)
    assert seg_body.any()
