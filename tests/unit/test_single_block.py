"""Single-block inference (the liver bundle's path): median, reorientation, edge-aligned resampling,
block placement, coverage and the crop — each against an independent computation — and, on real data,
the liver model against TotalSegmentator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.assemble.volume import build_volume, read_series
from node.errors import Declined
from node.infer.block import image_probabilities, place_in_block, segment_single_block
from node.infer.coverage import check_coverage
from node.infer.crop import abdomen_box
from node.infer.manifest import load_bundle
from node.infer.median import median3
from node.infer.orient import reorientation
from node.infer.transforms import mask_to_grid, resample_centred
from node.model.enums import Crop
from node.model.volume import Geometry, Volume

ENGINES = Path(__file__).resolve().parents[2] / "engines"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
LIVER = load_bundle(ENGINES / "liver")

#: (row_dir, col_dir) of acquisitions: axial head-first supine, feet-first supine, head-first prone,
#: sagittal, coronal, and an axial one rotated 10° in plane.
_C, _S = np.cos(np.radians(10)), np.sin(np.radians(10))
ORIENTATIONS = {
    "axial-HFS": ((1, 0, 0), (0, 1, 0)),
    "axial-FFS": ((-1, 0, 0), (0, 1, 0)),
    "axial-HFP": ((-1, 0, 0), (0, -1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "axial-rot10": ((_C, _S, 0), (-_S, _C, 0)),
}


def _geometry(row_dir: tuple[float, ...], col_dir: tuple[float, ...], shape: tuple[int, int, int],
              spacing: tuple[float, float, float]) -> Geometry:
    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    n = np.cross(r, c)
    centre = (np.asarray(shape) - 1) / 2.0
    origin = -(centre[0] * spacing[0] * n + centre[1] * spacing[1] * c + centre[2] * spacing[2] * r)
    return Geometry(origin=origin, row_dir=r, col_dir=c, normal=n, slice_step=spacing[0] * n,
                    spacing=spacing, shape=shape)


def _points(geometry: Geometry) -> np.ndarray:
    kij = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    return geometry.to_patient(kij)  # (D, H, W, 3) LPS


def test_median3_equals_scipy_exactly() -> None:
    rng = np.random.default_rng(7)
    image = rng.normal(0, 100, (6, 29, 37)).astype(np.float32)
    image[2, 4:9, :] = 12.0  # ties
    assert np.array_equal(median3(image), ndimage.median_filter(image, size=3, mode="nearest"))
    steps = rng.integers(-3, 3, (5, 17, 19)).astype(np.float32)
    assert np.array_equal(median3(steps, threads=2), ndimage.median_filter(steps, size=3, mode="nearest"))


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_reorientation_to_sar_points_each_axis_the_right_way(name: str) -> None:
    geometry = _geometry(*ORIENTATIONS[name], shape=(7, 8, 9), spacing=(3.0, 2.0, 1.0))
    turn = reorientation(geometry, "SAR")
    points = _points(geometry)
    view = np.stack([turn.apply(points[..., a]) for a in range(3)], axis=-1)
    # axis 0 towards superior (+z), axis 1 towards anterior (−y), axis 2 towards patient right (−x)
    assert (np.diff(view[..., 2], axis=0) > 0).all()
    assert (np.diff(-view[..., 1], axis=1) > 0).all()
    assert (np.diff(-view[..., 0], axis=2) > 0).all()
    assert turn.obliquity_deg < 11
    assert turn.spacing(geometry.spacing) == tuple(geometry.spacing[p] for p in turn.permutation)
    for a in range(3):
        assert np.array_equal(turn.undo(turn.apply(points[..., a])), points[..., a])


def test_edge_aligned_resampling_halves_by_averaging_and_returns_home() -> None:
    rng = np.random.default_rng(3)
    fine = rng.normal(size=(8, 10, 12)).astype(np.float32)
    coarse = resample_centred(fine, (1.5, 1.5, 1.5), (3.0, 3.0, 3.0))
    expected = fine.reshape(4, 2, 5, 2, 6, 2).mean(axis=(1, 3, 5))
    assert np.allclose(coarse, expected, atol=1e-5)
    # A linear ramp survives a trip to another spacing and back (away from the clamped edges).
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 4, 4)).copy()
    there = resample_centred(ramp, (1.0, 1.0, 1.0), (2.5, 1.0, 1.0))
    back = resample_centred(there, (2.5, 1.0, 1.0), (1.0, 1.0, 1.0), out_shape=ramp.shape)
    assert np.allclose(back[3:-3], ramp[3:-3], atol=1e-4)


def test_mask_upsampling_over_its_bounding_box_equals_the_full_resampling() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        mask = np.zeros((20, 24, 22), dtype=bool)
        a = rng.integers(0, 15, 3)
        b = np.minimum(a + rng.integers(1, 8, 3), mask.shape)
        mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = rng.random(tuple(b - a)) > 0.3
        target = tuple(float(t) for t in rng.uniform(0.5, 2.9, 3))
        shape = tuple(int(round(n * 3.0 / t)) for n, t in zip(mask.shape, target, strict=True))
        full = resample_centred(mask.astype(np.float32), (3.0, 3.0, 3.0), target, out_shape=shape) > 0.5  # type: ignore[arg-type]
        assert np.array_equal(mask_to_grid(mask, (3.0, 3.0, 3.0), target, shape), full)  # type: ignore[arg-type]


def test_block_placement_and_output_mapping_are_inverse() -> None:
    rng = np.random.default_rng(5)
    b, m = 27, 4
    for shape in [(10, 12, 14), (30, 9, 31)]:  # smaller and (on axes 0, 2) larger than the output
        image = rng.normal(size=shape).astype(np.float32)
        block = place_in_block(image, (b, b, b), pad_value=-9.0)
        assert (block == -9.0).sum() == b**3 - np.prod([min(n, b) for n in shape])
        output = block[0, :, m:-m, m:-m, m:-m]  # a network that crops m voxels per side
        probs = image_probabilities(output, shape, (b, b, b), m)[0]
        # Image voxel i sits at block index i + b//2 - n//2, i.e. output index i + b//2 - n//2 - m.
        window = []
        for n in shape:
            off = b // 2 - n // 2
            window.append(slice(max(0, m - off), min(n, b - m - off)))
        assert np.array_equal(probs[tuple(window)], image[tuple(window)]), shape
        assert np.isfinite(probs).all() and probs.shape == shape


class _CroppingEngine:
    """A real Engine: the network's output is its normalised input, cropped by the bundle's margin."""

    name = "cropping-identity"

    def __init__(self, margin: int) -> None:
        self.margin = margin

    def run(self, tiles: np.ndarray) -> np.ndarray:
        m = self.margin
        return tiles[:, :, m:-m, m:-m, m:-m].copy()


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_single_block_labels_land_on_the_shape_in_every_orientation(name: str) -> None:
    geometry = _geometry(*ORIENTATIONS[name], shape=(40, 48, 44), spacing=(2.5, 2.0, 2.0))
    points = _points(geometry)
    # An off-centre box: patient left, anterior and superior of the centre, so any flip misses it.
    box = (points[..., 0] > 10) & (points[..., 0] < 40) & (points[..., 1] > -35) & (points[..., 1] < -5) \
        & (points[..., 2] > 5) & (points[..., 2] < 40)
    voxels = np.where(box, 150.0, 0.0).astype(np.float32)
    bundle = dataclasses.replace(
        LIVER,
        preprocess=dataclasses.replace(LIVER.preprocess, crop=Crop.NONE, intermediate_spacing_mm=None, median_size=0),
        postprocess=dataclasses.replace(LIVER.postprocess, threshold=0.2, open_model_grid=False),
        window=dataclasses.replace(LIVER.window, block=(54, 54, 54), output_margin=5),
    )
    labels = segment_single_block(Volume(voxels, geometry, []), bundle, _CroppingEngine(5))
    found = labels == 1
    dice = 2 * (found & box).sum() / (found.sum() + box.sum())
    assert dice > 0.9, f"{name}: Dice {dice:.3f}"


def test_coverage_declines_slabs_thick_slices_and_non_axial_series() -> None:
    def geometry(slices: int, spacing: float, orientation: str = "axial-HFS") -> Geometry:
        return _geometry(*ORIENTATIONS[orientation], shape=(slices, 64, 64), spacing=(spacing, 1.0, 1.0))

    check_coverage(LIVER, geometry(60, 3.0))
    with pytest.raises(Declined, match="covers 40 mm"):
        check_coverage(LIVER, geometry(20, 2.0))
    with pytest.raises(Declined, match="7.00 mm"):
        check_coverage(LIVER, geometry(30, 7.0))
    with pytest.raises(Declined, match="90° from it"):
        check_coverage(LIVER, geometry(60, 3.0, "sagittal"))


def test_abdomen_crop_tops_out_above_the_lung_base_and_keeps_the_body() -> None:
    # 600 mm of "patient": an elliptic body (0 HU) with lungs (−850 HU) in its top 200 mm, on a couch.
    d, h, w, s = 200, 96, 96, (3.0, 5.0, 5.0)
    z, y, x = np.meshgrid(np.arange(d) * s[0], (np.arange(h) - h / 2) * s[1], (np.arange(w) - w / 2) * s[2],
                          indexing="ij")
    hu = np.full((d, h, w), -1000.0, dtype=np.float32)
    body = (x / 170) ** 2 + (y / 110) ** 2 < 1
    hu[body] = 0.0
    lungs = (((x - 70) / 50) ** 2 + (y / 70) ** 2 < 1) | (((x + 70) / 50) ** 2 + (y / 70) ** 2 < 1)
    hu[lungs & (z >= 400)] = -850.0
    hu[:, h - 8:h - 6, :] = 100.0  # the couch, posterior, not touching the body
    found = abdomen_box(hu, s, (408.0, 408.0, 489.0))
    lung_base = 400 / 3.0
    assert found.lung_base_index is not None and abs(found.lung_base_index - lung_base) <= 2
    top = found.box[0].stop
    assert abs(top - (lung_base + 70 / 3.0)) <= 2
    assert top - found.box[0].start == 136  # 408 mm at 3 mm
    rows = found.box[1]
    assert rows.stop <= h - 8, "the couch is outside the box"
    assert 300 < found.body_width_mm < 360


@pytest.mark.skipif(not (SHARED / "nifti" / "totalseg").is_dir(), reason=f"{SHARED}/nifti/totalseg not found")
def test_liver_matches_totalsegmentator_on_its_example_ct() -> None:
    from node.infer.backends.onnxrt import OnnxRuntimeEngine
    from node.infer.segment import segment_volume
    from tests.harness.nifti import load_nifti_volume

    folder = SHARED / "nifti" / "totalseg"
    voxels, geometry = load_nifti_volume(folder / "example_ct_sm.nii.gz")
    reference, _ = load_nifti_volume(folder / "example_seg.nii.gz")
    assert LIVER.model_file is not None
    engine = OnnxRuntimeEngine(LIVER.model_file, input_name=LIVER.input_name, output_name=LIVER.output_name)
    labels = segment_volume(Volume(voxels.astype(np.float32), geometry, []), LIVER, engine)
    liver, truth = labels == 1, np.rint(reference).astype(int) == 5  # TotalSegmentator "total": 5 = liver
    dice = 2 * (liver & truth).sum() / (liver.sum() + truth.sum())
    assert dice >= 0.95, f"liver Dice {dice:.3f} against TotalSegmentator"


@pytest.mark.skipif(not (SHARED / "ct" / "totalseg-abdomen-20-j2k").is_dir(), reason="20-slice abdomen CT not found")
def test_liver_declines_the_20_slice_series_with_the_reason() -> None:
    from node.infer.segment import segment_volume

    folder = SHARED / "ct" / "totalseg-abdomen-20-j2k"
    volume = build_volume(read_series(sorted(p for p in folder.iterdir() if p.name.startswith("CT"))))
    with pytest.raises(Declined, match=r"covers 40 mm \(20 slices"):
        segment_volume(volume, LIVER, None)
