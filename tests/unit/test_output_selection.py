"""``[output]`` structure selections and ROI renames (issue 12): the config table and its errors, the start-up
check of the names, which objects each destination gets, the narrowed result and the renamed RTSTRUCT; and the
writers at many structures: the SEG keeps only non-empty frames exactly as highdicom does, and the RTSTRUCT
traced from the cleaning's outlines is the one traced afresh."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from node.assemble.volume import build_volume, read_series
from node.config import Destination, load_config
from node.config_output import OutputPlan, OutputSelection, check_output_names, output_plan
from node.errors import ConfigError, Declined
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.model.bundle import ContourOptions, ContourRule, ContourSmoothing
from node.model.enums import SegType
from node.model.routing import SourceFacts
from node.model.volume import Volume
from node.send.routing import route_results
from node.write.clean import clean_labels
from node.write.contours import Outlines
from node.write.files import WrittenObject
from node.write.result import Result
from node.write.rtstruct import build_rtstruct
from node.write.seg import build_seg, build_seg_highdicom
from node.write.selection import narrowed, selection_key, write_selections
from node.write.uids import ResultUids
from tests.harness.many_structures import many_structure_bundle, many_structure_labels
from tests.harness.synthetic_ct import write_ct_series
from tests.harness.writing import PROV

BUNDLE = discover_bundles(Path(__file__).resolve().parents[2] / "engines", ("body-lungs",))[0]
FACTS = SourceFacts("CT1", "CT", "", "")

CONFIG = """
[output]
structures = ["BODY", "Lung_L"]
[output.roi_names]
Lung_L = "LUNG_LT"
BODY = "External"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = 105
structures = ["Lung_L", "Lung_R"]
"""


def _config(tmp_path: Path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


def test_output_table_and_destination_structures_are_read(tmp_path: Path) -> None:
    cfg = _config(tmp_path, CONFIG)
    assert cfg.output == OutputSelection(("BODY", "Lung_L"), (("BODY", "External"), ("Lung_L", "LUNG_LT")))
    assert [d.structures for d in cfg.destinations] == [None, ("Lung_L", "Lung_R")]
    plan = cfg.output_plan()
    assert plan.structures == ("BODY", "Lung_L") and plan.others == (("Lung_L", "Lung_R"),)
    assert _config(tmp_path, "").output_plan().structures is None  # default: every structure


def test_a_destination_with_the_sites_selection_adds_no_second_write() -> None:
    plan = output_plan(OutputSelection(("A", "B")), [None, ("B", "A"), ("C",), ("C",)])
    assert plan.others == (("C",),)


@pytest.mark.parametrize(("text", "message"), [
    ("[output]\nstructures = []", "is empty, which would send no structure"),
    ("[output]\nstructures = ['BODY', 'BODY']", "names 'BODY' more than once"),
    ("[output]\nstructures = 'BODY'", "expected list"),
    ("[output.roi_names]\nBODY = 'a\\\\b'", "without a backslash"),
    ("[output.roi_names]\nBODY = ''", "expected an ROI name"),
    ("[output.roi_names]\nLung_L = 'Lung'\nLung_R = 'Lung'", "several structures the ROI name 'Lung'"),
    ("[output]\nstructure = ['BODY']", "did you mean 'output.structures'"),
    ("[[destinations]]\nae_title = 'X'\nhost = 'h'\nport = 1\nstructures = []", "destinations[0].structures"),
])
def test_bad_output_tables_are_refused_with_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="node.toml") as error:
        _config(tmp_path, text)
    assert message in str(error.value)


def test_names_no_bundle_produces_stop_the_start() -> None:
    bundle = many_structure_bundle(117)
    roi = next(label for label in bundle.labels if label.roi_name)  # a TG-263 name is accepted as well as the label
    check_output_names("node.toml", OutputSelection((bundle.labels[0].name, roi.roi_name)),
                       [("tps", (roi.name,))], [BUNDLE, bundle])
    with pytest.raises(ConfigError) as error:
        check_output_names("node.toml", OutputSelection(("BODY",)), [("tps", ("Lung_Lft", "Heartt"))], [BUNDLE])
    text = str(error.value)
    assert "destinations 'tps' structures" in text and "'Lung_Lft', 'Heartt'" in text
    assert "'Lung_Lft' → 'Lung_L'" in text and "available are: BODY, Lung_L, Lung_R" in text
    with pytest.raises(ConfigError, match="'output.roi_names' names 'Liver'"):
        check_output_names("node.toml", OutputSelection(None, (("Liver", "LIVER"),)), [], [BUNDLE])


@pytest.fixture(scope="module")
def small_ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    series = write_ct_series(tmp_path_factory.mktemp("ct"), slices=24, rows=96, columns=96,
                             pixel_spacing=(4.0, 4.0), slice_thickness=5.0, noise_hu=0)
    return list(series.files)


@pytest.fixture(scope="module")
def small_ct(small_ct_files: list[Path]) -> Volume:
    return build_volume(read_series(small_ct_files))


def test_a_job_writes_each_selection_with_the_renames(small_ct_files: list[Path], tmp_path: Path) -> None:
    plan = OutputPlan(("BODY", "Lung_R"), (("Lung_L",),), (("BODY", "External"),))
    outcome = run_job(small_ct_files, BUNDLE, None, tmp_path, provenance=PROV, output=plan)
    assert outcome.structures == ["BODY", "Lung_L", "Lung_R"]
    assert [(o.kind, o.structures, o.site) for o in outcome.objects] == [
        ("SEG", ("BODY", "Lung_R"), True), ("RTSTRUCT", ("BODY", "Lung_R"), True),
        ("SEG", ("Lung_L",), False), ("RTSTRUCT", ("Lung_L",), False)]
    rois = [[str(r.ROIName) for r in dcmread(o.path).StructureSetROISequence] for o in outcome.objects[1::2]]
    assert rois == [["External", "Lung_R"], ["Lung_L"]]
    with pytest.raises(Declined, match="none of the structures selected for sending \\(Liver\\)"):
        run_job(small_ct_files, BUNDLE, None, tmp_path / "none", provenance=PROV, output=OutputPlan(("Liver",)))


def _lungs_result(volume: Volume, roi_names: tuple[tuple[str, str], ...] = ()) -> Result:
    hu = volume.voxels
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu > -300] = 1
    lungs = (hu < -600) & (hu > -950)
    labels[lungs & (np.arange(hu.shape[2]) < hu.shape[2] // 2)] = 3
    labels[lungs & (np.arange(hu.shape[2]) >= hu.shape[2] // 2)] = 2
    return Result.of(volume, labels, BUNDLE, ResultUids.for_job("lungs"), PROV, roi_names)


def test_a_selection_without_the_lungs_keeps_them_in_body(small_ct: Volume) -> None:
    result = _lungs_result(small_ct)
    assert BUNDLE.labels[0].includes == (2, 3)
    body = narrowed(result, ("BODY",), ResultUids.for_job("x"))
    assert body is not None and [label.name for label in body.found] == ["BODY"]
    assert np.array_equal(body.labels != 0, result.mask(result.found[0]))  # the same BODY
    assert body.found[0].includes == ()
    lung = narrowed(result, ("Lung_L",), ResultUids.for_job("y"))
    assert lung is not None and np.array_equal(lung.labels == 2, result.labels == 2) and lung.labels.max() == 2
    assert narrowed(result, ("Liver",), ResultUids.for_job("z")) is None
    assert selection_key(("b", "a")) == selection_key(("a", "b"))


def test_roi_renames_change_the_rtstruct_not_the_seg(small_ct: Volume, tmp_path: Path) -> None:
    result = _lungs_result(small_ct, (("BODY", "External"), ("Lung_R", "LUNG_RT")))
    rt = build_rtstruct(result)
    assert [str(r.ROIName) for r in rt.StructureSetROISequence] == ["External", "Lung_L", "LUNG_RT"]
    assert [str(o.ROIObservationLabel) for o in rt.RTROIObservationsSequence] == ["External", "Lung_L", "LUNG_RT"]
    seg = build_seg(result)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["BODY", "Lung_L", "Lung_R"]
    assert int(seg.NumberOfFrames) == 3 * len(small_ct.headers)  # a few segments keep every frame (viewers)
    tg263 = dataclasses.replace(result, bundle=dataclasses.replace(BUNDLE, labels=(
        BUNDLE.labels[0], dataclasses.replace(BUNDLE.labels[1], roi_name="Lung_Lt"), BUNDLE.labels[2])))
    tg263 = dataclasses.replace(tg263, found=list(tg263.bundle.labels), roi_names=(("Lung_Lt", "L LUNG"),))
    assert [str(r.ROIName) for r in build_rtstruct(tg263).StructureSetROISequence] == ["BODY", "L LUNG", "Lung_R"]


def test_each_destination_gets_the_objects_of_its_selection(small_ct: Volume, tmp_path: Path) -> None:
    result = _lungs_result(small_ct)
    objects = write_selections(result, tmp_path, OutputPlan(("BODY", "Lung_L"), (("Lung_L", "Lung_R"),)), "lungs")
    assert [(o.kind, o.structures, o.site) for o in objects] == [
        ("SEG", ("BODY", "Lung_L"), True), ("RTSTRUCT", ("BODY", "Lung_L"), True),
        ("SEG", ("Lung_L", "Lung_R"), False), ("RTSTRUCT", ("Lung_L", "Lung_R"), False)]
    assert objects[0].sop_instance_uid == result.uids.seg_instance
    preview = WrittenObject("PREVIEW", tmp_path / "p.dcm", "1.2.3", "1.2.840.10008.5.1.4.1.1.7")
    destinations = (Destination("pacs", "PACS", "h", 104), Destination("tps", "TPS", "h", 105,
                                                                        structures=("Lung_R", "Lung_L")),
                    Destination("brain", "TPS2", "h", 106, structures=("Brain",)))
    routed = route_results(destinations, BUNDLE.name, [*objects, preview], FACTS)
    by_destination: dict[str, set[Path]] = {}
    for name, path, *_ in routed.outbox:
        by_destination.setdefault(name, set()).add(path)
    assert by_destination["pacs"] == {o.path for o in objects[:2]} | {preview.path}
    assert by_destination["tps"] == {o.path for o in objects[2:]} | {preview.path}
    assert "brain: none of its structures (Brain) was found" in routed.note
    names = {str(r.ROIName) for r in dcmread(next(o.path for o in objects[2:] if o.kind == "RTSTRUCT"))
             .StructureSetROISequence}
    assert names == {"Lung_L", "Lung_R"}
    assert len({o.sop_instance_uid for o in objects}) == 4  # own UIDs per selection


def _saved(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("columns", [96, 90])  # whole-byte rows (packed by box) and rows ending within a byte
def test_seg_of_many_structures_keeps_only_non_empty_frames_as_highdicom_does(tmp_path: Path, columns: int) -> None:
    series = write_ct_series(tmp_path, slices=20, rows=96, columns=columns, pixel_spacing=(4.0, 4.0), noise_hu=0)
    volume = build_volume(read_series(series.files))
    bundle = many_structure_bundle(40)
    labels = many_structure_labels(volume.voxels.shape, 40)
    labels[7] = 0  # a plane holding nothing: dropped from the frames and from the position index
    result = Result.of(volume, labels, bundle, ResultUids.for_job("many"), PROV)
    for seg_type in (SegType.BINARY, SegType.LABELMAP):
        fast, reference = (dcmread(BytesIO(_saved(build(result, seg_type=seg_type))))
                           for build in (build_seg, build_seg_highdicom))
        assert fast.PixelData == reference.PixelData
        assert fast.PerFrameFunctionalGroupsSequence == reference.PerFrameFunctionalGroupsSequence
        assert fast.get("DimensionOrganizationType") == reference.get("DimensionOrganizationType")
        assert fast.NumberOfFrames == reference.NumberOfFrames
        for keyword in ("SourceImageSequence", "ReferencedSeriesSequence", "SharedFunctionalGroupsSequence"):
            assert fast[keyword] == reference[keyword], keyword
    seg = build_seg(result)
    present = [(label.value, k) for label in result.found for k in range(len(labels))
               if (labels[k] == label.value).any()]
    assert int(seg.NumberOfFrames) == len(present) < len(result.found) * len(labels)
    parsed = hd.seg.segread(BytesIO(_saved(seg)))
    back = parsed.get_pixels_by_source_instance(volume.sop_instance_uids, combine_segments=True,
                                                skip_overlap_checks=True)
    assert np.array_equal(back, labels)


def test_rtstruct_from_the_cleanings_outlines_is_the_one_traced_afresh(small_ct: Volume) -> None:
    rule = ContourRule(min_island_mm2=50.0, min_hole_mm2=0.0, keep_holes=True, smoothing=ContourSmoothing.HALF_PIXEL)
    bundle = dataclasses.replace(many_structure_bundle(30), contours=ContourOptions(((5, rule),)))
    labels = many_structure_labels(small_ct.voxels.shape, 30)
    labels[10, 40, 40] = 5  # a speck (16 mm²) the cleaning drops: label 5 is traced again after it
    outlines: dict[int, Outlines] = {}
    cleaned = clean_labels(labels, bundle, small_ct.geometry, outlines)
    changed = {c.name for c in cleaned if c.pixels_changed}
    assert bundle.labels[4].name in changed
    assert 5 not in outlines and len(outlines) == 30 - len(changed)
    shared = build_rtstruct(Result.of(small_ct, labels, bundle, ResultUids.for_job("o"), PROV, outlines=outlines))
    fresh = build_rtstruct(Result.of(small_ct, labels, bundle, ResultUids.for_job("o"), PROV))
    assert shared.ROIContourSequence == fresh.ROIContourSequence
