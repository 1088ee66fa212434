"""Round trip through plastimatch: our RTSTRUCT, rasterized by an independent tool, gives back our SEG.

For each CT series the offline pipeline (``python -m node segment``) writes a SEG and an RTSTRUCT.
"The masks we started from" are read from our SEG with highdicom; Debian's plastimatch converts our
RTSTRUCT back to one mask per ROI on the source CT; the two are compared voxel by voxel on the CT
grid, by patient coordinates: every CT voxel centre (LPS, from our own geometry, which honours
gantry-tilt shear) is looked up, nearest neighbour, in plastimatch's mask through the grid its MHA
header declares. Dice must be >= 0.98 for every ROI larger than 1 mL.

plastimatch's grid equals the CT grid for ordinary stacks. For gantry-tilted (sheared) series it
writes an un-sheared oblique grid (see tests/harness/plastimatch.py), so comparing by index would be
wrong there (Dice about 0.59 / 0.68 for the two Philips tilted series); by patient coordinates the
masks agree. CT voxels that fall outside plastimatch's grid count as "not in plastimatch's mask":
plastimatch cannot represent them, and the table shows how many there are.

Run with ``-s`` to see the table (series, ROI, voxels, mL, Dice, ...).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.assemble.volume import build_volume, read_series
from node.model.volume import Geometry
from tests.harness.plastimatch import Grid, plastimatch_missing_reason, plastimatch_version, rtstruct_to_masks
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MIN_DICE = 0.98
MIN_ROI_ML = 1.0
SEGMENT_TIMEOUT_S = 300

SERIES = ["philips-head-5mm", "philips-head-tilted-54", "philips-head-tilted-58", "synthetic-40"]


@dataclass
class Row:
    series: str
    roi: str
    voxels: int
    ml: float
    plastimatch_voxels: int
    outside_grid: int
    dice: float
    index_dice: float | None
    grid: str


ROWS: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> Iterator[None]:
    yield
    if not ROWS:
        return
    print(f"\nplastimatch {plastimatch_version()} round trip (Dice by patient coordinates on the CT grid; "
          f"'index Dice' compares plastimatch's array index-for-index with the CT's)")
    head = f"{'series':<24} {'ROI':<12} {'voxels':>9} {'mL':>8} {'pm voxels':>9} {'outside':>7} " \
           f"{'Dice':>8} {'index Dice':>10}  plastimatch grid"
    print(head)
    print("-" * len(head))
    for r in ROWS:
        index = f"{r.index_dice:.4f}" if r.index_dice is not None else "-"
        print(f"{r.series:<24} {r.roi:<12} {r.voxels:>9} {r.ml:>8.1f} {r.plastimatch_voxels:>9} {r.outside_grid:>7} "
              f"{r.dice:>8.5f} {index:>10}  {r.grid}")


# ------------------------------------------------------------------------------------------- inputs
@cache
def _ct_series_in(folder: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID → files of CT Image Storage instances directly in ``folder`` (recursive)."""
    series: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == "DIRFILE":
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (README, DIRFILE, ...): skip
            continue
        if str(ds.get("SOPClassUID", "")) == CT_IMAGE_STORAGE:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    return series


def _real_series_files(name: str) -> list[Path]:
    if not (SHARED / "ct").is_dir():
        pytest.skip(f"real CT data not found at {SHARED / 'ct'}")
    if name == "philips-head-5mm":
        folder = SHARED / "ct" / "philips-head-5mm" / "S2010"
        if not folder.is_dir():
            pytest.skip(f"{folder} not found")
        found = [files for files in _ct_series_in(folder).values() if len(files) > 5]
        assert len(found) == 1, f"expected one CT series in {folder}, found {len(found)}"
        return found[0]
    want = int(name.rsplit("-", 1)[1])
    folder = SHARED / "ct" / "philips-head-tilted"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    found = [files for files in _ct_series_in(folder).values() if len(files) == want]
    assert len(found) == 1, f"expected one {want}-slice CT series in {folder}, found {len(found)}"
    return found[0]


def _prepare_ct(name: str, tmp_path: Path) -> Path:
    ct_dir = tmp_path / "ct"
    if name == "synthetic-40":
        write_ct_series(ct_dir, slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6))
        return ct_dir
    ct_dir.mkdir()
    for i, src in enumerate(_real_series_files(name)):
        shutil.copy2(src, ct_dir / f"{i:04d}_{src.name}.dcm")
    return ct_dir


