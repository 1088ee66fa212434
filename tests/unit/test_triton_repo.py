"""``engines export-triton``, ``[triton]`` parsing and the ``cuda`` backend's availability (no server needed).

The exported ``config.pbtxt`` files are parsed with Triton's own protobuf model configuration
(tritonclient.grpc.model_config_pb2): the tritonserver binary the tests can run has no onnxruntime or
TensorRT backend, so this parser is what checks the repository (tests/harness/triton.py says why).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from node.cli import main
from node.config import load_config
from node.config_triton import SharedMemory, TritonConfig, TritonProtocol
from node.errors import ConfigError, InferenceError, Retryable
from node.infer.backends import registry
from node.infer.backends.base import BackendSettings
from node.infer.backends.cuda import CudaBackend
from node.infer.backends.loader import EngineLoader
from node.infer.backends.triton import ModelFacts, TritonEngine, TritonUnavailable, _max_batch, check_tensor
from node.infer.gpu.plan_cache import slug
from node.infer.manifest import load_bundle
from node.infer.triton_repo import InstanceKind, export_repository, preferred_batch
from node.model.enums import EngineBackend

ENGINES = Path(__file__).resolve().parents[2] / "engines"


def _pb() -> Any:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _parse(path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _pb().ModelConfig())


def test_export_writes_a_repository_triton_parses(tmp_path: Path) -> None:
    bundles = [load_bundle(ENGINES / n) for n in ("body-threshold", "liver", "body-lungs")]
    done = export_repository(bundles, tmp_path / "repo", state_dir=tmp_path / "state")
    assert [(m.model, m.kind) for m in done] == [("body-threshold", "onnxruntime"), ("liver", "onnxruntime")]
    cfg = _parse(tmp_path / "repo" / "body-threshold" / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("body-threshold", "onnxruntime", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("image", _pb().TYPE_FP32, [1, -1, -1, -1])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("probabilities", [2, -1, -1, -1])]
    # a GPU instance: the node's GPU batch for the 32x128x128 patch (32: 2^24 voxels of tiles) within --max-batch
    # (8), not the CPU's [window] batch (2)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    liver = _parse(tmp_path / "repo" / "liver" / "config.pbtxt")
    assert liver.max_batch_size == 1  # a single block of ~2 GB activations is not batched further
    model = (tmp_path / "repo" / "liver" / "1" / "model.onnx").read_bytes()
    assert hashlib.sha256(model).hexdigest() == bundles[1].model_sha256
    assert not (tmp_path / "repo" / "body-lungs").exists()  # a built-in algorithm has no network to serve
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "docker run" in readme and "--model-repository" in readme and 'backend = "triton"' in readme


def test_cached_tensorrt_plans_become_a_plan_model_per_compute_capability(tmp_path: Path) -> None:
    bundle = load_bundle(ENGINES / "body-threshold")
    cache = tmp_path / "state" / "engines" / slug(bundle.id)
    cache.mkdir(parents=True)
    for digest, sha, cc in (("a1", bundle.model_sha256, "8.0"), ("b2", bundle.model_sha256, "9.0"),
                            ("c3", "0" * 64, "8.6")):  # the last: a plan of an older model file, not exported
        (cache / f"{digest}.plan").write_bytes(b"plan " + cc.encode())
        key = {"bundle": bundle.id, "onnx_sha256": sha, "compute_capability": cc,
               "profiles": [{"name": "image", "min": [1, 1, 32, 128, 128], "opt": [2, 1, 32, 128, 128],
                             "max": [6, 1, 32, 128, 128]}]}
        (cache / f"{digest}.json").write_text(json.dumps({"key": key}))
    done = export_repository([bundle], tmp_path / "repo", state_dir=tmp_path / "state", max_batch=4)
    assert [(m.model, m.kind, m.max_batch_size) for m in done] == [
        ("body-threshold", "onnxruntime", 4), ("body-threshold-trt", "tensorrt_plan", 6)]
    trt = _parse(tmp_path / "repo" / "body-threshold-trt" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 6
    assert dict(trt.cc_model_filenames) == {"8.0": "model_cc8.0.plan", "9.0": "model_cc9.0.plan"}
    assert (tmp_path / "repo" / "body-threshold-trt" / "1" / "model_cc9.0.plan").read_bytes() == b"plan 9.0"
    assert not (tmp_path / "repo" / "body-threshold-trt" / "1" / "model_cc8.6.plan").exists()


def test_the_cli_exports_the_named_bundles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["engines", "export-triton", str(tmp_path / "repo"), "--bundle", "body-threshold",
                 "--instance-kind", "cpu", "--state-dir", str(tmp_path / "state")]) == 0
    assert "body-threshold: onnxruntime, max_batch_size 8" in capsys.readouterr().out
    cfg = _parse(tmp_path / "repo" / "body-threshold" / "config.pbtxt")
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU


def _config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


def test_the_triton_table_is_read_with_its_defaults(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = _config(tmp_path, '[engines]\nbackend = "triton"\n[triton]\nurl = "grpcs://triton.example.org"\n'
                            'root_certificates = "ca.pem"\nin_flight = 3\n[triton.models]\nliver = "liver-trt"\n')
    t = cfg.triton
    assert cfg.engine_backend is EngineBackend.TRITON
    assert (t.protocol, t.tls, t.address, t.in_flight) == (TritonProtocol.GRPC, True, "triton.example.org:8001", 3)
    assert t.root_certificates == tmp_path / "ca.pem"
    assert (t.model_name("liver"), t.model_name("body-threshold")) == ("liver-trt", "body-threshold")
    d = TritonConfig()
    assert (d.url, d.in_flight, d.shared_memory, d.address) == ("grpc://localhost:8001", 2, SharedMemory.NONE,
                                                                "localhost:8001")
    assert TritonConfig(url="http://h").address == "h:8000" and TritonConfig(url="http://h").protocol.value == "http"


@pytest.mark.parametrize(("text", "says"), [
    ('url = "triton:8001"', "key 'triton.url' is 'triton:8001'; expected grpc://host:port"),
    ('url = "grpc://h:8001"\nroot_certificates = "missing.pem"', "missing.pem', which is not a file"),
    ('url = "grpc://h:8001"\nprivate_key = "k.pem"', "a client certificate and its key come together"),
    ('url = "grpc://triton.example.org:8001"\nshared_memory = "system"', "is not on this host"),
    ('in_flight = 0', "in_flight"),
])
def test_a_bad_triton_table_is_refused_with_a_sentence(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, f"[triton]\n{text}\n")
    assert says in str(err.value)


def test_a_model_that_does_not_fit_the_bundle_is_named_with_the_field() -> None:
    ok = [{"name": "image", "datatype": "FP32", "shape": [-1, 1, -1, -1, -1]}]
    check_tensor("m", "input", ok, "image")
    with pytest.raises(InferenceError, match="Triton model 'm' has no input named 'img'"):
        check_tensor("m", "input", ok, "img")
    with pytest.raises(InferenceError, match="Triton model 'm': input 'image' has datatype FP16"):
        check_tensor("m", "input", [{**ok[0], "datatype": "FP16"}], "image")
    with pytest.raises(InferenceError, match=r"shape \[-1, 1, -1, -1\] \(4 dimensions\); the node needs 5"):
        check_tensor("m", "input", [{**ok[0], "shape": [-1, 1, -1, -1]}], "image")
    with pytest.raises(InferenceError, match="input 'image' has 3 channels; the node sends 1"):
        check_tensor("m", "input", [{**ok[0], "shape": [-1, 3, -1, -1, -1]}], "image")


def test_requests_are_cut_to_the_servers_batch_and_kept_in_flight() -> None:
    engine = TritonEngine(load_bundle(ENGINES / "body-threshold"), TritonConfig(in_flight=2))
    assert engine.chunks(2, 8) == [(0, 1), (1, 2)]  # two tiles: two requests in flight, not one
    assert engine.chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]  # never above max_batch_size
    assert engine.chunks(8, 8) == [(0, 4), (4, 8)]
    assert engine.chunks(3, 0) == [(0, 3)]  # a model that does not batch takes the batch as it is
    engine.close()


def _imported_like(batch: int = 1) -> Any:
    """body-threshold with an imported nnU-Net bundle's window: [window] batch 1, patch 160x128x112."""
    import dataclasses

    bundle = load_bundle(ENGINES / "body-threshold")
    return dataclasses.replace(bundle, window=dataclasses.replace(bundle.window, batch=batch, patch=(160, 128, 112)))


