"""Orientation: contours land where the shapes are.

Synthetic CT of the analytic phantom in axial, gantry-tilted (+17°, −20° about x), sagittal,
coronal and double-oblique acquisitions, each with the patient head-first and feet-first, supine
and prone (the couch is posterior for supine and anterior for prone). Every case goes through the
real pipeline (``run_job``: read → assemble → ONNX Runtime ``body-threshold`` → SEG + RTSTRUCT), and
what was written is compared with the analytic body mask (couch excluded) at every voxel centre:

* the SEG read back with highdicom, and the RTSTRUCT contours filled back into the slices they
  reference, both reach Dice ≥ 0.95 and leave the couch out;
* every contour lies in the plane of the image it references;
* slice by slice, the segmented body has the truth's centroid (LPS) and area, so left/right,
  anterior/posterior (supine vs prone) and superior/inferior (head- vs feet-first, slice order)
  all come out where the phantom is.

The reference geometry is taken from the written series itself (``SyntheticSeries`` and the
image headers), not from the node's ``Geometry``; the two are checked to agree.

Run with ``-s`` to see the per-case numbers.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from skimage.draw import polygon as fill_polygon

from node.assemble.volume import build_volume, read_series
from node.config import NodeConfig
from node.infer.backends.loader import make_engine
from node.infer.engine import Engine
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.model.bundle import Bundle
from node.write.provenance import Provenance
from tests.harness.result_checks import contour_plane_distance
from tests.harness.synthetic_ct import HU_TABLE, body_mask_lps, phantom_hu, write_ct_series

ENGINES = Path(__file__).resolve().parents[2] / "engines"
PROV = Provenance(created=dt.datetime(2026, 1, 2, 3, 4, 5))

# Small cases: 24 slices of 96 × 96 at 4 mm (a 384 mm field of view, a 96 mm deep stack).
SLICES, SIZE, SPACING_MM = 24, 96, 4.0

DICE_MIN = 0.95
TABLE_MAX_FRACTION = 0.01
#: Per-slice checks: slice centroid within this distance of the truth's (a voxel is 4 mm) ...
CENTROID_TOL_MM = 3.0
#: ... and slice area within this fraction of the truth's. Only on slices where the truth's body
#: covers at least MIN_SLICE_SHARE of the largest slice's area: a slice that grazes a surface
#: parallel to it (the flat back in a coronal stack) is dominated by partial volume at 4 mm.
AREA_TOL = 0.10
MIN_SLICE_SHARE = 0.5
#: Whole-volume centroid, in particular its y (posterior) component: supine vs prone.
GLOBAL_CENTROID_TOL_MM = 2.0


def _rot_x(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


#: Scanner (gantry) frame → patient LPS for each patient position. A scanner writes its image rows
#: and columns in the gantry frame: an axial image of a supine head-first patient has IOP
#: (1,0,0, 0,1,0), head-first prone (−1,0,0, 0,−1,0), feet-first supine (−1,0,0, 0,1,0) and
#: feet-first prone (1,0,0, 0,−1,0). So feet-first stacks run from head to feet (the slice normal
#: is −z) and prone images are upside down: the acquisitions below are written as such a scanner
#: would write them, not merely with a different PatientPosition tag.
GANTRY_TO_PATIENT: dict[str, np.ndarray] = {
    "HFS": np.diag([1.0, 1.0, 1.0]),
    "HFP": np.diag([-1.0, -1.0, 1.0]),  # 180° about the head-feet axis
    "FFS": np.diag([-1.0, 1.0, -1.0]),  # 180° about the vertical axis
    "FFP": np.diag([1.0, -1.0, -1.0]),  # 180° about the left-right axis
}


def _iop(rotation: np.ndarray) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial image rotated by ``rotation`` (row = R·x, column = R·y)."""
    return tuple(float(v) for v in (*rotation[:, 0], *rotation[:, 1]))


@dataclass(frozen=True)
class Acquisition:
    #: ImageOrientationPatient in the gantry frame (what it is for a head-first supine patient).
    orientation: tuple[float, ...]
    #: Where the centre of the stack goes: (x, z); y is the body's own centre at that height.
    centre_xz: tuple[float, float]
    slices: int = SLICES


