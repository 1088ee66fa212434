"""Bundles of several networks (``[model] kind = "parts"``): the manifest's ``[[parts]]``, one engine per part
made by the ordinary loader, and the overlay merge (later parts on top, TotalSegmentator's order).

The parts are the body-threshold bundle's real ONNX network run twice with different normalisations: as
shipped it labels tissue above about -300 HU, with offset -500 it labels what is above about +200 HU (bone).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.errors import BundleError
from node.infer.backends.base import BackendSettings
from node.infer.backends.loader import EngineLoader
from node.infer.manifest import load_bundle, verify_model
from node.infer.parts import PartsEngine
from node.infer.segment import segment_volume
from node.model.enums import EngineBackend, ModelKind, PartsCombine
from node.model.volume import Geometry, Volume

MODEL = Path(__file__).resolve().parents[2] / "engines" / "body-threshold" / "model.onnx"
SHA = hashlib.sha256(MODEL.read_bytes()).hexdigest()

LABELS = """
[[labels]]
value = 1
name = "Tissue"
roi_name = "Soft_Tissue"
category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "85756007", meaning = "Tissue" }
color_rgb = [200, 120, 100]
rt_roi_type = "ORGAN"

[[labels]]
value = 7
name = "Bone"
category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "272673000", meaning = "Bone" }
color_rgb = [240, 240, 220]
rt_roi_type = "ORGAN"
"""


def _part(name: str, offset: float, values: str) -> str:
    return f"""
[[parts]]
name = "{name}"
file = "net.onnx"
sha256 = "{SHA}"
values = {values}
[parts.preprocess]
clip = [-1024.0, 3071.0]
offset = {offset}
scale = 0.001
[parts.window]
patch = [16, 32, 32]
overlap = 0.25
batch = 2
"""


def _bundle_dir(tmp_path: Path, parts: str, labels: str = LABELS) -> Path:
    d = tmp_path / "two-parts"
    d.mkdir(exist_ok=True)
    shutil.copyfile(MODEL, d / "net.onnx")
    (d / "manifest.toml").write_text(f"""
[bundle]
name = "two-parts"
version = "1.0.0"

[model]
kind = "parts"
combine = "overlay"

[select]
modalities = ["CT"]

[algorithm]
name = "two-parts"
family = {{ scheme = "DCM", value = "113076", meaning = "Segmentation" }}
{labels}
{parts}
""")
    return d


def _volume(shape: tuple[int, int, int] = (20, 48, 48)) -> Volume:
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, 8:40, 8:40] = 40  # soft tissue block
    hu[5:15, 18:30, 18:30] = 700  # a bone inside it
    geometry = Geometry(origin=np.zeros(3), row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
                        normal=np.array([0, 0, 1.0]), slice_step=np.array([0, 0, 2.0]), spacing=(2.0, 1.0, 1.0),
                        shape=shape)
    return Volume(voxels=hu, geometry=geometry, headers=[])


def test_parts_are_complete_single_network_bundles(tmp_path: Path) -> None:
    bundle = load_bundle(_bundle_dir(tmp_path, _part("tissue", 0.0, "[[1, 1]]") + _part("bone", -500.0, "[[1, 7]]")))
    assert bundle.model_kind is ModelKind.PARTS and bundle.combine is PartsCombine.OVERLAY
    assert bundle.model_file is None
    assert [p.name for p in bundle.parts] == ["tissue", "bone"]
    bone = bundle.parts[1]
    assert bone.bundle.name == "two-parts.bone" and bone.bundle.model_kind is ModelKind.ONNX
    assert bone.bundle.model_file == bundle.directory / "net.onnx"
    assert bone.bundle.preprocess.offset == -500.0 and bone.bundle.window.patch == (16, 32, 32)
    assert [(lab.value, lab.name) for lab in bone.bundle.labels] == [(1, "Bone")]  # the network's own class
    assert bone.lookup()[1] == 7 and bone.lookup()[0] == 0
    assert [n.name for n in bundle.networks] == ["two-parts.tissue", "two-parts.bone"]
    assert bundle.labels[0].structure_set_name == "Soft_Tissue" and bundle.labels[1].structure_set_name == "Bone"
    verify_model(bundle)


def test_each_part_gets_its_engine_and_later_parts_overlay_earlier(tmp_path: Path) -> None:
    bundle = load_bundle(_bundle_dir(tmp_path, _part("tissue", 0.0, "[[1, 1]]") + _part("bone", -500.0, "[[1, 7]]")))
    loader = EngineLoader(EngineBackend.CPU, BackendSettings(tmp_path))
    loaded = loader.get(bundle)
    assert isinstance(loaded.engine, PartsEngine) and set(loaded.engine.parts) == {"tissue", "bone"}
    assert "tissue:" in loaded.description and "bone:" in loaded.description
    with pytest.raises(BundleError, match="several networks"):
        loaded.engine.run(np.zeros((1, 1, 16, 32, 32), np.float32))
    volume = _volume()
    labels = segment_volume(volume, bundle, loaded.engine)
    assert labels.shape == volume.geometry.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 7}
    assert (labels[8:12, 21:27, 21:27] == 7).all()  # inside the bone: the later part wins
    assert (labels[:, 10:16, 10:16] == 1).all()  # soft tissue only
    assert (labels[2:-2, 1:6, 1:-1] == 0).all()  # air (the outermost voxels see the conv's zero padding)
    # In the opposite order the tissue part paints over the bone.
    swapped = load_bundle(_bundle_dir(tmp_path, _part("bone", -500.0, "[[1, 7]]") + _part("tissue", 0.0, "[[1, 1]]")))
    relabelled = segment_volume(volume, swapped, EngineLoader(EngineBackend.CPU, BackendSettings(tmp_path))
                                .get(swapped).engine)
    assert 7 not in relabelled


@pytest.mark.parametrize(("parts", "problem"), [
    ("", "parts"),
    (_part("a", 0.0, "[[1, 3]]"), "label values"),
    (_part("a", 0.0, "[[1, 1], [1, 7]]"), "each once"),
    (_part("a", 0.0, "[[0, 1]]"), "class 1-255"),
    (_part("a", 0.0, "[1, 1]"), "pairs"),
    (_part("a", 0.0, "[[1, 1]]") + _part("a", 0.0, "[[1, 7]]"), "unique in the bundle"),
    (_part("a b", 0.0, "[[1, 1]]"), "letters, digits"),
])
def test_bad_parts_are_named(tmp_path: Path, parts: str, problem: str) -> None:
    with pytest.raises(BundleError, match=problem):
        load_bundle(_bundle_dir(tmp_path, parts))


def test_a_part_whose_model_changed_is_refused(tmp_path: Path) -> None:
    d = _bundle_dir(tmp_path, _part("tissue", 0.0, "[[1, 1]]"))
    bundle = load_bundle(d)
    (d / "net.onnx").write_bytes(b"not the model")
    with pytest.raises(BundleError, match="two-parts.tissue: net.onnx has sha256"):
        verify_model(bundle)