def test_the_preferred_batch_is_the_gpu_batch_on_a_gpu_instance_and_the_bundles_on_a_cpu_instance(
        tmp_path: Path) -> None:
    imported = _imported_like()
    assert preferred_batch(imported, InstanceKind.GPU) == 4  # 4 tiles of 160x128x112, as node/infer/gpu/plan.py
    assert preferred_batch(imported, InstanceKind.CPU) == 1
    assert preferred_batch(load_bundle(ENGINES / "liver"), InstanceKind.GPU) == 1  # a single block
    done = export_repository([load_bundle(ENGINES / "body-threshold")], tmp_path / "repo", state_dir=tmp_path / "st",
                             kind=InstanceKind.CPU)
    cfg = _parse(tmp_path / "repo" / "body-threshold" / "config.pbtxt")
    assert (done[0].max_batch_size, list(cfg.dynamic_batching.preferred_batch_size)) == (8, [2])
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    # what the engine reads back, from either client's form of the configuration
    assert _max_batch({"config": {"max_batch_size": 8, "backend": "onnxruntime",
                                  "dynamic_batching": {"preferred_batch_size": [2]}}}) == (8, "onnxruntime", 2)
    assert _max_batch({"max_batch_size": 0, "platform": "tensorrt_plan"}) == (0, "tensorrt_plan", 0)
    assert _max_batch(cfg) == (8, "onnxruntime", 2)


