"""The GPU path for imported nnU-Net bundles, decided on the CPU against recorded GPU profiles: the tile batch
comes from the patch size and the free memory (not the manifest's ``batch = 1``), the plan cache key follows
the imported ONNX file, and the precision check's input stays in the range the bundle feeds. No GPU, CUDA
or TensorRT is needed; importing the tests' tiny nnU-Net model needs torch and nnunetv2."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.infer.gpu.backend import model_input, plan_engine
from node.infer.gpu.check import check_input
from node.infer.gpu.plan import MAX_BATCH_CAP, TILE_BATCH_VOXELS, tile_batch_for_patch
from node.infer.gpu.profile import GpuProfile
from node.infer.manifest import load_bundle
from node.infer.window import sliding_window, tiles_per_batch
from node.model.bundle import Bundle
from node.model.enums import IntensityScheme

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "tests" / "data" / "gpu_profiles"
TRT = "11.4.0.106"
MiB = 1 << 20


def gpu(name: str) -> GpuProfile:
    return GpuProfile.load(PROFILES / f"{name}.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tests' tiny nnU-Net model (random weights), imported by ``import_nnunet``."""
    pytest.importorskip("torch", reason="importing an nnU-Net model needs torch (the [import] extra)")
    pytest.importorskip("nnunetv2", reason="importing an nnU-Net model needs nnunetv2 (the [import] extra)")
    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_tiny import LABELS_CSV, make_model_folder

    root = tmp_path_factory.mktemp("tiny")
    (root / "engines").mkdir()
    return import_nnunet(make_model_folder(root / "model"), root / "engines" / "tiny", labels_map=LABELS_CSV).bundle


def _retrained(bundle: Bundle, dst: Path) -> Bundle:
    """A copy of ``bundle`` whose network has other weights (a retrained model imported under the same name)."""
    import onnx

    assert bundle.model_file is not None
    shutil.copytree(bundle.directory, dst)
    model = onnx.load(str(bundle.model_file))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 5)
    values = onnx.numpy_helper.to_array(weight) + np.float32(0.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(dst / bundle.model_file.name))
    digest = hashlib.sha256((dst / bundle.model_file.name).read_bytes()).hexdigest()
    manifest = dst / "manifest.toml"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(bundle.model_sha256, digest), encoding="utf-8")
    return load_bundle(dst)


# ---------------------------------------------------------------------------------- the patch's batch
@pytest.mark.parametrize("patch, batch", [
    ((128, 128, 128), 8),     # 2 M voxels a tile
    ((160, 128, 112), 4),     # nnU-Net's planner at 1.5 and 3 mm for a CT dataset: 2.3 M voxels -> 7 -> 4
    ((32, 128, 128), 32),     # body-threshold's tiles
    ((16, 64, 64), MAX_BATCH_CAP),
    ((256, 256, 256), 1),     # one tile is the whole budget
    ((512, 512, 512), 1),     # more than the budget: still one
])
def test_the_tile_batch_follows_the_patch_size(patch: tuple[int, int, int], batch: int) -> None:
    got = tile_batch_for_patch(patch)
    assert got == batch
    assert got & (got - 1) == 0  # a power of two: small changes do not change the plan key
    assert got == 1 or got * int(np.prod(patch)) <= TILE_BATCH_VOXELS


def test_a_patch_without_voxels_is_refused() -> None:
    with pytest.raises(Exception, match=r"patch \(0, 64, 64\): every side must be at least 1 voxel"):
        tile_batch_for_patch((0, 64, 64))


def test_a_large_patch_caps_the_batch_that_memory_would_allow() -> None:
    body = load_bundle(REPO / "engines" / "body-threshold")
    small = plan_engine(body, gpu("h200-141gb"), TRT)
    large_window = dataclasses.replace(body.window, patch=(128, 128, 128))
    large = plan_engine(dataclasses.replace(body, window=large_window), gpu("h200-141gb"), TRT)
    assert small.sizing.max_batch == 32 and large.sizing.max_batch == 8
    assert "at most 8 by the tile size" in large.sizing.reason
    assert large.key.profiles[0].max_shape == (8, 1, 128, 128, 128)


# ------------------------------------------------------------------------- an imported nnU-Net bundle
def test_an_imported_bundle_has_a_dynamic_batch_and_says_batch_1(tiny: Bundle) -> None:
    assert tiny.window.batch == 1  # what import-nnunet writes: the CPU's batch
    shape = model_input(tiny)
    assert shape.fixed_batch is None and shape.sample_shape == (1, 1, *tiny.window.patch)


@pytest.mark.parametrize("name", ["h200-141gb", "a100-sxm4-40gb", "t4-16gb", "gtx1650-4gb"])
def test_an_imported_bundle_runs_full_batches_sized_by_memory_and_patch(tiny: Bundle, name: str) -> None:
    plan = plan_engine(tiny, gpu(name), TRT)
    s = plan.sizing
    cap = tile_batch_for_patch(tiny.window.patch)
    assert s.min_batch == 1 and s.opt_batch == s.max_batch  # the pipeline runs full batches: optimise for them
    assert 1 < s.max_batch <= cap  # not the manifest's 1
    assert s.fixed_bytes + s.max_batch * s.per_sample_bytes <= s.budget_bytes
    profile = plan.key.profiles[0]
    assert profile.name == tiny.input_name
    assert profile.opt_shape == profile.max_shape == (s.max_batch, 1, *tiny.window.patch)


