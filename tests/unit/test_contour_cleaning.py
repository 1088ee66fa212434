"""Clean contours (issue 16, item 1): small parts dropped and holes filled on the label volume before
both writers, half-pixel smoothing that gives back the same pixels, the manifest's ``[contours]`` rules,
and the writer's per-ROI check of contours, holes and tiny parts.

The noisy mask is built here the way a real chest CT's BODY came out: one body per slice with arms as
genuinely separate parts, specks of 1–19 px outside the skin, and 1–46 px holes where the back meets
the table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.errors import BundleError
from node.infer.manifest import discover_bundles, load_bundle
from node.model.bundle import ContourOptions, ContourRule, ContourSmoothing
from node.model.volume import Geometry
from node.write.clean import clean_labels, inside_pixels
from node.write.contour_check import check_contours, describe
from node.write.contours import mask_contours_px, trace_label, trace_label_px
from node.write.smoothing import SIMPLIFY_TOLERANCE_PX, SMOOTHING_CLAMP_PX
from tests.harness.contour_geometry import distance_to_outline, rasterise

ENGINES = Path(__file__).resolve().parents[2] / "engines"
BODY_LUNGS = discover_bundles(ENGINES, ("body-lungs",))[0]
PIXEL_MM = 0.8  # 0.64 mm² a pixel: the External's 50 mm² minimum is 78 px
SHIFT_LIMIT = SMOOTHING_CLAMP_PX + SIMPLIFY_TOLERANCE_PX


def _geometry(shape: tuple[int, int, int], pixel_mm: float = PIXEL_MM) -> Geometry:
    return Geometry(origin=np.zeros(3), row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
                    normal=np.array([0, 0, 1.0]), slice_step=np.array([0, 0, 2.5]), spacing=(2.5, pixel_mm, pixel_mm),
                    shape=shape)


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((r - centre[0]) / radii[0]) ** 2 + ((c - centre[1]) / radii[1]) ** 2 <= 1.0


def _noisy_body(slices: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels with noise, the clean BODY every slice should end as: body plus two arms)."""
    rng = np.random.default_rng(seed)
    shape = (120, 160)
    body = _ellipse(shape, (60, 80), (38, 50))
    arms = _ellipse(shape, (60, 12), (14, 9)) | _ellipse(shape, (60, 148), (14, 9))  # ~400 px = 250 mm² each
    clean = body | arms
    labels = np.zeros((slices, *shape), dtype=np.uint8)
    near = _near(clean, 3)
    for k in range(slices):
        labels[k][clean] = 1
        for size in rng.integers(1, 20, 25):  # specks outside the skin, 1-19 px, at least 3 px from it
            r, c = rng.integers(1, shape[0] - 6), rng.integers(1, shape[1] - 6)
            side = int(np.ceil(np.sqrt(size)))
            speck = np.zeros(shape, dtype=bool)
            speck[r : r + side, c : c + max(1, size // side)] = True
            if not (speck & near).any():
                labels[k][speck] = 1
        for size in rng.integers(1, 47, 12):  # air where the back meets the table, 1-46 px, inside the body
            r, c = rng.integers(78, 87), rng.integers(65, 91)
            side = int(np.ceil(np.sqrt(size)))
            labels[k, r : r + side, c : c + max(1, size // side)] = 0
    return labels, np.broadcast_to(clean, labels.shape)


def _near(mask: np.ndarray, distance: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=distance)


def test_the_external_ends_as_one_contour_per_part_without_holes_or_specks() -> None:
    labels, clean = _noisy_body()
    geometry = _geometry(labels.shape)
    before = trace_label(labels, 1, geometry, (2, 3))
    [body_check] = check_contours([BODY_LUNGS.labels[0]], [before], BODY_LUNGS, geometry)
    assert body_check.holes > 0 and body_check.tiny > body_check.holes  # the noise is there to clean
    report = clean_labels(labels, BODY_LUNGS, geometry)
    assert np.array_equal(labels > 0, clean)
    body = report[0]
    assert body.name == "BODY" and body.parts_dropped > 0 and body.holes_filled > 0
    after = trace_label(labels, 1, geometry, (2, 3), smooth=True)
    [check] = check_contours([BODY_LUNGS.labels[0]], [after], BODY_LUNGS, geometry)
    # body and two arms on every slice, no hole, nothing tiny
    assert (check.contours, check.holes, check.tiny, check.slices) == (3 * len(labels), 0, 0, len(labels))
    assert np.bincount(after.slices).tolist() == [3] * len(labels)
    assert (after.areas_px > 0).all()
    assert ((after.areas_px + 0.5) * PIXEL_MM**2 >= BODY_LUNGS.contours.rule(BODY_LUNGS.labels[0]).min_island_mm2).all()
    assert len(after.points_lps) < len(trace_label(labels, 1, geometry, (2, 3)).points_lps)  # fewer points
    assert describe([check]) == f"BODY {3 * len(labels)} on {len(labels)} slices, 0 holes, 0 tiny"


def test_organ_rules_drop_into_the_including_structure_and_fill_only_what_is_theirs() -> None:
    labels = np.zeros((1, 60, 60), dtype=np.uint8)
    labels[0, 5:55, 5:55] = 1  # BODY
    labels[0, 10:40, 10:30] = 2  # Lung_L
    labels[0, 45:48, 40:43] = 2  # a 9 px (5.8 mm²) piece of lung: dropped, stays BODY
    labels[0, 15:17, 15:17] = 1  # a 4 px vessel in the lung (2.6 mm² hole): filled with lung
    labels[0, 22:28, 14:20] = 1  # a 36 px (23 mm²) hole: kept (this rule keeps holes of 20 mm² and more)
    labels[0, 32:37, 22:27] = 3  # a 25 px hole (16 mm², under 20) holding another structure: left as it is
    lung_l_holes = ((2, ContourRule(min_island_mm2=10.0, min_hole_mm2=20.0)),)
    clean_labels(labels, dataclasses.replace(BODY_LUNGS, contours=ContourOptions(lung_l_holes)),
                 _geometry(labels.shape))
    assert (labels[0, 45:48, 40:43] == 1).all()
    assert (labels[0, 15:17, 15:17] == 2).all()
    assert (labels[0, 22:28, 14:20] == 1).all()
    assert (labels[0, 32:37, 22:27] == 3).all()
    assert (labels[0, 5:55, 5:55] > 0).all()


def test_kept_external_holes_and_a_zero_minimum_change_nothing_they_should_not() -> None:
    labels = np.zeros((1, 80, 80), dtype=np.uint8)
    labels[0, 5:75, 5:75] = 1
    labels[0, 20:40, 20:40] = 0  # 400 px = 256 mm² of air kept on purpose
    labels[0, 60:62, 60:62] = 0  # 4 px = 2.6 mm²
    kept = dataclasses.replace(BODY_LUNGS, contours=ContourOptions(
        ((1, ContourRule(min_island_mm2=50.0, min_hole_mm2=100.0, keep_holes=True)),)))
    clean_labels(labels, kept, _geometry(labels.shape))
    assert (labels[0, 20:40, 20:40] == 0).all() and (labels[0, 60:62, 60:62] == 1).all()
    untouched = np.zeros((1, 20, 20), dtype=np.uint8)
    untouched[0, 2, 2] = untouched[0, 5:15, 5:15] = 1
    untouched[0, 9, 9] = 0
    copy = untouched.copy()
    off = dataclasses.replace(BODY_LUNGS, contours=ContourOptions(((1, ContourRule(0.0, 0.0, True)),)))
    assert clean_labels(untouched, off, _geometry(untouched.shape))[0].pixels_changed == 0
    assert np.array_equal(untouched, copy)


@pytest.mark.parametrize("seed", range(3))
def test_smoothing_moves_no_edge_half_a_pixel_and_gives_back_the_same_pixels(seed: int) -> None:
    """Random blobs (saddles, holes, one-pixel parts, diagonal staircases) and the noisy body."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.uniform(size=(3, 70, 90)), (0, 2.5, 2.5)) > 0.5
    blobs[1] ^= rng.uniform(size=(70, 90)) > 0.97
    noisy, _ = _noisy_body(slices=2, seed=seed)
    for stack in (blobs, noisy[:, :, :] > 0):
        traced = mask_contours_px(stack)
        smooth = mask_contours_px(stack, smooth=True)
        assert [k for k, _ in smooth] == [k for k, _ in traced]
        for k in range(len(stack)):
            outline = [p for kk, p in traced if kk == k]
            smoothed = [p for kk, p in smooth if kk == k]
            if not outline:
                continue
            moved = distance_to_outline(np.concatenate(smoothed), outline)
            back = distance_to_outline(np.concatenate(outline), smoothed)
            assert moved.max() <= SHIFT_LIMIT + 1e-9 and SHIFT_LIMIT < 0.5
            assert back.max() < 0.5
            assert np.array_equal(rasterise(smoothed, stack.shape[1:]), stack[k])
            assert np.array_equal(rasterise(outline, stack.shape[1:]), stack[k])


def test_contours_table_in_a_manifest(tmp_path: Path) -> None:
    text = (ENGINES / "body-lungs" / "manifest.toml").read_text()
    head, _, rest = text.partition("[algorithm]")
    head = head.split("[contours]")[0]  # the bundle's own table, replaced here

    def bundle_with(table: str):
        (tmp_path / "manifest.toml").write_text(head + table + "\n[algorithm]" + rest)
        return load_bundle(tmp_path)

    body, lung_l, lung_r = BODY_LUNGS.labels
    plain = bundle_with("")
    assert plain.contours.rule(body) == ContourRule(min_island_mm2=50.0, keep_holes=False)
    assert plain.contours.rule(lung_l) == ContourRule()
    tuned = bundle_with('[contours]\nsmoothing = "none"\nmin_hole_mm2 = 5\n'
                        "[contours.roi_types.EXTERNAL]\nkeep_holes = true\nmin_hole_mm2 = 400.0\n"
                        "[contours.labels.Lung_R]\nmin_island_mm2 = 0\n")
    assert tuned.contours.rule(body) == ContourRule(50.0, 400.0, True, ContourSmoothing.NONE)
    assert tuned.contours.rule(lung_l) == ContourRule(10.0, 5.0, True, ContourSmoothing.NONE)
    assert tuned.contours.rule(lung_r) == ContourRule(0.0, 5.0, True, ContourSmoothing.NONE)
    with pytest.raises(BundleError, match=r"contours.roi_types.ORGANS' names no RT ROI interpreted type"):
        bundle_with("[contours.roi_types.ORGANS]\nmin_island_mm2 = 1\n")
    with pytest.raises(BundleError, match=r"contours.labels.Heart' names no label of this bundle"):
        bundle_with("[contours.labels.Heart]\nmin_island_mm2 = 1\n")
    with pytest.raises(BundleError, match=r"contours.min_island_mm2' is -1.0; expected a non-negative number"):
        bundle_with("[contours]\nmin_island_mm2 = -1\n")
    with pytest.raises(BundleError, match=r"contours.smoothing' is 'gaussian'; expected one of 'none', 'half-pixel'"):
        bundle_with('[contours]\nsmoothing = "gaussian"\n')
    with pytest.raises(BundleError, match=r"unknown key\(s\) 'contours.min_islands_mm2'"):
        bundle_with("[contours]\nmin_islands_mm2 = 3\n")


def test_parts_at_the_image_edge_are_measured_whole() -> None:
    """A window clipped by the image's edge is padded with background: a speck in a corner is whole."""
    labels = np.zeros((1, 40, 40), dtype=np.uint8)
    labels[0, 0, 0] = labels[0, 39, 20:22] = labels[0, 15:17, 39] = 1  # specks on the corner and two edges
    labels[0, 0:20, 10:30] = 1  # a large part touching the top edge: stays
    labels[0, 8, 12] = 0  # a one-pixel hole near the edge: filled
    report = clean_labels(labels, BODY_LUNGS, _geometry(labels.shape))
    expected = np.zeros((40, 40), dtype=bool)
    expected[0:20, 10:30] = True
    assert np.array_equal(labels[0] > 0, expected)
    assert (report[0].parts_dropped, report[0].holes_filled, report[0].pixels_changed) == (3, 1, 6)


@pytest.mark.parametrize("seed", range(3))
def test_each_outline_filled_alone_gives_back_the_mask_by_even_odd(seed: int) -> None:
    """inside_pixels fills every traced outline on its own; their even-odd sum is the mask, pixel for pixel."""
    rng = np.random.default_rng(seed)
    stack = ndimage.gaussian_filter(rng.uniform(size=(4, 50, 70)), (0, 1.5, 1.5)) > 0.5
    stack[0] ^= rng.uniform(size=(50, 70)) > 0.9  # saddles and single pixels
    stack[1, :, :3] = stack[2, :2, :] = True  # touching the image's edges
    traced = trace_label_px(stack.astype(np.uint8), 1)
    _, k, i, j = inside_pixels(traced, np.arange(len(traced.slices)))
    counts = np.zeros(stack.shape, dtype=np.int64)
    np.add.at(counts, (k, i, j), 1)
    assert np.array_equal(counts % 2 == 1, stack)
    single = np.flatnonzero(traced.areas == 0.5)  # one-pixel parts: exactly their pixel
    _, k, i, j = inside_pixels(traced, single)
    assert len(k) == len(single) and stack[k, i, j].all()
