"""Edit QA end to end: the node segments CTs received from DCMTK's storescu, a clinician's edited structure
sets come back the same way, and each is compared with the node's result — checked against plastimatch.

1. A synthetic chest CT (body-lungs: BODY, Lung_L, Lung_R; no real CT here yields three structures) and a
   real one (``ct/totalseg-abdomen-20-j2k``, UIDs filled in a copy; BODY only) are sent with storescu.
2. The node's RTSTRUCTs are edited with pydicom as a planning system saves an edit (new SOP Instance UID,
   new series, new StructureSetLabel): on the chest, Lung_L moved 3 mm, BODY eroded 2 mm on ten slices,
   Lung_R deleted, a GTV added; on the real CT, BODY left untouched and a PTV added.
3. They go back with storescu; the qa jobs record each structure's verdict, Dice, HD95 ... in the index.
4. plastimatch (``convert --input RTSTRUCT --referenced-ct``) rasterises both sets independently; Dice (numpy)
   and HD95 (scipy's Euclidean distance transform on the border voxels) from its masks must agree with the
   node's within tolerance.
5. Real planning-system sets whose CT the node never segmented (MIM, rt-utils, Eclipse) are stored and
   reported "no AI result to compare"; no job fails or hangs. ``qa report``, ``qa sets``, the series page
   and /metrics show the results.

Run with ``-s`` to see the report.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from scipy import ndimage

from tests.harness import edit_rtstruct as edit
from tests.harness.dcmtk import free_port, storescu, tool_missing_reason
from tests.harness.index_rows import read_index
from tests.harness.node_process import REPO, NodeProcess
from tests.harness.plastimatch import plastimatch_missing_reason, rtstruct_to_masks
from tests.harness.result_checks import assert_dciodvfy_clean
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

SHARED = REPO.parent / "shared" / "data"
TOTALSEG = SHARED / "ct" / "totalseg-abdomen-20-j2k"
MIM = SHARED / "reference" / "mim-rtstruct"
ECLIPSE = SHARED / "reference" / "eclipse-rtstruct"
WAIT_S = 240.0


def _wait_rows(state: Path, sql: str, args: tuple[object, ...], node: NodeProcess, what: str,
               n: int = 1) -> list[Any]:
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        rows = read_index(state, sql, args)
        if len(rows) >= n:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen in {WAIT_S:.0f} s:\n{node.log_text()[-4000:]}")


def _our_rtstruct(node: NodeProcess, series_uid: str) -> Path:
    sql = "SELECT state, result_dir, error FROM jobs WHERE series_uid=? AND kind='segment' AND state NOT IN " \
          "('queued', 'running')"
    (job,) = _wait_rows(node.state_dir, sql, (series_uid,), node, f"the job of series {series_uid}")
    assert job["state"] == "done", dict(job)
    (path,) = Path(job["result_dir"]).glob("RTSTRUCT_*.dcm")
    return path


def _qa(node: NodeProcess, sop_uid: str) -> dict[str, Any]:
    (row,) = _wait_rows(node.state_dir, "SELECT * FROM qa_sets WHERE sop_instance_uid=?", (sop_uid,), node,
                        f"the qa record of {sop_uid}")
    structures = read_index(node.state_dir, "SELECT * FROM qa_structures WHERE set_id=?", (row["id"],))
    return dict(row) | {"structures": {s["name"]: dict(s) for s in structures}}


def _filled_totalseg(target: Path) -> Path:
    """The 20-slice abdomen with the UIDs its datasets leave empty filled in (pixel data untouched)."""
    study, series = generate_uid(), generate_uid()
    target.mkdir(parents=True)
    for path in sorted(TOTALSEG.glob("CT.*")):
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(target / f"{path.name}.dcm", enforce_file_format=True)
    return target


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def independent(ours: np.ndarray, theirs: np.ndarray, sampling: tuple[float, float, float]) -> tuple[float, float]:
    """Dice and HD95 (max of the directed 95th percentiles) with numpy and scipy only."""
    dice = 2.0 * np.count_nonzero(ours & theirs) / (np.count_nonzero(ours) + np.count_nonzero(theirs))
    sa, sb = _surface(ours), _surface(theirs)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return float(dice), float(max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95)))


def _cli(node: NodeProcess, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "node", "qa", *args, "--state-dir", str(node.state_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.skipif(tool_missing_reason("storescu", "dciodvfy") is not None,
                    reason=str(tool_missing_reason("storescu", "dciodvfy")))
@pytest.mark.skipif(plastimatch_missing_reason() is not None, reason=str(plastimatch_missing_reason()))
def test_edited_structure_sets_are_measured_against_the_nodes_result(tmp_path: Path) -> None:
    http = free_port()
    node = NodeProcess(tmp_path / "node", quiet_period_s=3.0, release_settle_s=0.5, bundles=("body-lungs",),
                       extra_toml=f'[metrics]\nport = {http}\nbind_address = "127.0.0.1"\n')
    chest = write_ct_series(tmp_path / "chest", slices=40, rows=256, columns=256, pixel_spacing=(1.5, 1.5),
                            slice_thickness=2.5, origin=(-192.0, -192.0, -20.0))
    real = _filled_totalseg(tmp_path / "abdomen") if TOTALSEG.is_dir() else None
    with node:
        storescu("127.0.0.1", node.port, node.ae_title, chest.directory, calling_aet="CT_SIM")
        if real is not None:
            storescu("127.0.0.1", node.port, node.ae_title, real, calling_aet="CT_SIM")
        ours = _our_rtstruct(node, chest.series_uid)

        # The clinician's edit of the chest: moved, eroded, deleted, added.
        ds = edit.new_version(ours, "RTP edited")
        edit.move_roi(ds, "Lung_L", (3.0, 0.0, 0.0))
        eroded_at = edit.erode_roi(ds, "BODY", 2.0, slices=10)
        edit.delete_roi(ds, "Lung_R")
        k = len(chest.sop_instance_uids) // 2
        z = float(chest.image_positions[k][2])
        edit.add_roi(ds, "GTV", [(edit.circle((0.0, 60.0, z), 15.0), chest.sop_instance_uids[k])])
        edited = edit.save(ds, tmp_path / "edited" / "chest.dcm")
        storescu("127.0.0.1", node.port, node.ae_title, edited, calling_aet="ARIA")
        chest_qa = _qa(node, str(ds.SOPInstanceUID))

        real_qa, real_ours = None, None
        if real is not None:
            real_uid = str(dcmread(next(real.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
            real_ours = _our_rtstruct(node, real_uid)
            rs = edit.new_version(real_ours, "RTP approved")
            first = dcmread(sorted(real.iterdir())[10], stop_before_pixels=True)
            centre = np.array(first.ImagePositionPatient, dtype=float) + 256 * float(first.PixelSpacing[0]) * np.array(
                [1.0, 1.0, 0.0])
            edit.add_roi(rs, "PTV_50", [(edit.circle(centre.tolist(), 20.0), str(first.SOPInstanceUID))], kind="PTV")
            real_edited = edit.save(rs, tmp_path / "edited" / "abdomen.dcm")
            storescu("127.0.0.1", node.port, node.ae_title, real_edited, calling_aet="ARIA")
            real_qa = _qa(node, str(rs.SOPInstanceUID))

        # Planning systems' own sets whose CT the node never segmented.
        foreign = []
        if MIM.is_dir():
            storescu("127.0.0.1", node.port, node.ae_title, [MIM / "ct_1.dcm", MIM / "ct_2.dcm"], calling_aet="MIM")
            time.sleep(4.0)  # the two-slice CT settles (ignored: too few slices) before its structure sets arrive
            for name in ("invalid_reference_rt.dcm", "rt.dcm"):
                storescu("127.0.0.1", node.port, node.ae_title, MIM / name, calling_aet="MIM")
                foreign.append(str(dcmread(MIM / name, stop_before_pixels=True).SOPInstanceUID))
        for path in sorted(ECLIPSE.glob("RS.*.dcm")) if ECLIPSE.is_dir() else []:
            storescu("127.0.0.1", node.port, node.ae_title, path, calling_aet="ECLIPSE")
            foreign.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        foreign_qa = [_qa(node, uid) for uid in foreign]

        report = _cli(node, "report")
        sets = _cli(node, "sets", "--series", chest.series_uid)
        page = httpx.get(f"http://127.0.0.1:{http}/series/{chest.series_uid}", timeout=30).text
        metrics = httpx.get(f"http://127.0.0.1:{http}/metrics", timeout=30).text
        qa_jobs = read_index(node.state_dir, "SELECT state, note, error FROM jobs WHERE kind='qa'")
    print(f"\n$ dicom-seg-node qa sets --series {chest.series_uid}\n{sets}\n$ dicom-seg-node qa report\n{report}")

    # The verdicts.
    assert chest_qa["outcome"] == "compared", chest_qa
    got = chest_qa["structures"]
    assert {n: s["verdict"] for n, s in got.items()} == {
        "BODY": "minor edit", "Lung_L": "major edit", "Lung_R": "deleted by clinician", "GTV": "added by clinician"}
    assert got["BODY"]["their_name"] == "BODY" and got["Lung_R"]["theirs_ml"] == 0.0
    assert len(eroded_at) == 10

    for written in (ours, real_ours):  # the node's own structure sets, as every object it writes
        if written is not None:
            assert_dciodvfy_clean(written)
    # The same comparison from plastimatch's rasterisation, measured with numpy / scipy.
    pm_ours = rtstruct_to_masks(ours, chest.directory, tmp_path / "pm-ours")
    pm_theirs = rtstruct_to_masks(edited, chest.directory, tmp_path / "pm-theirs")
    assert pm_ours.grid.same_as(pm_theirs.grid)
    sz, sy, sx = (float(v) for v in pm_ours.grid.spacing[::-1])
    sampling = (sz, sy, sx)
    for name in ("BODY", "Lung_L"):
        dice, hd95 = independent(pm_ours[name], pm_theirs[name], sampling)
        node_figures = got[name]
        assert node_figures["dice"] == pytest.approx(dice, abs=0.01), (name, node_figures, dice)
        assert node_figures["hd95_mm"] == pytest.approx(hd95, abs=1.6), (name, node_figures, hd95)  # one voxel
    assert got["Lung_L"]["hd95_mm"] == pytest.approx(3.0, abs=1.6)
    gtv_ml = float(np.count_nonzero(pm_theirs["GTV"])) * float(np.prod(sampling)) / 1000.0
    assert got["GTV"]["theirs_ml"] == pytest.approx(gtv_ml, rel=0.1)

    if real_qa is not None:
        assert real_qa["outcome"] == "compared", real_qa
        real_got = real_qa["structures"]
        assert real_got["BODY"]["verdict"] == "unchanged" and real_got["BODY"]["dice"] == 1.0
        assert real_got["PTV_50"]["verdict"] == "added by clinician"

    for qa in foreign_qa:
        assert qa["outcome"] == "no AI result to compare", qa
        assert "never received" in str(qa["reason"]) or "wrote no result" in str(qa["reason"]), qa
    assert qa_jobs and all(j["state"] == "done" for j in qa_jobs), [dict(j) for j in qa_jobs]

    # Where an operator sees it.
    assert "Lung_L" in report and "major edit" not in report.splitlines()[0]
    assert "Lung_L [body-lungs@1.0.0]: major edit" in sets
    assert 'id="edit-qa"' in page and "RTP edited" in page and "major edit" in page
    assert 'dicomseg_qa_edits_total{bundle="body-lungs@1.0.0",verdict="major edit"} 1.0' in metrics, metrics[-3000:]
    assert 'dicomseg_qa_sets_total{outcome="compared"}' in metrics