# Axial-like stacks are centred at z = 200 mm: the top of the chest (lungs end at ~210 mm) and the
# start of the neck taper (from 230 mm), so the body's cross-section changes strongly from slice to
# slice and a reversed slice order (head-first vs feet-first) would show. Sagittal and coronal
# images see 384 mm along z: centred at z = 80 mm they hold the whole lungs (−90…210 mm) with
# margin, so the slice-by-slice hole filling closes them, and the neck taper at the top. A coronal
# stack of 24 slices would see neither the front of the body nor the couch, so it has 72 slices
# (288 mm): the whole anterior-posterior extent, and the couch on either side (supine or prone).
# The phantom is left-right symmetric, so every stack sits off the midline towards the patient's
# left (20 mm; the body, ~325 mm wide, still fits the 384 mm field of view): a left-right mirror
# image then lands 40 mm off. The sagittal stack sits 40 mm to the left (x from −6 to +86 mm), so
# its slices differ from their mirror images (~20% in area) and a reversed order would show.
ACQUISITIONS: dict[str, Acquisition] = {
    "axial": Acquisition(_iop(np.eye(3)), (20.0, 200.0)),
    "tilt+17": Acquisition(_iop(_rot_x(17.0)), (20.0, 200.0)),
    "tilt-20": Acquisition(_iop(_rot_x(-20.0)), (20.0, 200.0)),
    "sagittal": Acquisition((0, 1, 0, 0, 0, -1), (40.0, 80.0)),
    "coronal": Acquisition((1, 0, 0, 0, 0, -1), (20.0, 80.0), slices=72),
    "double-oblique": Acquisition(_iop(_rot_y(15.0) @ _rot_x(-25.0)), (20.0, 200.0)),
}
POSITIONS = ("HFS", "FFS", "HFP", "FFP")


def _body_centre_y(z: float) -> float:
    """Middle of the body's anterior-posterior extent at height ``z`` (from the analytic mask)."""
    ys = np.arange(-400.0, 400.0, 0.25)
    inside = body_mask_lps(np.column_stack([np.zeros_like(ys), ys, np.full_like(ys, z)]))
    assert inside.any()
    return float(0.5 * (ys[inside].min() + ys[inside].max()))


def _orientation(acq: Acquisition, position: str) -> tuple[float, ...]:
    """ImageOrientationPatient of ``acq`` for a patient lying in ``position``."""
    o = np.asarray(acq.orientation, dtype=np.float64)
    m = GANTRY_TO_PATIENT[position]
    return tuple(float(v) + 0.0 for v in (*(m @ o[:3]), *(m @ o[3:])))


def _origin(acq: Acquisition, orientation: tuple[float, ...]) -> tuple[float, float, float]:
    """ImagePositionPatient of the first slice that centres the stack on the body."""
    x, z = acq.centre_xz
    centre = np.array([x, _body_centre_y(z), z])
    o = np.asarray(orientation, dtype=np.float64)
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    normal = np.cross(row, col)
    half = 0.5 * (SIZE - 1) * SPACING_MM
    origin = centre - half * row - half * col - 0.5 * (acq.slices - 1) * SPACING_MM * normal
    return (float(origin[0]), float(origin[1]), float(origin[2]))


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return discover_bundles(ENGINES, ("body-threshold",))[0]


@pytest.fixture(scope="module")
def engine(bundle: Bundle) -> Engine | None:
    return make_engine(bundle, NodeConfig(bundles_dir=ENGINES))


def _voxel_centres(headers: list[Dataset]) -> np.ndarray:
    """(slices, rows, cols, 3) LPS position of every pixel centre, from the image headers alone."""
    out = np.empty((len(headers), SIZE, SIZE, 3))
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    for k, h in enumerate(headers):
        iop = np.array([float(v) for v in h.ImageOrientationPatient])
        ipp = np.array([float(v) for v in h.ImagePositionPatient])
        dr, dc = (float(v) for v in h.PixelSpacing)  # between rows, between columns
        out[k] = ipp + (i * dr)[..., None] * iop[3:] + (j * dc)[..., None] * iop[:3]
    return out


