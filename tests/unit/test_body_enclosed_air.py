"""BODY around enclosed air (issue 16, item 2): an air-filled skull must be filled like a head.

The Philips head series of ``../shared/data/ct/philips-head-5mm`` is a skull phantom: a bone shell
with air (−1000 HU) inside, around plastic inserts. Where its bone is thin, partial volume in 5 mm
slices brings it below the BODY threshold (−400 HU), so a plane-by-plane hole fill finds the inside
of the skull open to the outside and BODY dropped it (55 and 98 cm² on slices 8 and 10 instead of
~160 and ~190 cm²).

The yardstick is the same series with the skull filled with brain (40 HU): there BODY is a solid
head and no fill is needed. The air-filled skull must give the same BODY area on every vault slice,
as it is, with a 4 mm cut through its wall on six slices (a real gap wider than the bone), cut by the
image's edge (a field of view narrower than the head: the air inside reaches the image edge), and with
its bone thinned to a 2 mm wall round inserts that touch it nowhere (the opening that separates the
couch removes such a wall; it comes back as a shell around the inserts, and its dome above them plane
after plane).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.assemble.volume import build_volume, read_series
from node.infer.anatomy import body_mask
from node.infer.anatomy_grid import fill_enclosed_inplane, fill_holes_inplane
from node.model.volume import Geometry

HEAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct" / "philips-head-5mm" / "S2010"
#: Vault slices (where the skull is a closed ring in the anatomy, 60–200 cm² of head).
VAULT = range(4, 25)
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, Geometry]:
    if not HEAD.exists():
        pytest.skip(f"{HEAD} is absent (shared test data)")
    files = [p for p in sorted(HEAD.iterdir()) if p.is_file() and p.name != "DIRFILE"]
    volume = build_volume(read_series(files))
    return volume.voxels, volume.geometry


def _brain_filled(hu: np.ndarray) -> np.ndarray:
    """The skull's air replaced by 40 HU, found independently of the node: holes of a small closing of
    everything above −700 HU (thin bone included), grown by two pixels to the inner table."""
    disk = np.add.outer(np.arange(-4, 5) ** 2, np.arange(-4, 5) ** 2) <= 16
    out = hu.copy()
    for k in range(hu.shape[0]):
        closed = ndimage.binary_closing(hu[k] > -700, disk, border_value=0)
        inside = ndimage.binary_dilation(ndimage.binary_fill_holes(closed) & ~closed, iterations=2)
        out[k][inside & (hu[k] < -400)] = 40.0
    return out


def _areas(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    pixel_cm2 = geometry.spacing[1] * geometry.spacing[2] / 100
    return body_mask(np.ascontiguousarray(hu), geometry).sum(axis=(1, 2)) * pixel_cm2


def _assert_same(air: np.ndarray, brain: np.ndarray, what: str, slices: range = VAULT) -> None:
    ratio = {k: round(float(air[k] / brain[k]), 3) for k in slices}
    bad = {k: r for k, r in ratio.items() if abs(r - 1) > TOLERANCE}
    assert not bad, f"{what}: BODY area (air-filled / brain-filled) off by more than {TOLERANCE:.0%} on {bad}"


def test_air_filled_skull_is_filled_like_a_head(head) -> None:
    hu, geometry = head
    brain = _areas(_brain_filled(hu), geometry)
    assert np.all(brain[list(VAULT)] >= 60)  # the yardstick is a head on every vault slice
    _assert_same(_areas(hu, geometry), brain, "as scanned")


def test_a_cut_through_the_skull_and_a_field_of_view_cutting_the_head(head) -> None:
    hu, geometry = head
    brain_hu = _brain_filled(hu)
    brain = _areas(brain_hu, geometry)
    cut = hu.copy()
    wall = cut[9:15, 250:259, :256]  # 4 mm of rows through the patient's right wall, slices 9–14
    wall[wall > -900] = -1000.0
    _assert_same(_areas(cut, geometry), brain, "4 mm cut through the bone")
    # The image starts 150 columns (68 mm) in: its left edge cuts through the skull and its air.
    c0 = 150
    narrow = dataclasses.replace(geometry, origin=geometry.origin + c0 * geometry.spacing[2] * geometry.row_dir,
                                 shape=(hu.shape[0], hu.shape[1], hu.shape[2] - c0))
    assert np.any(hu[VAULT.start:VAULT.stop, :, c0] < -900)
    # Above the orbits (which the cut opens onto the edge, where filling them is as right as not).
    _assert_same(_areas(hu[:, :, c0:], narrow), _areas(brain_hu[:, :, c0:], narrow), "cut by the image's edge",
                 slices=range(7, VAULT.stop))


def thin_walled(hu: np.ndarray, spacing_mm: float, wall_mm: float = 2.0) -> np.ndarray:
    """The phantom with its bone thinned to the outer ``wall_mm`` (deeper bone, to 15 mm in, made air):
    a thin-walled air phantom whose inserts stand free in the air, touching no wall."""
    out = hu.copy()
    for k in range(hu.shape[0]):
        depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(hu[k] > -400)) * spacing_mm
        out[k][(depth > wall_mm) & (depth < 15.0) & (hu[k] > -400)] = -1000.0
    return out


def test_thin_walled_phantom_with_free_standing_inserts(head) -> None:
    hu, geometry = head
    thin = thin_walled(hu, geometry.spacing[1])
    inserts = ndimage.label(thin[12] > -400)[0]
    assert inserts.max() >= 4  # the wall, the cradle and inserts apart from both
    _assert_same(_areas(thin, geometry), _areas(_brain_filled(hu), geometry), "2 mm wall")


def test_enclosed_fill_closes_narrow_gaps_but_not_slits_or_wide_openings() -> None:
    """The rule itself, on one plane: a ring with a 3-pixel gap is filled for a 5-pixel disk, with a
    9-pixel gap it is not; a slit two pixels wide is never filled; a ring cut by the image's edge is filled."""
    plane = np.zeros((1, 60, 60), dtype=bool)
    yy, xx = np.ogrid[:60, :60]
    ring = (np.hypot(yy - 30, xx - 30) <= 20) & (np.hypot(yy - 30, xx - 30) > 17)
    inside = np.hypot(yy - 30, xx - 30) <= 17
    plane[0] = ring & ~((np.abs(yy - 30) <= 1) & (xx > 40))  # a gap of three rows
    assert not fill_holes_inplane(plane)[0][inside].all()
    assert fill_enclosed_inplane(plane, 2)[0][inside].all()
    wide = ring & ~((np.abs(yy - 30) <= 4) & (xx > 40))  # nine rows
    plane[0] = wide
    assert not fill_enclosed_inplane(plane, 2)[0][inside].any()
    slit = np.ones((1, 60, 60), dtype=bool)
    slit[0, 10:50, 29:31] = False  # two columns, open at the top
    slit[0, :10, 20:40] = False
    assert not fill_enclosed_inplane(slit, 2)[0, 10:50, 29:31].any()
    cut = np.zeros((1, 60, 45), dtype=bool)
    cut[0] = ring[:, 15:]  # the left edge of the image cuts the ring and its inside
    assert not fill_holes_inplane(cut)[0][inside[:, 15:]].all()
    assert fill_enclosed_inplane(cut, 2)[0][inside[:, 15:]].all()
