"""117 structures on one CT, written, routed by structure selection and stored in two real Orthancs (issue 12).

The node's configuration (TOML, as a site writes it) has an ``[output.roi_names]`` rename table and two
destinations: a PACS that takes every structure, and a TPS whose ``structures`` names five OARs (by TG-263
ROI name or label name). A synthetic label map of 117 organ-sized structures (tests/harness/many_structures.py,
coded like an imported TotalSegmentator bundle) on a synthetic CT is cleaned, written per selection
(node.write.selection.write_selections, as the pipeline does), checked with dciodvfy, routed
(node.send.routing) and sent with the node's C-STORE transport; each Orthanc's copies are read back:
the PACS holds all 117 segments and ROIs under the site's names, the TPS only its five.

Skipped (with the reason) when Orthanc or dicom3tools is absent. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from node.assemble.volume import build_volume, read_series
from node.config import load_config
from node.config_output import check_output_names
from node.model.routing import SourceFacts
from node.send.routing import route_results
from node.send.transports.dicom import CStoreTransport
from node.write.clean import clean_labels
from node.write.contours import Outlines
from node.write.result import Result
from node.write.selection import write_selections
from node.write.uids import ResultUids
from tests.harness.dcmtk import tool_missing_reason
from tests.harness.many_structures import many_structure_bundle, many_structure_labels
from tests.harness.orthanc import OrthancServer, orthanc_missing_reason
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, assert_dciodvfy_clean
from tests.harness.synthetic_ct import write_ct_series
from tests.harness.writing import PROV

STRUCTURES = 117
TPS_OARS = ("SpinalCord", "Kidney_L", "kidney_right", "Liver", "spleen")  # TG-263 ROI names or label names

pytestmark = pytest.mark.skipif(bool(orthanc_missing_reason() or tool_missing_reason("dciodvfy")),
                                reason=orthanc_missing_reason() or tool_missing_reason("dciodvfy") or "")


def _config(path: Path, pacs: OrthancServer, tps: OrthancServer) -> Path:
    text = f"""
[output.roi_names]
SpinalCord = "Cord"
Kidney_L = "L Kidney"
urinary_bladder = "Blad"

[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}

[[destinations]]
name = "tps"
ae_title = "{tps.aet}"
host = "127.0.0.1"
port = {tps.dicom_port}
structures = {list(TPS_OARS)!r}
"""
    path.write_text(text.replace("'", '"'))
    return path


def _stored(server: OrthancServer) -> dict[str, pydicom.Dataset]:
    out: dict[str, pydicom.Dataset] = {}
    for instance in server.instances():
        ds = pydicom.dcmread(io.BytesIO(server.instance_file(instance)))
        out[str(ds.SOPClassUID)] = ds
    return out


def test_many_structures_reach_each_destination_by_its_selection(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=60, rows=256, columns=256, pixel_spacing=(1.6, 1.6),
                             slice_thickness=3.0)
    volume = build_volume(read_series(series.files))
    bundle = many_structure_bundle(STRUCTURES)
    labels = many_structure_labels(volume.voxels.shape, STRUCTURES)
    outlines: dict[int, Outlines] = {}
    clean_labels(labels, bundle, volume.geometry, outlines)

    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="TPS") as tps:
        cfg = load_config(_config(tmp_path / "node.toml", pacs, tps))
        check_output_names(cfg.source, cfg.output, [(d.name, d.structures) for d in cfg.destinations], [bundle])
        plan = cfg.output_plan()
        result = Result.of(volume, labels, bundle, ResultUids.for_job("many"), PROV, plan.roi_names, outlines)
        assert len(result.found) == STRUCTURES
        objects = write_selections(result, tmp_path / "out", plan, "many")
        assert len(objects) == 4  # the site's SEG and RTSTRUCT (everything), the TPS's pair
        for obj in objects:
            assert_dciodvfy_clean(obj.path)
        routed = route_results(cfg.destinations, bundle.name, objects, SourceFacts("CT1", "CT", "", ""))
        transport = CStoreTransport(cfg)
        for dest in cfg.destinations:
            paths = [path for name, path, *_ in routed.outbox if name == dest.name]
            assert len(paths) == 2, routed.note
            assert all(outcome.delivered for outcome in transport.send(dest, paths)), dest.name

        renamed = {label.name: result.roi_name(label) for label in bundle.labels}
        assert renamed["spinal_cord"] == "Cord" and renamed["kidney_left"] == "L Kidney"
        assert renamed["urinary_bladder"] == "Blad" and renamed["heart"] == "Heart"  # TG-263 by default

        at_pacs = _stored(pacs)
        seg = hd.seg.Segmentation.from_dataset(at_pacs[SEG_CLASS])
        assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == \
            [label.name for label in bundle.labels]  # the SEG keeps the label names (and codes)
        assert int(at_pacs[SEG_CLASS].NumberOfFrames) < STRUCTURES * len(volume.headers)  # only non-empty frames
        assert [str(r.ROIName) for r in at_pacs[RTSTRUCT_CLASS].StructureSetROISequence] == \
            [renamed[label.name] for label in bundle.labels]
        assert all(len(roi.ContourSequence) > 0 for roi in at_pacs[RTSTRUCT_CLASS].ROIContourSequence)

        at_tps = _stored(tps)
        chosen = [label for label in bundle.labels if {label.name, label.structure_set_name} & set(TPS_OARS)]
        assert len(chosen) == len(TPS_OARS)
        assert [str(r.ROIName) for r in at_tps[RTSTRUCT_CLASS].StructureSetROISequence] == \
            [renamed[label.name] for label in chosen]
        tps_seg = hd.seg.Segmentation.from_dataset(at_tps[SEG_CLASS])
        assert [tps_seg.get_segment_description(n).segment_label for n in tps_seg.segment_numbers] == \
            [label.name for label in chosen]
        assert at_tps[SEG_CLASS].SOPInstanceUID != at_pacs[SEG_CLASS].SOPInstanceUID