def _rasterise(rt: Dataset, headers: list[Dataset]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], float]:
    """Fill each contour (even-odd, by pixel centres) into the image it references.

    Returns the mask, (slice index, LPS points) of every contour, and the largest distance of a
    contour point from the plane of its referenced image.
    """
    index = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    out = np.zeros((len(headers), SIZE, SIZE), dtype=bool)
    contours: list[tuple[int, np.ndarray]] = []
    worst_plane = 0.0
    (roi,) = rt.ROIContourSequence
    for contour in roi.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        k = index[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        h = headers[k]
        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        worst_plane = max(worst_plane, contour_plane_distance(points, h))
        iop = np.array([float(v) for v in h.ImageOrientationPatient])
        rel = points - np.array([float(v) for v in h.ImagePositionPatient])
        dr, dc = (float(v) for v in h.PixelSpacing)
        rr, cc = fill_polygon(rel @ iop[3:] / dr, rel @ iop[:3] / dc, shape=(SIZE, SIZE))
        layer = np.zeros((SIZE, SIZE), dtype=bool)
        layer[rr, cc] = True
        out[k] ^= layer
        contours.append((k, points))
    return out, contours, worst_plane


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def _centroid(mask: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return centres[mask].mean(axis=0)


def _checked_slices(truth: np.ndarray) -> list[int]:
    areas = truth.sum(axis=(1, 2))
    return [int(k) for k in np.flatnonzero(areas >= MIN_SLICE_SHARE * areas.max())]


def _per_slice_errors(pred: np.ndarray, truth: np.ndarray, centres: np.ndarray) -> tuple[float, float]:
    """Worst per-slice centroid distance (mm) and relative area error over the checked slices."""
    worst_c, worst_a = 0.0, 0.0
    for k in _checked_slices(truth):
        assert pred[k].any(), f"slice {k}: the body is missing"
        worst_c = max(worst_c, float(np.linalg.norm(_centroid(pred[k], centres[k]) - _centroid(truth[k], centres[k]))))
        worst_a = max(worst_a, abs(float(pred[k].sum()) / float(truth[k].sum()) - 1.0))
    return worst_c, worst_a


def _polygon_centroid_lps(points: np.ndarray, header: Dataset) -> tuple[np.ndarray, float]:
    """Area centroid (LPS) and area (mm²) of a planar contour, by the shoelace formula in its plane."""
    iop = np.array([float(v) for v in header.ImageOrientationPatient])
    ipp = np.array([float(v) for v in header.ImagePositionPatient])
    u, v = (points - ipp) @ iop[:3], (points - ipp) @ iop[3:]
    u1, v1 = np.roll(u, -1), np.roll(v, -1)
    cross = u * v1 - u1 * v
    area = 0.5 * float(cross.sum())
    cu = float(((u + u1) * cross).sum()) / (6.0 * area)
    cv = float(((v + v1) * cross).sum()) / (6.0 * area)
    return ipp + cu * iop[:3] + cv * iop[3:], abs(area)


RESULTS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _report() -> object:
    yield
    if RESULTS:
        head = (
            "case                 Dice     Dice     couch covered  slice centroid  slice area    reversed order  time\n"
            "                     SEG      RTSTRUCT SEG    RT      SEG   RT (mm)   SEG   RT      (mm)   area     (s)"
        )
        print("\n" + "\n".join([head, *RESULTS]))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("acquisition", list(ACQUISITIONS))
def test_contours_land_on_the_body(
    tmp_path: Path, acquisition: str, position: str, bundle: Bundle, engine: Engine | None
) -> None:
    started = time.perf_counter()
    acq = ACQUISITIONS[acquisition]
    orientation = _orientation(acq, position)
    series = write_ct_series(
        tmp_path / "ct",
        slices=acq.slices,
        rows=SIZE,
        columns=SIZE,
        pixel_spacing=(SPACING_MM, SPACING_MM),
        slice_thickness=SPACING_MM,
        orientation=orientation,
        origin=_origin(acq, orientation),
        patient_position=position,
        seed=7,
    )
    headers: list[Dataset] = [dcmread(p, stop_before_pixels=True) for p in series.files_in_slice_order]
    assert all(str(h.PatientPosition) == position for h in headers)
    centres = _voxel_centres(headers)

    # Analytic truth at every voxel centre, and the couch (table) region of this patient position.
    truth = body_mask_lps(centres)
    hu = phantom_hu(centres, patient_position=position)
    table = (hu == np.float32(HU_TABLE)) & ~truth
    assert truth.mean() > 0.15, "the stack misses the body"
    assert table.sum() > 100, "the couch is not in the field of view, so excluding it is not tested"

    # The node's own geometry agrees with the headers (slice order and voxel positions).
    volume = build_volume(read_series(series.files))
    assert volume.sop_instance_uids == series.sop_instance_uids
    k, i, j = np.meshgrid(*(np.arange(n) for n in volume.geometry.shape), indexing="ij")
    assert np.abs(volume.geometry.to_patient(np.stack([k, i, j], axis=-1)) - centres).max() < 1e-3

    outcome = run_job(series.files, bundle, engine, tmp_path / "out", provenance=PROV)
    paths = {o.kind: o.path for o in outcome.objects}
    assert set(paths) == {"SEG", "RTSTRUCT"} and outcome.structures == ["BODY"]

    # SEG, read back by an independent reader onto the source slices.
    seg = hd.seg.segread(paths["SEG"])
    pred_seg = (
        seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_instance_uids, combine_segments=True) > 0
    )
    assert pred_seg.shape == truth.shape
    dice_seg = _dice(pred_seg, truth)
    table_seg = float(pred_seg[table].mean())

    # RTSTRUCT, filled back into the slices its contours reference.
    rt = dcmread(paths["RTSTRUCT"])
    pred_rt, contours, worst_plane = _rasterise(rt, headers)
    dice_rt = _dice(pred_rt, truth)
    table_rt = float(pred_rt[table].mean())

    seg_c, seg_a = _per_slice_errors(pred_seg, truth, centres)
    rt_c, rt_a = _per_slice_errors(pred_rt, truth, centres)
    # What the same checks say of the truth with its slice order reversed (a head/feet mix-up):
    # the per-slice checks can only catch that where these exceed the tolerances.
    rev_c, rev_a = _per_slice_errors(truth[::-1], truth, centres)
    RESULTS.append(
        f"{acquisition + '/' + position:<20} {dice_seg:7.4f} {dice_rt:7.4f}  {table_seg:6.4f} {table_rt:6.4f}"
        f"  {seg_c:5.2f} {rt_c:5.2f}  {seg_a:5.3f} {rt_a:5.3f}  {rev_c:6.2f} {rev_a:5.3f}"
        f"  {time.perf_counter() - started:5.2f}"
    )

    assert dice_seg >= DICE_MIN, f"SEG Dice {dice_seg:.4f}"
    assert dice_rt >= DICE_MIN, f"RTSTRUCT Dice {dice_rt:.4f}"
    assert table_seg < TABLE_MAX_FRACTION, f"the SEG covers {table_seg:.1%} of the couch"
    assert table_rt < TABLE_MAX_FRACTION, f"the RTSTRUCT covers {table_rt:.1%} of the couch"
    assert worst_plane < 0.01, f"a contour lies {worst_plane:.4f} mm off the plane of its image"

    # Whole-body centroid in LPS: anterior/posterior (supine vs prone: the couch must not pull it),
    # left/right and superior/inferior.
    truth_c = _centroid(truth, centres)
    for name, pred in (("SEG", pred_seg), ("RTSTRUCT", pred_rt)):
        diff = _centroid(pred, centres) - truth_c
        assert np.abs(diff).max() < GLOBAL_CENTROID_TOL_MM, f"{name} centroid {diff.round(2)} mm (LPS) off the truth's"

    # Slice by slice (head- vs feet-first: each slice's body is the one at that slice's height).
    # The case is built so that these checks would catch a reversed slice order.
    assert rev_c > CENTROID_TOL_MM or rev_a > AREA_TOL, "this stack cannot tell its slice order apart"
    assert seg_c < CENTROID_TOL_MM and rt_c < CENTROID_TOL_MM, (seg_c, rt_c)
    assert seg_a < AREA_TOL and rt_a < AREA_TOL, (seg_a, rt_a)

    # The outline contour of every substantial slice, straight from ContourData: its area centroid
    # is the truth's body centroid on that slice.
    by_slice: dict[int, list[np.ndarray]] = {}
    for k_, pts in contours:
        by_slice.setdefault(k_, []).append(pts)
    for k_ in _checked_slices(truth):
        outlines = [_polygon_centroid_lps(p, headers[k_]) for p in by_slice.get(k_, [])]
        assert outlines, f"slice {k_} has no contour"
        centroid, _area = max(outlines, key=lambda ca: ca[1])
        error = float(np.linalg.norm(centroid - _centroid(truth[k_], centres[k_])))
        assert error < CENTROID_TOL_MM, f"slice {k_}: outline centroid {error:.2f} mm from the truth's"
