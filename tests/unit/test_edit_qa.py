"""Edit QA (node/qa): matching, metrics, verdicts, bad input, the qa job and the report.

A synthetic chest CT is segmented by the real pipeline (body-lungs: BODY, Lung_L, Lung_R) and recorded in
a real index as a finished job; edited copies of its RTSTRUCT (built with pydicom, as a planning system
writes them) go through :func:`node.qa.assess.assess`, which must never raise: every bad input becomes a
named reason in the record.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from node.cli import main
from node.config import DEFAULT_BUNDLES_DIR, NodeConfig, config_from_mapping
from node.config_qa import QaConfig, name_key
from node.errors import ConfigError
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.jobs.qa import run_qa_job
from node.model.enums import EditVerdict, JobKind, QaOutcome
from node.model.qa_records import QaSet, StructureQa
from node.model.records import InstanceMeta, JobRecord, JobState
from node.qa.assess import assess
from node.qa.checks import self_intersects
from node.qa.compare import Grid, OurResult, compare_structures, read_ours, read_side
from node.qa.match import pair_by_name
from node.qa.metrics import overlap
from node.qa.report import build_report, control_limit, render_csv, render_text
from node.qa.verdict import judge
from node.spool.index import Index
from node.spool.index_jobs import JobOwner
from node.spool.index_qa import EditedInstance, StructureRow
from node.write.provenance import Provenance
from tests.harness import edit_rtstruct as edit
from tests.harness.synthetic_ct import write_ct_series

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ metrics
def _box(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def test_identical_masks_are_perfect() -> None:
    a = _box((20, 40, 40), (5, 10, 10), (15, 30, 30))
    m = overlap(a, a.copy(), (2.0, 1.0, 1.0))
    assert (m.dice, m.surface_dice_1mm, m.surface_dice_2mm, m.hd95_mm, m.msd_mm) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert m.ours_ml == m.theirs_ml == pytest.approx(10 * 20 * 20 * 2.0 / 1000)


def test_shifted_box_distances_are_the_shift() -> None:
    a = _box((20, 40, 40), (5, 10, 10), (15, 30, 30))
    b = np.roll(a, 3, axis=2)  # 3 columns of 1 mm
    m = overlap(a, b, (2.0, 1.0, 1.0))
    assert m.dice == pytest.approx(17 / 20)
    assert m.hd95_mm == pytest.approx(3.0)
    assert m.surface_dice_1mm < m.surface_dice_2mm < 1.0  # the two faces across the shift are 3 mm apart
    assert (m.added_slices, m.removed_slices) == (0, 0)
    c = np.roll(a, 2, axis=0)  # 2 slices of 2 mm: 2 slices added on top, 2 removed below
    m = overlap(a, c, (2.0, 1.0, 1.0))
    assert (m.added_slices, m.removed_slices) == (2, 2) and m.hd95_mm == pytest.approx(4.0)


def test_verdicts_follow_the_thresholds() -> None:
    a = _box((20, 40, 40), (5, 10, 10), (15, 30, 30))
    cfg = QaConfig()
    assert judge(overlap(a, a, (1.0, 1.0, 1.0)), cfg) is EditVerdict.UNCHANGED
    assert judge(overlap(a, np.roll(a, 1, axis=2), (1.0, 1.0, 1.0)), cfg) is EditVerdict.MINOR  # 1 mm: within 2 mm
    assert judge(overlap(a, np.roll(a, 4, axis=2), (1.0, 1.0, 1.0)), cfg) is EditVerdict.MAJOR
    lenient = QaConfig(minor_surface_dice=0.5, minor_dice=0.5)
    assert judge(overlap(a, np.roll(a, 4, axis=2), (1.0, 1.0, 1.0)), lenient) is EditVerdict.MINOR


# ------------------------------------------------------------------------------------------------ names
def test_names_match_ignoring_case_and_punctuation_and_through_aliases() -> None:
    cfg = QaConfig(aliases=(("Lung_L", ("Lt Lung",)), *QaConfig().aliases))
    assert name_key("Lung_L") == name_key("LUNG L") == name_key("lung-l") == "lungl"
    pairing = pair_by_name(["BODY", "Lung_L", "Lung_R", "Liver"], ["External", "Lt Lung", "LUNG_RT", "PTV", "body"],
                           cfg.alias_table())
    assert pairing.pairs == [("BODY", "External"), ("Lung_L", "Lt Lung"), ("Lung_R", "LUNG_RT")]
    assert pairing.added == ["PTV", "body"]  # BODY was taken by External first
    assert pairing.deleted == ["Liver"]


def test_qa_config_is_validated_with_the_key_named(tmp_path: Path) -> None:
    cfg = config_from_mapping({"qa": {"minor_dice": 0.7, "aliases": {"Lung_L": ["LLung"]}}}, source="t.toml",
                              base_dir=tmp_path)
    assert cfg.qa.minor_dice == 0.7 and cfg.qa.alias_table()["llung"] == "Lung_L"
    with pytest.raises(ConfigError, match=r"'qa.unchanged_dice' is 1.5; expected a fraction between 0 and 1"):
        config_from_mapping({"qa": {"unchanged_dice": 1.5}}, source="t.toml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'qa.minor_surface_dice' is 0.995, above unchanged_surface_dice"):
        config_from_mapping({"qa": {"minor_surface_dice": 0.995}}, source="t.toml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'qa.aliases.BODY' holds a name with no letter or digit"):
        config_from_mapping({"qa": {"aliases": {"BODY": ["--"]}}}, source="t.toml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'qa.max_roi'"):
        config_from_mapping({"qa": {"max_roi": 5}}, source="t.toml", base_dir=tmp_path)


def test_self_intersection_is_found() -> None:
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=float)
    staircase = np.array([[0, 0], [2, 0], [2, 1], [3, 1], [3, 3], [0, 3]], dtype=float)
    assert not self_intersects(square) and not self_intersects(staircase)
    assert self_intersects(bowtie)


# ------------------------------------------------------------------------------------------------ the node's result
@dataclass
class Site:
    """A real index holding a segmented synthetic CT and the node's finished body-lungs job."""

    cfg: NodeConfig
    index: Index
    ct_files: list[Path]
    ct_series_uid: str
    rtstruct: Path
    seg: Path
    job_id: int
    grid: Grid
    sent: int = 0

    def edited(self, label: str) -> Dataset:
        return edit.new_version(self.rtstruct, label)

    def submit(self, ds: Dataset | bytes, series_uid: str | None = None) -> QaSet:
        """Store an edited set as the receiver would, and assess it."""
        self.sent += 1
        path = self.cfg.spool_dir / f"edit-{self.sent}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(ds, bytes):
            path.write_bytes(ds)
            uid, series_uid = f"2.25.{self.sent}", series_uid or f"2.25.9{self.sent}"
        else:
            edit.save(ds, path)
            uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
        meta = InstanceMeta(uid, RTSTRUCT_CLASS, "2.25.1", series_uid, "RTSTRUCT", "1.2.840.10008.1.2.1")
        self.index.add_instance(meta, path=path, size=path.stat().st_size, calling_ae="TPS", quiet_period_s=0)
        return assess(self.index, self.cfg, EditedInstance(uid, RTSTRUCT_CLASS, path, "TPS", time.time()), series_uid)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("qa-site")
    cfg = NodeConfig(state_dir=root / "state")
    ct = write_ct_series(root / "ct", slices=40, rows=256, columns=256, pixel_spacing=(1.5, 1.5),
                         slice_thickness=2.5, origin=(-192.0, -192.0, -20.0))
    index = Index(cfg.index_path)
    for path in ct.files:
        ds = dcmread(path, stop_before_pixels=True)
        meta = InstanceMeta(str(ds.SOPInstanceUID), CT_CLASS, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                            "CT", "1.2.840.10008.1.2.1")
        index.add_instance(meta, path=path, size=path.stat().st_size, calling_ae="CT1", quiet_period_s=0)
    series_uid = str(dcmread(ct.files[0], stop_before_pixels=True).SeriesInstanceUID)
    bundle = next(b for b in discover_bundles(DEFAULT_BUNDLES_DIR, ()) if b.name == "body-lungs")
    (job_id,) = index.dispatch(series_uid, [bundle.id])
    assert index.claim_job("w") is not None
    out = run_job(ct.files, bundle, None, cfg.job_result_dir(job_id), provenance=Provenance.now("SEGNODE"))
    index.finish_job(job_id, result_dir=str(cfg.job_result_dir(job_id)), timings="{}", outbox=[])
    files = {o.kind: o.path for o in out.objects}
    from node.assemble.volume import build_volume, read_series

    grid = Grid.of(build_volume(read_series(ct.files)))
    return Site(cfg, index, ct.files, series_uid, files["RTSTRUCT"], files["SEG"], job_id, grid)