def _run_pipeline(ct_dir: Path, out: Path) -> tuple[Path, Path]:
    command = [sys.executable, "-m", "node", "segment", "--bundle", "body-threshold", str(ct_dir), "-o", str(out)]
    proc = subprocess.run(command, cwd=REPO,
                          capture_output=True, text=True, timeout=SEGMENT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    segs, rtss = sorted(out.rglob("SEG_*.dcm")), sorted(out.rglob("RTSTRUCT_*.dcm"))
    assert len(segs) == 1 and len(rtss) == 1, f"expected one SEG and one RTSTRUCT, got {segs} {rtss}"
    return segs[0], rtss[0]


# ---------------------------------------------------------------------------------------- comparison
def _seg_masks(seg_path: Path, sop_uids: list[str]) -> dict[str, np.ndarray]:
    """Segment label → boolean mask [k, i, j] in CT slice order, from our SEG."""
    seg = hd.seg.segread(seg_path)
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    # One boolean plane per segment (segments of a multi-structure model may overlap, which a
    # combined label array cannot represent).
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=numbers,
                                               combine_segments=False, assert_missing_frames_are_empty=True)
    return {labels[n]: np.asarray(pixels[..., s]) != 0 for s, n in enumerate(numbers)}


def _ct_grid_if_orthogonal(geometry: Geometry) -> Grid | None:
    """The CT grid as an ITK-style Grid, or None for a sheared (gantry-tilted) stack."""
    if geometry.is_sheared:
        return None
    ns, rows, cols = geometry.shape
    return Grid(origin=np.asarray(geometry.origin, dtype=np.float64),
                spacing=np.array([geometry.spacing[2], geometry.spacing[1], geometry.spacing[0]]),
                direction=np.column_stack([geometry.row_dir, geometry.col_dir, geometry.normal]),
                shape=(ns, rows, cols))


def _ct_voxel_centres(geometry: Geometry) -> np.ndarray:
    k, i, j = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    return geometry.to_patient(np.stack([k, i, j], axis=-1))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _describe_grid(pm: Grid, ct: Grid | None, geometry: Geometry) -> str:
    if ct is not None and pm.same_as(ct):
        return "= CT grid"
    if geometry.is_sheared:
        step = geometry.slice_step
        drop = np.linalg.norm(step - (step @ geometry.normal) * geometry.normal)
        return (f"un-sheared oblique grid (CT is sheared: drops {drop:.3f} mm/slice in-plane, "
                f"{drop * (geometry.shape[0] - 1):.1f} mm at the last slice)")
    return f"other grid: origin {np.round(pm.origin, 2)}, spacing {np.round(pm.spacing, 4)}, shape {pm.shape}"


@pytest.mark.parametrize("name", SERIES)
def test_plastimatch_rasterizes_our_rtstruct_back_to_our_seg(name: str, tmp_path: Path) -> None:
    if reason := plastimatch_missing_reason():
        pytest.skip(reason)
    ct_dir = _prepare_ct(name, tmp_path)
    seg_path, rt_path = _run_pipeline(ct_dir, tmp_path / "out")

    volume = build_volume(read_series(sorted(p for p in ct_dir.iterdir() if p.is_file())))
    geometry = volume.geometry
    ours = _seg_masks(seg_path, volume.sop_instance_uids)
    theirs = rtstruct_to_masks(rt_path, ct_dir, tmp_path / "plastimatch")
    if theirs.warnings:
        print(f"\n[{name}] plastimatch complained about our RTSTRUCT:\n  " + "\n  ".join(theirs.warnings))

    assert set(theirs) == set(ours), f"plastimatch ROIs {sorted(theirs)} != our SEG segments {sorted(ours)}"
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    ct_grid = _ct_grid_if_orthogonal(geometry)
    centres = _ct_voxel_centres(geometry)
    failures = []
    for roi, mask in sorted(ours.items()):
        pm_mask, pm_grid = theirs[roi], theirs.grids[roi]
        index_dice = None
        if pm_mask.shape == mask.shape:
            index_dice = _dice(mask, pm_mask)
        if ct_grid is not None and pm_grid.same_as(ct_grid):
            on_ct = pm_mask
            outside = 0
        else:
            on_ct = pm_grid.sample_nearest(pm_mask, centres, fill=False)
            outside = int((mask & ~pm_grid.contains(centres)).sum())
        dice = _dice(mask, on_ct)
        ml = int(mask.sum()) * voxel_ml
        ROWS.append(Row(name, roi, int(mask.sum()), ml, int(pm_mask.sum()), outside, dice, index_dice,
                        _describe_grid(pm_grid, ct_grid, geometry)))
        if ml > MIN_ROI_ML and dice < MIN_DICE:
            worst = sorted(((int((mask[k] ^ on_ct[k]).sum()), k) for k in range(mask.shape[0])), reverse=True)[:5]
            failures.append(f"{roi}: Dice {dice:.4f} < {MIN_DICE} ({ml:.1f} mL, {outside} of our voxels outside "
                            f"plastimatch's grid; most differing slices (voxels, k): {worst})")
    assert not failures, f"[{name}] " + "; ".join(failures)