def test_less_free_memory_gives_an_imported_bundle_no_bigger_batch(tiny: Bundle) -> None:
    t4 = gpu("t4-16gb")
    batches = [plan_engine(tiny, t4.with_free_memory(int(gib * (1 << 30))), TRT).sizing.max_batch
               for gib in (16, 2, 1.5, 1.4, 1.3)]
    assert batches == sorted(batches, reverse=True) and batches[0] == tile_batch_for_patch(tiny.window.patch)
    assert batches[-1] < batches[0]


def test_the_plan_key_of_an_imported_bundle_follows_its_onnx_file(tiny: Bundle, tmp_path: Path) -> None:
    h200 = gpu("h200-141gb")
    key = plan_engine(tiny, h200, TRT).key
    assert key.onnx_sha256 == tiny.model_sha256 and key.bundle == tiny.id
    again = plan_engine(load_bundle(tiny.directory), h200.with_free_memory(h200.free_memory_bytes - 500 * MiB), TRT)
    assert again.key.digest == key.digest  # the same import, a little less memory free: the same plan
    retrained = _retrained(tiny, tmp_path / "tiny")  # same name, plans and version; other weights
    assert retrained.id == tiny.id and retrained.model_sha256 != tiny.model_sha256
    other = plan_engine(retrained, h200, TRT).key
    assert other.digest != key.digest and any(d.startswith("onnx_sha256") for d in other.differences(key.as_dict()))
    assert plan_engine(tiny, gpu("a100-sxm4-40gb"), TRT).key.digest != key.digest


def test_the_precision_check_feeds_an_imported_bundle_its_normalised_range(tiny: Bundle) -> None:
    pre = tiny.preprocess
    lo, hi = sorted(((pre.clip[0] + pre.offset) * pre.scale, (pre.clip[1] + pre.offset) * pre.scale))
    tiles = check_input(tiny, batch=2)
    assert tiles.shape == (2, 1, *tiny.window.patch) and tiles.dtype == np.float32
    assert lo <= tiles.min() < tiles.max() <= hi and hi - lo < 20  # CT normalisation: a few standard deviations


def test_an_unbounded_normalisation_is_checked_on_ct_values_not_a_million(tiny: Bundle) -> None:
    """A bundle whose clip does not bound the input (nnU-Net's NoNormalization: ±1e6) is checked on the
    12-bit CT range: ±1e6 overflows FP16 (65504) and no series feeds it."""
    unbounded = dataclasses.replace(tiny, preprocess=dataclasses.replace(tiny.preprocess, clip=(-1e6, 1e6),
                                                                         offset=0.0, scale=1.0))
    tiles = check_input(unbounded)
    assert -1024.0 <= tiles.min() < tiles.max() <= 3071.0


def test_a_z_scored_input_is_checked_within_four_standard_deviations(tiny: Bundle) -> None:
    zscored = dataclasses.replace(tiny, preprocess=dataclasses.replace(tiny.preprocess, clip=(-1e6, 1e6), offset=0.0,
                                                                       scale=1.0, normalisation=IntensityScheme.ZSCORE))
    tiles = check_input(zscored)
    assert -4.0 <= tiles.min() < 0.0 < tiles.max() <= 4.0


# ------------------------------------------------------------------ the window runs the engine's batch
class _Recorder:
    """Returns each tile's mean as a one-channel probability; records the batch sizes it was given."""

    name = "recorder"

    def __init__(self, max_batch: int | None) -> None:
        if max_batch is not None:
            self.max_batch = max_batch
        self.batches: list[int] = []

    def run(self, tiles: np.ndarray) -> np.ndarray:
        self.batches.append(len(tiles))
        return np.ascontiguousarray(tiles, dtype=np.float32)  # identity: one channel


@pytest.mark.parametrize("engine_batch, manifest_batch, expected", [(None, 1, 1), (None, 3, 3), (4, 1, 4), (8, 2, 8)])
def test_the_window_runs_the_engines_own_batch(engine_batch: int | None, manifest_batch: int, expected: int) -> None:
    image = np.random.default_rng(0).normal(size=(20, 40, 40)).astype(np.float32)
    engine = _Recorder(engine_batch)
    assert tiles_per_batch(engine, manifest_batch) == expected
    out = sliding_window(image, engine, patch=(8, 16, 16), overlap=0.5, batch=manifest_batch, pad_value=0.0)
    assert max(engine.batches) == expected and sum(engine.batches) == 4 * 4 * 4
    np.testing.assert_allclose(out[0], image, rtol=1e-6, atol=1e-6)  # identity tiles blend back to the image


def test_the_window_gives_the_engines_memory_back_after_its_last_batch() -> None:
    class Releasing(_Recorder):
        def __init__(self) -> None:
            super().__init__(None)
            self.released_after: list[int] = []

        def release_memory(self) -> None:
            self.released_after.append(len(self.batches))

    engine = Releasing()
    image = np.zeros((20, 40, 40), dtype=np.float32)
    sliding_window(image, engine, patch=(8, 16, 16), overlap=0.5, batch=16, pad_value=0.0)
    assert engine.released_after == [len(engine.batches)] == [4]  # once, after the last of 64 tiles in 16s