def _by_name(qa: QaSet) -> dict[str, StructureQa]:
    return {s.name: s for s in qa.structures}


def test_a_clinicians_edits_get_their_verdicts(site: Site) -> None:
    ds = site.edited("edited by Dr A")
    edit.move_roi(ds, "Lung_L", (3.0, 0.0, 0.0))
    edit.erode_roi(ds, "BODY", 2.0, slices=10)
    edit.delete_roi(ds, "Lung_R")
    k = len(site.grid.sop_instance_uids) // 2
    z = float(site.grid.geometry.slice_position(k)[2])
    edit.add_roi(ds, "GTV", [(edit.circle((0.0, 60.0, z), 15.0), site.grid.sop_instance_uids[k])])
    qa = site.submit(ds)
    assert qa.outcome is QaOutcome.COMPARED, qa.reason
    assert qa.ct_series_uid == site.ct_series_uid and qa.result_jobs == (site.job_id,)
    assert qa.label == "edited by Dr A"
    got = _by_name(qa)
    assert got["BODY"].verdict is EditVerdict.MINOR, got["BODY"]
    assert got["Lung_L"].verdict is EditVerdict.MAJOR, got["Lung_L"]
    assert got["Lung_L"].hd95_mm == pytest.approx(3.0, abs=1.6)  # 3 mm on a 1.5 mm grid
    assert got["Lung_R"].verdict is EditVerdict.DELETED and got["Lung_R"].change_pct == -100.0
    assert got["GTV"].verdict is EditVerdict.ADDED and got["GTV"].theirs_ml == pytest.approx(np.pi * 15**2 * 2.5e-3,
                                                                                               rel=0.15)
    assert got["BODY"].change_ml is not None and got["BODY"].change_ml < 0


