"""Issue 16, items 3 and 4, on a real head CT (``../shared/data/ct/philips-head-5mm``, 28 slices of 5 mm)
made quirky in tmp_path: an uneven stack (13 gaps of 4 mm, one of 1.08 mm, 13 of 7 mm: a real GE head
protocol) and one FrameOfReferenceUID per instance (de-identified research data).

Both once failed every job ("slice spacing is not uniform … mostly 4.00 mm", "the series mixes
FrameOfReferenceUID values"). BODY, contoured slice by slice, is now produced on the uneven stack with
every SEG frame and every RTSTRUCT contour on its own slice's real position; a network bundle declines
it naming the gaps, or resamples it when its manifest says so; the frames are settled by the stated
rule, and both results reference that one frame of reference and pass dciodvfy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.assemble.volume import build_volume, read_series
from node.errors import Declined, VolumeError
from node.infer.manifest import load_bundle
from node.infer.segment import segment_volume
from node.infer.uneven import regularise
from node.jobs.pipeline import JobOutcome, run_job
from node.model.volume import MixedFrames, UnevenSlices
from node.write.provenance import Provenance
from tests.harness.dcmtk import dciodvfy, tool_missing_reason
from tests.harness.quirks import GE_HEAD_GAPS, per_instance_frames, read_in_slice_order, uneven_stack, write_series
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS

ROOT = Path(__file__).resolve().parents[2]
HEAD = ROOT.parent / "shared" / "data" / "ct" / "philips-head-5mm" / "S2010"
GAPS_TEXT = "13 gaps of 4.0 mm, 13 of 7.0 mm, 1 of 1.08 mm"

pytestmark = pytest.mark.skipif(not HEAD.is_dir(), reason=f"real head CT not found at {HEAD}")


def _job(paths: list[Path], bundle_name: str, out: Path, **options: object) -> JobOutcome:
    bundle = load_bundle(ROOT / "engines" / bundle_name)
    return run_job(paths, bundle, None, out, provenance=Provenance.now("SEGNODE"), **options)  # type: ignore[arg-type]


def _objects(outcome: JobOutcome) -> dict[str, Path]:
    return {str(dcmread(o.path, stop_before_pixels=True).SOPClassUID): o.path for o in outcome.objects}


def _assert_dciodvfy_clean(path: Path) -> None:
    if tool_missing_reason("dciodvfy"):
        return  # the geometry checks still ran; the validator is checked where it is installed
    report = dciodvfy(path)
    assert report.ok, f"dciodvfy errors in {path.name}:\n" + "\n".join(report.errors)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    datasets = read_in_slice_order(HEAD)
    positions = uneven_stack(datasets)
    return write_series(datasets, tmp_path_factory.mktemp("uneven")), positions


def test_uneven_stack_forms_a_volume_that_keeps_every_position(uneven: tuple[list[Path], np.ndarray]) -> None:
    paths, positions = uneven
    volume = build_volume(read_series(paths))
    g = volume.geometry
    assert not g.is_uniform and g.gap_summary() == GAPS_TEXT
    assert np.allclose(g.gaps(), GE_HEAD_GAPS, atol=1e-3)
    for k in (0, 13, 14, 27):
        assert np.allclose(g.to_patient(np.array([k, 0, 0])), positions[k], atol=1e-3)
        assert np.allclose(g.slice_position(k), positions[k], atol=1e-3)
    assert "SpacingBetweenSlices" not in volume.headers[0]  # the source's constant 5 mm would be false


def test_body_is_produced_on_each_real_slice(uneven: tuple[list[Path], np.ndarray], tmp_path: Path) -> None:
    paths, positions = uneven
    outcome = _job(paths, "body-lungs", tmp_path)
    assert outcome.structures == ["BODY"]
    objects = _objects(outcome)
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): k for k, p in enumerate(paths)}

    seg = hd.seg.segread(objects[SEG_CLASS])
    assert "SpacingBetweenSlices" not in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(paths)
    for frame in frames:
        k = by_uid[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        placed = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(placed, positions[k], atol=1e-3), (k, placed, positions[k])
    # A reader takes the frames by source image (highdicom refuses to make a regular volume of them: right).
    uids = sorted(by_uid, key=by_uid.__getitem__)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert pixels.shape[0] == len(paths) and int((pixels.reshape(len(paths), -1).sum(axis=1) > 0).sum()) >= 20

    rt = dcmread(objects[RTSTRUCT_CLASS])
    on_slices: set[int] = set()
    for roi in rt.ROIContourSequence:
        for contour in roi.ContourSequence:
            k = by_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            z = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)[:, 2]
            assert np.abs(z - positions[k][2]).max() < 1e-2, (k, z[:3], positions[k])
            on_slices.add(k)
    assert len(on_slices) >= 20, f"BODY on only {len(on_slices)} of {len(paths)} slices"
    for path in objects.values():
        _assert_dciodvfy_clean(path)


def test_body_volume_weighs_each_slice_by_its_own_thickness(uneven: tuple[list[Path], np.ndarray],
                                                           tmp_path: Path) -> None:
    paths, _ = uneven
    volume = build_volume(read_series(paths))
    thickness = volume.geometry.slice_thicknesses()
    assert thickness[0] == pytest.approx(4.0) and thickness[-1] == pytest.approx(7.0)
    assert thickness[13] == pytest.approx((4.0 + 1.08) / 2) and thickness[14] == pytest.approx((1.08 + 7.0) / 2)
    assert thickness.sum() == pytest.approx(sum(GE_HEAD_GAPS) + (4.0 + 7.0) / 2)


def test_network_bundles_resample_or_decline_naming_the_gaps(uneven: tuple[list[Path], np.ndarray],
                                                             tmp_path: Path) -> None:
    paths, _ = uneven
    liver = load_bundle(ROOT / "engines" / "liver")
    volume = build_volume(read_series(paths))
    # The liver resamples uneven stacks, but its limit of 5 mm between slices judges the real 7 mm gaps.
    with pytest.raises(Declined, match=rf"at most 5 mm apart; this series has gaps of up to 7.00 mm \({GAPS_TEXT}\)"):
        segment_volume(volume, liver, None)
    declining = dataclasses.replace(
        liver, preprocess=dataclasses.replace(liver.preprocess, uneven_slices=UnevenSlices.DECLINE))
    with pytest.raises(Declined, match=rf"needs evenly spaced slices .*; this series has {GAPS_TEXT}$"):
        segment_volume(volume, declining, None)


def test_regular_grid_of_an_uneven_stack_lands_back_on_each_slice(uneven: tuple[list[Path], np.ndarray]) -> None:
    paths, _ = uneven
    volume = build_volume(read_series(paths))
    regular, nearest = regularise(volume, 1.5)
    g = regular.geometry
    assert g.is_uniform and g.spacing[0] <= 1.5 and g.shape[0] == int(np.ceil(sum(GE_HEAD_GAPS) / 1.5)) + 1
    # every real slice has a regular plane within half a step, and that plane holds (nearly) its pixels
    along = volume.geometry.along_normal()
    assert np.abs(nearest * g.spacing[0] - along).max() <= g.spacing[0] / 2 + 1e-6
    ends = [0, len(paths) - 1]
    assert np.array_equal(regular.voxels[nearest[ends]], volume.voxels[ends].astype(np.float32))


def test_a_resampling_network_segments_an_uneven_stack_of_real_slices() -> None:
    """body-threshold (a real ONNX network, ``uneven_slices = "resample"``) on the head with slices dropped
    (6 gaps of 5 mm, then 10 of 10 mm: every kept slice at its real position) agrees with its result on
    the whole series at those slices; what differs comes from the slices the uneven stack lacks."""
    from node.config import NodeConfig
    from node.infer.backends.loader import EngineLoader
    from node.model.enums import EngineBackend

    bundle = load_bundle(ROOT / "engines" / "body-threshold")
    engine = EngineLoader.from_config(NodeConfig(engine_backend=EngineBackend.CPU, engine_threads=1)).get(bundle).engine
    datasets = read_in_slice_order(HEAD)
    keep = [*range(7), *range(8, 28, 2)]
    full = segment_volume(build_volume(read_series(sorted(p for p in HEAD.iterdir() if p.name.startswith("I")))),
                          bundle, engine)[keep] > 0
    volume = build_volume([datasets[k] for k in keep])
    assert volume.geometry.gap_summary() == "10 gaps of 10.0 mm, 6 of 5.0 mm"
    uneven = segment_volume(volume, bundle, engine) > 0
    assert uneven.shape == full.shape
    dice = [2 * (a & b).sum() / max(1, a.sum() + b.sum()) for a, b in zip(full, uneven, strict=True)]
    assert 2 * (full & uneven).sum() / (full.sum() + uneven.sum()) > 0.85, dice
    assert float(np.median(dice)) > 0.95, dice


def test_missing_slices_and_two_stacks_are_still_refused(tmp_path: Path) -> None:
    datasets = read_in_slice_order(HEAD)[:12]
    uneven_stack(datasets, (5.0,) * 5 + (10.0,) + (5.0,) * 5)
    with pytest.raises(VolumeError, match=r"slices are missing \(1 between them\)"):
        build_volume(datasets)
    datasets = read_in_slice_order(HEAD)[:12]
    uneven_stack(datasets, (5.0,) * 5 + (94.0,) + (5.0,) * 5)
    with pytest.raises(VolumeError, match="separate stacks"):
        build_volume(datasets)


def test_one_frame_of_reference_per_instance_is_settled_and_written_consistently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets = read_in_slice_order(HEAD)
    frames = per_instance_frames(datasets)
    paths = write_series(datasets, tmp_path / "in")
    with caplog.at_level(logging.WARNING, logger="node.assemble.volume"):
        outcome = _job(paths, "body-lungs", tmp_path / "out")
    chosen = frames[0]  # every value once: the rule takes the first slice's along the normal
    assert f"one frame of reference, {chosen}, the first slice's along the normal" in outcome.note
    assert "28 different FrameOfReferenceUID values" in outcome.note
    assert chosen in caplog.text
    objects = _objects(outcome)
    seg = dcmread(objects[SEG_CLASS])
    assert seg.FrameOfReferenceUID == chosen
    rt = dcmread(objects[RTSTRUCT_CLASS])
    assert rt.FrameOfReferenceUID == chosen
    assert [str(f.FrameOfReferenceUID) for f in rt.ReferencedFrameOfReferenceSequence] == [chosen]
    assert {str(r.ReferencedFrameOfReferenceUID) for r in rt.StructureSetROISequence} == {chosen}
    for path in objects.values():
        _assert_dciodvfy_clean(path)


def test_one_frame_of_reference_per_instance_declined_under_the_setting(tmp_path: Path) -> None:
    datasets = read_in_slice_order(HEAD)
    per_instance_frames(datasets)
    paths = write_series(datasets, tmp_path / "in")
    with pytest.raises(Declined, match=r"28 different FrameOfReferenceUID values .*mixed_frames_of_reference"):
        _job(paths, "body-lungs", tmp_path / "out", mixed_frames=MixedFrames.DECLINE)