def test_the_window_hands_triton_a_requests_worth_of_tiles_for_each_request_in_flight() -> None:
    """An imported bundle ([window] batch 1) on a GPU server configured for 4: 4 tiles a request, 2 in flight;
    on a CPU server (no preferred batch) its own 1 a request; never more than 1 GiB of probabilities a call."""
    engine = TritonEngine(_imported_like(), TritonConfig(in_flight=2))
    engine._facts = ModelFacts(max_batch_size=8, platform="onnxruntime", out_channels=25, preferred_batch=4)
    assert engine.max_batch == 4  # 8 tiles of 25 x 160x128x112 floats would be 1.8 GB: cut to 1 GiB's 4 tiles
    engine._facts = ModelFacts(max_batch_size=8, platform="onnxruntime", out_channels=2, preferred_batch=4)
    assert engine.max_batch == 8 and engine.chunks(8, 8) == [(0, 4), (4, 8)]
    engine._facts = ModelFacts(max_batch_size=8, platform="onnxruntime", out_channels=2)
    assert engine.max_batch == 2 and engine.chunks(2, 8) == [(0, 1), (1, 2)]  # two requests overlap, not one
    engine._facts = ModelFacts(max_batch_size=2, platform="onnxruntime", out_channels=2, preferred_batch=4)
    assert engine.max_batch == 4  # within the server's max_batch_size a request
    engine.close()


def test_triton_is_named_only_never_chosen_by_auto() -> None:
    assert EngineBackend.TRITON not in [b.name for b in registry.candidates(EngineBackend.AUTO)]
    assert registry.backend(EngineBackend.TRITON).name is EngineBackend.TRITON
    assert registry.is_strict(EngineBackend.TRITON)
    found = {s.name: s for s in registry.statuses()}
    assert found["triton"].available and found["triton"].detail.startswith("tritonclient ")


def test_a_node_whose_triton_is_down_loads_its_engine_and_fails_jobs_as_retryable(tmp_path: Path) -> None:
    from tests.harness.dcmtk import free_port

    url = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    bundle = load_bundle(ENGINES / "body-threshold")
    loaded = EngineLoader(EngineBackend.TRITON, BackendSettings(tmp_path, triton=TritonConfig(
        url=url, connect_timeout_s=1.0))).get(bundle)
    assert "not ready now" in loaded.description and url in loaded.description
    assert loaded.engine is not None
    import numpy as np

    with pytest.raises(TritonUnavailable, match=f"Triton at {url} failed to answer") as err:
        loaded.engine.run(np.zeros((1, 1, 32, 128, 128), np.float32))
    assert isinstance(err.value, Retryable)


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_onnxruntime_has_cuda(), reason="onnxruntime-gpu with CUDA is installed here; tests/gpu covers it")
def test_the_cuda_backend_says_why_it_cannot_run_here(tmp_path: Path) -> None:
    status = CudaBackend().status()
    assert not status.available
    assert status.detail == "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    assert registry.candidates(EngineBackend.AUTO)[1].name is EngineBackend.CUDA  # after TensorRT, before the CPU
    with pytest.raises(InferenceError, match=r"engines.backend is 'cuda' but onnxruntime has no CUDAExecution"):
        EngineLoader(EngineBackend.CUDA, BackendSettings(tmp_path)).get(load_bundle(ENGINES / "body-threshold"))