def test_an_unchanged_copy_under_other_names_is_unchanged(site: Site) -> None:
    ds = site.edited("approved")
    for item in ds.StructureSetROISequence:
        item.ROIName = {"BODY": "External", "Lung_L": "LUNG_LT", "Lung_R": "lung r"}[str(item.ROIName)]
    got = _by_name(site.submit(ds))
    assert {n: s.verdict for n, s in got.items()} == dict.fromkeys(["BODY", "Lung_L", "Lung_R"],
                                                                   EditVerdict.UNCHANGED)
    assert got["BODY"].their_name == "External" and got["BODY"].dice == 1.0 and got["BODY"].hd95_mm == 0.0


def test_our_seg_reads_back_like_our_rtstruct(site: Site) -> None:
    _, from_rt = read_side(site.rtstruct, site.grid, bundle="b")
    _, from_seg = read_side(site.seg, site.grid, bundle="b")
    got = compare_structures(from_rt, from_seg, site.grid, QaConfig())
    assert {s.name: (s.verdict, s.dice) for s in got} == dict.fromkeys(["BODY", "Lung_L", "Lung_R"],
                                                                        (EditVerdict.UNCHANGED, 1.0))


def test_the_selection_the_clinician_received_is_the_one_compared(site: Site, tmp_path: Path) -> None:
    """With [output] structures per destination a bundle's result has one RTSTRUCT per selection: an edited set
    is compared with the one whose ROIs it carries, not with the first file (which would make the structures
    the TPS never received "deleted")."""
    subset = site.edited("the TPS's selection")
    for name in ("BODY", "Lung_R"):
        edit.delete_roi(subset, name)
    subset_path = tmp_path / "RTSTRUCT_subset.dcm"
    edit.save(subset, subset_path)
    both = OurResult(site.job_id, "body-lungs", (subset_path, site.rtstruct))
    aliases = QaConfig().alias_table()
    _, theirs_small = read_side(subset_path, site.grid)
    ours = read_ours([both], site.grid, theirs_small, aliases)
    assert [s.name for s in ours] == ["Lung_L"]
    got = compare_structures(ours, theirs_small, site.grid, QaConfig())
    assert [(s.name, s.verdict) for s in got] == [("Lung_L", EditVerdict.UNCHANGED)]
    _, theirs_all = read_side(site.rtstruct, site.grid)
    assert sorted(s.name for s in read_ours([both], site.grid, theirs_all, aliases)) == ["BODY", "Lung_L", "Lung_R"]
    # nothing in common (a set under unknown names): the larger selection, so every structure is accounted for
    assert len(read_ours([both], site.grid, [], aliases)) == 3


# ------------------------------------------------------------------------------------------------ bad input
def test_contours_off_the_ct_planes_are_named(site: Site) -> None:
    ds = site.edited("off plane")
    for item in ds.ROIContourSequence:
        if int(item.ReferencedROINumber) == edit._roi_number(ds, "Lung_L"):
            for contour in item.ContourSequence[:3]:
                points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
                points[:, 2] += 1.6  # more than half the 2.5 mm spacing off its image's plane
                contour.ContourData = [f"{v:.3f}" for v in points.reshape(-1)]
    qa = site.submit(ds)
    got = _by_name(qa)
    assert qa.outcome is QaOutcome.COMPARED
    assert got["Lung_L"].verdict is EditVerdict.NOT_COMPARED
    assert "could not be placed on the CT" in got["Lung_L"].note and "from the plane of slice" in got["Lung_L"].note
    assert got["BODY"].verdict is EditVerdict.UNCHANGED  # the others are still measured


