"""The pyliverlesionseg 0.3 liver U-Net: our HDF5 → ONNX converter against an independent float64 forward pass.

engines/liver/convert.py rebuilds the network with the onnx helper API from the Keras weights in the
wheel (no TensorFlow); engines/liver/reference.py recomputes it in float64 NumPy in the package's own
(x, y, z) channels-last layout with the Keras kernels as stored. Agreement to ~1e-6 checks the
architecture transcription, the kernel orientation/axis order, padding, cropping and the numerically
stable instance norm at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT.parent / "shared" / "models"
WHEEL = MODELS / "pyliverlesionseg-0.3-py3-none-any.whl"
WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
EXPECTED_PARAMETERS = 3_874_961

pytestmark = [
    pytest.mark.skipif(not WHEEL.is_file(), reason=f"liver model wheel not present at {WHEEL}"),
    pytest.mark.skipif(importlib.util.find_spec("h5py") is None,
                       reason="h5py is not installed (needed to read the Keras HDF5)"),
]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"liver_{name}", ROOT / "engines" / "liver" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convert():
    return _load("convert")


@pytest.fixture(scope="module")
def reference():
    return _load("reference")


@pytest.fixture(scope="module")
def weights(reference):
    return reference.load_weights(WHEEL)


@pytest.fixture(scope="module")
def onnx_path(convert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("liver") / "model.onnx"
    assert convert.main(["--wheel", str(WHEEL), "--out", str(out)]) == 0
    return out


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_onnx(session, block_xyz: np.ndarray) -> np.ndarray:
    """Run on a package-order (x, y, z) block; return the package-order probability map."""
    image = np.ascontiguousarray(block_xyz.transpose(2, 1, 0))[None, None].astype(np.float32)
    out = session.run(["probabilities"], {"image": image})[0]
    assert out.shape == (1, 1) + tuple(n - 26 for n in image.shape[2:])
    return out[0, 0].transpose(2, 1, 0)


def test_wheel_sha256(convert) -> None:
    digest = hashlib.sha256(WHEEL.read_bytes()).hexdigest()
    assert digest == WHEEL_SHA256 == convert.WHEEL_SHA256


def test_parameter_count(convert, reference, weights, onnx_path) -> None:
    import onnx

    assert sum(k.size + b.size for k, b in weights) == EXPECTED_PARAMETERS
    assert convert.parameter_count(onnx.load(str(onnx_path))) == EXPECTED_PARAMETERS


def test_conversion_is_deterministic_and_reproduces_shipped_model(convert, onnx_path, tmp_path: Path, capsys) -> None:
    again = tmp_path / "again.onnx"
    assert convert.main(["--wheel", str(WHEEL), "--out", str(again)]) == 0
    data = onnx_path.read_bytes()
    assert again.read_bytes() == data
    assert f"sha256={hashlib.sha256(data).hexdigest()}" in capsys.readouterr().out
    shipped = ROOT / "engines" / "liver" / "model.onnx"
    if shipped.is_file():
        assert shipped.read_bytes() == data, "engines/liver/model.onnx differs from a fresh conversion"


def test_wrong_wheel_is_refused(convert, tmp_path: Path) -> None:
    fake = tmp_path / "fake.whl"
    fake.write_bytes(b"not the wheel")
    assert convert.main(["--wheel", str(fake), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_io_signature(onnx_path) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "probabilities"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, "D", "H", "W"]
    assert out.type.tensor_type.shape.dim[1].dim_value == 1


@pytest.mark.parametrize("size", [(54, 54, 54), (81, 54, 54)])
def test_onnx_matches_float64_reference(reference, weights, onnx_path, size) -> None:
    rng = np.random.default_rng(sum(size))
    block = rng.uniform(-0.5, 0.5, size=size)  # the range of the package's normalised CT
    expected = reference.forward(block, weights)
    assert expected.shape == tuple(n - 26 for n in size)
    got = _run_onnx(_session(onnx_path), block)
    delta = float(np.abs(got - expected).max())
    print(f"size={size} max|onnx - float64 reference|={delta:.3g}")
    assert delta < 1e-4
    # The comparison is sensitive: the output is far from constant, and a wrong axis order would fail.
    assert expected.max() - expected.min() > 0.5
    if size[0] == size[2]:
        wrong = _session(onnx_path).run(["probabilities"], {"image": block[None, None].astype(np.float32)})[0][0, 0]
        assert np.abs(wrong - expected).max() > 1e-2


def test_literal_graph_matches(convert, reference, weights, tmp_path: Path) -> None:
    """--literal (Resize nearest + AveragePool, Concat + one Conv) gives the same probabilities."""
    out = tmp_path / "literal.onnx"
    assert convert.main(["--wheel", str(WHEEL), "--out", str(out), "--literal"]) == 0
    block = np.random.default_rng(7).uniform(-0.5, 0.5, size=(54, 54, 81))
    got = _run_onnx(_session(out), block)
    assert np.abs(got - reference.forward(block, weights)).max() < 1e-4


def test_reference_rejects_bad_sizes(reference, weights) -> None:
    with pytest.raises(ValueError):
        reference.forward(np.zeros((50, 54, 54)), weights)
