"""The MR brain bundle (engines/brain-deepbet) against deepbet 1.0.2's own PyTorch pipeline, and end to end.

- The node's re-implementations of deepbet's helpers give PyTorch's nearest-exact indices, cc3d's largest
  component, fill_voids' filling and deepbet's box exactly.
- Parity: deepbet (SimpleITK → NIfTI → nibabel → TorchScript, CPU) and the node (its own DICOM reader →
  ONNX Runtime) on the shared T2 series (its one missing slice put back): Dice >= 0.99 on the node's grid.
  The model is meant for T1; both pipelines run on the T2 series for parity only (benchmarks/brain_parity.py).
- End to end: the same pixels with a 3D T1 (MPRAGE) header go through ``run_job`` (selection, segment_volume,
  the parts engine from the node's loader, cleaning, writers): SEG "Brain" and RTSTRUCT "Brain" pass the
  harness' reference and geometry checks and dciodvfy, and the SEG's brain is deepbet's. The T2 series as it
  is (2D FSE) is declined at job time with the reason. OpenVINO (what ``engines.backend = "auto"`` picks on a
  CPU machine where it is installed) gives deepbet's brain too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from benchmarks.brain_parity import compare, deepbet_on_node_grid, dice, regular_copy
from node.assemble.volume import build_volume, read_series
from node.config import NodeConfig
from node.errors import Declined
from node.infer import brain
from node.infer.backends.loader import EngineLoader
from node.infer.engine import Engine
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.model.enums import EngineBackend
from tests.harness.dcmtk import tool_missing_reason
from tests.harness.result_checks import assert_dciodvfy_clean, check_rtstruct, check_seg, read_sources
from tests.harness.writing import PROV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"
T2 = REPO.parent / "shared" / "data" / "mr" / "adi-brain-t2"
#: A Siemens 3D MPRAGE's header facts, put on the shared series' pixels for the end-to-end variant.
MPRAGE = {"MRAcquisitionType": "3D", "SliceThickness": "1.0", "ScanningSequence": ["GR", "IR"],
          "SequenceVariant": ["SK", "SP", "MP"], "EchoTime": "2.98", "RepetitionTime": "2300",
          "InversionTime": "900", "FlipAngle": "9", "SeriesDescription": "t1_mprage (test variant of AX FSE T2)"}


def _need_data() -> None:
    if not T2.is_dir():
        pytest.skip(f"{T2} is absent (the shared real-data folder is not on this machine)")


@pytest.fixture(scope="module")
def regular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_data()
    return regular_copy(T2, tmp_path_factory.mktemp("t2") / "series")


@pytest.fixture(scope="module")
def parity(regular: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], np.ndarray]:
    """Both pipelines on the regular T2 copy: the figures, and deepbet's mask on the node's grid."""
    for module in ("torch", "deepbet", "nibabel", "SimpleITK"):
        pytest.importorskip(module, reason=f"{module} is needed to run deepbet's own pipeline")
    work = tmp_path_factory.mktemp("parity")
    figures = compare(regular, 2, work)
    return figures, deepbet_on_node_grid(regular, work / "deepbet.nii.gz")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The bundle's parts engine (one ONNX Runtime session per part), from the node's own loader."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the bundle's networks")
    (bundle,) = discover_bundles(ENGINES, ("brain-deepbet",))
    loader = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.CPU,
                                                 engine_threads=2, state_dir=tmp_path_factory.mktemp("state")))
    loaded = loader.get(bundle).engine
    assert loaded is not None
    yield loaded
    loader.close()


def test_nearest_exact_indices_are_pytorchs() -> None:
    torch = pytest.importorskip("torch", reason="torch is needed to compare with F.interpolate")
    import torch.nn.functional as F

    for n_in, n_out in ((55, 128), (56, 128), (384, 128), (512, 128), (173, 256), (240, 256), (97, 256),
                        (300, 256), (256, 231), (128, 411), (1, 5), (7, 3)):
        source = torch.arange(n_in, dtype=torch.float32)[None, None, :, None, None].expand(1, 1, n_in, 1, 1)
        expected = F.interpolate(source, (n_out, 1, 1), mode="nearest-exact")[0, 0, :, 0, 0].long().numpy()
        assert np.array_equal(brain.nearest_exact_indices(n_in, n_out), expected), (n_in, n_out)


def test_components_and_voids_are_cc3d_and_fill_voids() -> None:
    pytest.importorskip("deepbet", reason="deepbet (with cc3d and fill_voids) is needed as the reference")
    import fill_voids
    from deepbet.utils import keep_largest_connected_component
    from scipy import ndimage

    for seed in range(6):
        noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((48, 40, 44)), 1.5)
        mask = noise > np.quantile(noise, 0.55 + 0.05 * (seed % 3))  # many blobs, diagonal contacts, voids
        theirs = keep_largest_connected_component(mask.copy().astype(np.float32)) > 0
        ours = brain.keep_largest_component(mask)
        assert np.array_equal(ours, theirs), seed
        assert np.array_equal(brain.fill_voids(mask), fill_voids.fill(mask)), seed
        assert brain.fill_voids(mask).sum() > mask.sum() or seed > 2  # the lower thresholds have voids to fill


def test_the_box_is_deepbets() -> None:
    torch = pytest.importorskip("torch", reason="torch is needed to run deepbet's box code")
    pytest.importorskip("deepbet", reason="deepbet is the reference")
    from deepbet.bet import BrainExtraction

    rng = np.random.default_rng(3)
    for shape in ((176, 240, 256), (384, 512, 56), (181, 217, 181), (97, 300, 129)):
        small = np.zeros((128, 128, 128), dtype=bool)
        lo = rng.integers(5, 50, size=3)
        hi = lo + rng.integers(30, 70, size=3)
        small[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(hi - lo)) > 0.3
        theirs = BrainExtraction.get_bbox_with_margin(BrainExtraction, torch.from_numpy(small.astype(np.float32)),
                                                      shape, 0.1)
        assert brain.box_with_margin(small, shape) == theirs, shape
    with pytest.raises(Declined, match="the brain locator found no brain"):
        brain.box_with_margin(np.zeros((128, 128, 128), dtype=bool), (176, 240, 256))


def test_parity_with_deepbet_on_the_shared_t2_series(parity: tuple[dict[str, object], np.ndarray]) -> None:
    figures, theirs = parity
    assert int(theirs.sum()) > 1_000_000  # a head's worth of voxels at 0.43 mm, not an empty comparison
    assert float(figures["dice"]) >= 0.99, figures  # type: ignore[arg-type]
    # The comparison sees a mistake: the same mask one slice off scores far lower.
    assert dice(theirs, np.roll(theirs, 4, axis=0)) < 0.97


def test_openvino_gives_deepbets_brain_too(regular: Path, parity: tuple[dict[str, object], np.ndarray],
                                           tmp_path: Path) -> None:
    """``engines.backend = "auto"`` runs the bundle in OpenVINO (FP32, as its [cpu] asks) where it is installed."""
    from node.infer.backends.openvino import status as openvino_status
    from node.infer.parts import part_engines

    found = openvino_status()
    if not found.available:
        pytest.skip(found.detail)
    (bundle,) = discover_bundles(ENGINES, ("brain-deepbet",))
    loader = EngineLoader.from_config(NodeConfig(bundles_dir=ENGINES, engine_backend=EngineBackend.OPENVINO,
                                                 engine_threads=2, state_dir=tmp_path / "state"))
    try:
        loaded = loader.get(bundle)
        assert loaded.description.count("OpenVINO FP32") == 2, loaded.description
        labels = brain.brain_labels(build_volume(read_series(sorted(regular.iterdir()))), bundle,
                                    part_engines(bundle, loaded.engine))
    finally:
        loader.close()
    assert dice(labels > 0, parity[1]) >= 0.99


def _t1_variant(regular: Path, out: Path) -> list[Path]:
    """The regular series' pixels and geometry with an MPRAGE's header facts, as a new series."""
    out.mkdir(parents=True)
    series_uid = generate_uid(entropy_srcs=[str(regular), "t1-variant"])
    files = []
    for path in sorted(regular.iterdir()):
        ds = copy.deepcopy(dcmread(path))
        for keyword, value in MPRAGE.items():
            setattr(ds, keyword, value)
        ds.SeriesInstanceUID = series_uid
        uid = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "t1-variant"])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(out / path.name, enforce_file_format=True)
        files.append(out / path.name)
    return files


def test_t1_variant_end_to_end_writes_a_valid_brain(regular: Path, parity: tuple[dict[str, object], np.ndarray],
                                                     engine: Engine, tmp_path: Path) -> None:
    if reason := tool_missing_reason("dciodvfy"):
        pytest.skip(reason)
    (bundle,) = discover_bundles(ENGINES, ("brain-deepbet",))
    files = _t1_variant(regular, tmp_path / "t1")
    outcome = run_job(files, bundle, engine, tmp_path / "out", provenance=PROV)
    assert outcome.structures == ["Brain"]
    [brain_ml] = [v.volume_ml for v in outcome.volumes]
    assert 900.0 < brain_ml < 2000.0, outcome.volumes  # deepbet's mask of an adult head (brain and its CSF)
    paths = {o.kind: o.path for o in outcome.objects}
    sources = read_sources(files)
    seg = check_seg(paths["SEG"], sources, {"Brain"})
    rt = check_rtstruct(paths["RTSTRUCT"], sources, {"Brain"})
    assert str(seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue) == "12738006"
    assert str(rt.RTROIObservationsSequence[0].RTROIInterpretedType) == "ORGAN"
    for path in paths.values():
        assert_dciodvfy_clean(path)
    volume = build_volume(read_series(files))
    uids = [str(h.SOPInstanceUID) for h in volume.headers]
    delivered = hd.seg.segread(paths["SEG"]).get_pixels_by_source_instance(
        uids, segment_numbers=[1], combine_segments=False)[..., 0] > 0
    assert dice(delivered, parity[1]) >= 0.99  # deepbet's brain, through the writers' contour cleaning


def test_the_t2_series_is_declined_at_job_time_with_the_reason(regular: Path, engine: Engine,
                                                               tmp_path: Path) -> None:
    (bundle,) = discover_bundles(ENGINES, ("brain-deepbet",))
    with pytest.raises(Declined, match=r"brain-deepbet takes only 3D T1-weighted MR .*a 2D acquisition \(3D taken\)"
                                       r".*echo time 91 ms \(at most 10 ms\)"):
        run_job(sorted(regular.iterdir()), bundle, engine, tmp_path / "out", provenance=PROV)