def test_open_contours_are_named(site: Site) -> None:
    ds = site.edited("open")
    number = edit._roi_number(ds, "Lung_R")
    for item in ds.ROIContourSequence:
        if int(item.ReferencedROINumber) == number:
            for contour in item.ContourSequence:
                contour.ContourGeometricType = "OPEN_PLANAR"
    got = _by_name(site.submit(ds))
    assert got["Lung_R"].verdict is EditVerdict.NOT_COMPARED
    assert "open contour(s) (OPEN_PLANAR)" in got["Lung_R"].note


def test_self_intersecting_polygons_are_named_and_still_measured(site: Site) -> None:
    ds = site.edited("twisted")
    number = edit._roi_number(ds, "Lung_L")
    item = next(i for i in ds.ROIContourSequence if int(i.ReferencedROINumber) == number)
    contour = item.ContourSequence[len(item.ContourSequence) // 2]
    points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
    half = len(points) // 2
    points[[1, half]] = points[[half, 1]]  # two vertices swapped: the outline crosses itself
    contour.ContourData = [f"{v:.3f}" for v in points.reshape(-1)]
    got = _by_name(site.submit(ds))
    assert "self-intersecting polygon(s)" in got["Lung_L"].note
    assert got["Lung_L"].verdict in (EditVerdict.MINOR, EditVerdict.MAJOR, EditVerdict.UNCHANGED)
    assert got["Lung_L"].dice is not None


def test_a_missing_referenced_series_is_no_ai_result(site: Site) -> None:
    ds = site.edited("elsewhere")
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    ref.SeriesInstanceUID = "2.25.123456789"
    qa = site.submit(ds)
    assert qa.outcome is QaOutcome.NO_AI_RESULT and not qa.structures
    assert "references series 2.25.123456789, which the node never received" in qa.reason


def test_no_reference_at_all_is_rejected_with_the_reason(site: Site) -> None:
    ds = site.edited("unanchored")
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    for item in ds.ROIContourSequence:
        for contour in item.ContourSequence:
            contour.ContourImageSequence[0].ReferencedSOPInstanceUID = "2.25.1" + str(id(contour))
    qa = site.submit(ds)
    assert qa.outcome is QaOutcome.REJECTED
    assert "references no image series" in qa.reason and "none of the" in qa.reason


def test_missing_references_fall_back_to_the_contour_images(site: Site) -> None:
    ds = site.edited("MIM style")  # MIM may leave RTReferencedStudySequence out
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    qa = site.submit(ds)
    assert qa.outcome is QaOutcome.COMPARED and qa.ct_series_uid == site.ct_series_uid


def test_ten_thousand_rois_are_rejected_quickly(site: Site) -> None:
    ds = site.edited("too many")
    template = ds.StructureSetROISequence[0]
    for n in range(10_000):
        roi = copy.copy(template)
        roi.ROINumber = 1000 + n
        roi.ROIName = f"point {n}"
        ds.StructureSetROISequence.append(roi)
    started = time.monotonic()
    qa = site.submit(ds)
    assert qa.outcome is QaOutcome.REJECTED
    assert "has 10003 ROIs, more than qa.max_rois (1000)" in qa.reason
    assert time.monotonic() - started < 60


def test_unreadable_and_own_result_are_named(site: Site) -> None:
    qa = site.submit(b"DICM but not really" * 10)
    assert qa.outcome is QaOutcome.REJECTED and "not a readable DICOM file" in qa.reason
    own = dcmread(site.rtstruct)
    qa = site.submit(own)
    assert qa.outcome is QaOutcome.OWN_RESULT and f"job {site.job_id}'s own result" in qa.reason


# ------------------------------------------------------------------------------------------ the job and the report
class _Host:
    """What a worker gives a qa job: the index, the configuration, and how it records outcomes."""

    def __init__(self, index: Index, cfg: NodeConfig) -> None:
        self.index, self.cfg = index, cfg
        self.owner: JobOwner | None = None
        self.failures: list[Exception] = []

    def record(self, job_id: int, what: str, write: Callable[[], T]) -> T | None:
        return write()

    def failed(self, job: JobRecord, exc: Exception) -> None:
        self.failures.append(exc)


def test_the_qa_job_records_each_set_once_and_ends(site: Site, tmp_path: Path) -> None:
    ds = site.edited("job run")
    edit.move_roi(ds, "Lung_R", (0.0, 4.0, 0.0))
    path = edit.save(ds, site.cfg.spool_dir / "job-run.dcm")
    series = str(ds.SeriesInstanceUID)
    meta = InstanceMeta(str(ds.SOPInstanceUID), RTSTRUCT_CLASS, "2.25.1", series, "RTSTRUCT", "1.2.840.10008.1.2.1")
    site.index.add_instance(meta, path=path, size=path.stat().st_size, calling_ae="TPS", quiet_period_s=0)
    job_id = site.index.dispatch_qa(series, "edit QA")
    job = site.index.claim_job("w")
    assert job is not None and job.id == job_id and job.kind is JobKind.QA and job.bundle == "edit-qa"
    host = _Host(site.index, site.cfg)
    run_qa_job(host, job)
    done = site.index.job(job_id)
    assert done is not None and done.state is JobState.DONE, (done, host.failures)
    assert "Lung_R major edit" in done.note and "BODY unchanged" in done.note
    (stored,) = site.index.qa_sets(series_uid=series)
    assert stored.job_id == job_id and _by_name(stored)["Lung_R"].verdict is EditVerdict.MAJOR
    site.index.requeue_failed([job_id])  # not failed: nothing changes
    off = NodeConfig(state_dir=site.cfg.state_dir, qa=QaConfig(enabled=False))
    second = site.index.dispatch_qa(series, "edit QA")
    job = site.index.claim_job("w")
    assert job is not None and job.id == second
    run_qa_job(_Host(site.index, off), job)
    declined = site.index.job(second)
    assert declined is not None and declined.state is JobState.DECLINED and "[qa] enabled = false" in declined.error


def _row(at: float, dice: float, verdict: EditVerdict = EditVerdict.MINOR, name: str = "BODY") -> StructureRow:
    return StructureRow(at, "1.2", StructureQa(name, name, "body-lungs", verdict, dice=dice, surface_dice_2mm=dice))


def test_report_flags_a_recent_drop_below_the_control_limit() -> None:
    now = 100 * 86400.0
    rng = np.random.default_rng(1)
    earlier = [_row(now - (60 - d) * 86400, float(0.95 + rng.normal(0, 0.005))) for d in range(20)]
    recent = [_row(now - d * 86400, 0.85, EditVerdict.MAJOR) for d in range(3)]
    added = [StructureRow(now, "1.2", StructureQa("PTV", "PTV", "", EditVerdict.ADDED, theirs_ml=5.0))]
    report = build_report(earlier + recent + added, QaConfig(recent_days=30), until=now)
    (body,) = report.structures
    assert body.n == 23 and body.recent_n == 3 and body.major == round(3 / 23, 3)
    assert body.dice_limit is not None and 0.9 < body.dice_limit < 0.95
    assert body.flags and "recent median Dice 0.850 is below its control limit" in body.flags[0]
    assert report.added == {"PTV": 1}
    text = render_text(report)
    assert "BODY" in text and "added by clinicians: PTV ×1" in text
    assert render_csv(report).splitlines()[0].startswith("bundle,name,n,median_dice")
    steady = build_report(earlier, QaConfig(recent_days=365, floor_dice=0.99), until=now)
    assert steady.structures[0].flags  # the configured floor applies without history
    assert control_limit([0.9] * 4, 0.0) is None  # too little history and no floor: no limit


def test_qa_cli_prints_the_sets_and_the_report(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    qa = site.submit(site.edited("recorded"))  # assess() stores nothing: record it as the qa job does
    site.index.record_qa(0, qa)
    state = ["--state-dir", str(site.cfg.state_dir)]
    assert main(["qa", "sets", *state, "--series", site.ct_series_uid]) == 0
    out = capsys.readouterr().out
    assert "recorded" in out and "BODY [body-lungs@1.0.0]: unchanged  Dice 1.000" in out, out
    assert main(["qa", "report", *state, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in report["structures"]} == {"BODY", "Lung_L", "Lung_R"}
    assert main(["qa", "report", *state, "--since", "2001-01-01", "--bundle", "body-lungs"]) == 0
    out = capsys.readouterr().out
    assert "median Dice" in out and "body-lungs@1.0.0  BODY" in out, out
    assert main(["qa", "report", *state, "--bundle", "liver", "--csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # the header only
    assert main(["qa", "report", *state, "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not a date" in capsys.readouterr().err
