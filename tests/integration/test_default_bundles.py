"""The node on its defaults (body-lungs and liver bundles) receives a chest CT from DCMTK storescu and
delivers BODY + both lungs to storescp, with left and right on the patient's left and right; the liver
job ends done or declined with its reason, never failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, assert_dciodvfy_clean
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration


def _ended(status: dict[str, Any]) -> bool:
    jobs = status.get("jobs", [])
    return len(jobs) == 2 and all(j["state"] in ("done", "declined", "failed") for j in jobs)


def test_default_bundles_deliver_body_and_lungs_and_liver_ends_cleanly(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp", "dciodvfy"):
        pytest.skip(reason)
    # 40 slices × 5 mm through the phantom's chest (its lungs span z −90…210 mm), 256² at 1.6 mm.
    series = write_ct_series(tmp_path / "ct", slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6),
                             slice_thickness=5.0, origin=(-204.8, -204.8, -100.0))
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], bundles=()
    ) as node:
        storescu("127.0.0.1", node.port, node.ae_title, series.directory)
        status = node.wait_status(_ended, timeout=300, interval=2.0)
        jobs = {j["bundle"].split("@")[0]: j for j in status["jobs"]}
        assert set(jobs) == {"body-lungs", "liver"}
        assert jobs["body-lungs"]["state"] == "done", jobs["body-lungs"]
        assert jobs["liver"]["state"] in ("done", "declined"), jobs["liver"]
        if jobs["liver"]["state"] == "declined":
            assert jobs["liver"]["error"], "a declined job carries its reason"
        expected = 2 * sum(j["state"] == "done" for j in jobs.values())
        files = pacs.wait_for_files(expected, timeout=120)
    for path in files:
        assert dcmread(path, stop_before_pixels=True).StudyInstanceUID == series.study_uid
        assert_dciodvfy_clean(path)
    seg_path = next(p for p in files if dcmread(p, stop_before_pixels=True).SOPClassUID == SEG_CLASS
                    and "body-lungs" in str(dcmread(p, stop_before_pixels=True).SeriesDescription))
    seg = hd.seg.segread(seg_path)
    names = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert sorted(names.values()) == ["BODY", "Lung_L", "Lung_R"]
    uids = [str(u) for u in series.sop_instance_uids]
    planes = seg.get_pixels_by_source_instance(uids, segment_numbers=sorted(names), combine_segments=False)
    headers = [dcmread(p, stop_before_pixels=True) for p in series.files]
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    masks = {names[n]: planes[..., i] > 0 for i, n in enumerate(sorted(names))}
    # BODY includes the lungs; the left lung lies at patient left (+x in LPS), the right at −x.
    assert (masks["Lung_L"] <= masks["BODY"]).all() and (masks["Lung_R"] <= masks["BODY"]).all()
    for side, sign in (("Lung_L", 1.0), ("Lung_R", -1.0)):
        k, i, j = np.nonzero(masks[side])
        assert len(k) > 0, side
        xs = []
        for kk, ii, jj in zip(k[::97], i[::97], j[::97], strict=True):
            h = by_uid[uids[kk]]
            ipp, iop, ps = [float(v) for v in h.ImagePositionPatient], [float(v) for v in h.ImageOrientationPatient], \
                [float(v) for v in h.PixelSpacing]
            xs.append(ipp[0] + jj * ps[1] * iop[0] + ii * ps[0] * iop[3])
        assert sign * float(np.mean(xs)) > 20.0, f"{side} centroid x = {np.mean(xs):.1f} mm"
    rt_path = next(p for p in files if dcmread(p, stop_before_pixels=True).SOPClassUID == RTSTRUCT_CLASS
                   and "body-lungs" in str(dcmread(p, stop_before_pixels=True).SeriesDescription))
    rt = dcmread(rt_path)
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    rois = {r.ROIName: types[r.ROINumber] for r in rt.StructureSetROISequence}
    assert rois == {"BODY": "EXTERNAL", "Lung_L": "ORGAN", "Lung_R": "ORGAN"}
