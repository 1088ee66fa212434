"""``engines.backend = "triton"`` against a REAL Triton Inference Server (issue 17).

The server is the ``tritonserver`` binary from the nvidia-pytriton wheel on loopback ports, serving the
body-threshold bundle's ONNX model through ONNX Runtime in a Python-backend model (tests/harness/triton.py
says why not PyTriton's ``bind``, and why the export-triton repository itself cannot be loaded by this binary).
Checked: the Triton engine's output equals the in-process CPU backend's (gRPC and HTTP, batches cut to the
server's max_batch_size); a model that does not fit the bundle is named with the field; a server that is
down or killed is a retryable failure and the engine works again once it is back; and the whole node:
storescu → node (backend triton, Triton down at its start) → job retried → Triton up → SEG/RTSTRUCT at
storescp with the labels of the CPU backend, delivered once; Triton killed mid-job and restarted → the job
completes once (on its second attempt); two nodes sharing one Triton both complete their series.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.assemble.volume import build_volume, read_series
from node.config_triton import SharedMemory, TritonConfig
from node.errors import InferenceError, Retryable
from node.infer.backends.base import BackendSettings
from node.infer.backends.loader import EngineLoader
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.backends.triton import TritonEngine, TritonUnavailable
from node.infer.manifest import load_bundle
from node.infer.segment import segment_volume
from node.model.bundle import Bundle
from node.model.enums import EngineBackend
from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.result_checks import (
    RTSTRUCT_CLASS,
    SEG_CLASS,
    assert_dciodvfy_clean,
    check_rtstruct,
    check_seg,
    read_sources,
)
from tests.harness.synthetic_ct import write_ct_series
from tests.harness.triton import TritonServer, stub_env, unavailable_reason, write_python_model

pytestmark = pytest.mark.integration

ENGINES = Path(__file__).resolve().parents[2] / "engines"
MODEL = "body-threshold"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(ENGINES / MODEL)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, bundle: Bundle) -> Path:
    if reason := unavailable_reason():
        pytest.skip(f"a real Triton server cannot run here: {reason}")
    env, _ = stub_env()
    assert env is not None and bundle.model_file is not None
    path = tmp_path_factory.mktemp("triton-repo")
    write_python_model(path, MODEL, bundle.model_file, env, max_batch=4, preferred=2)
    return path


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(repo, tmp_path_factory.mktemp("triton-server")) as s:
        yield s


def _reference(bundle: Bundle) -> OnnxRuntimeEngine:
    assert bundle.model_file is not None
    return OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                             threads=1)


@pytest.mark.parametrize(("scheme", "memory"), [("grpc", SharedMemory.NONE), ("http", SharedMemory.NONE),
                                                ("grpc", SharedMemory.SYSTEM), ("http", SharedMemory.SYSTEM)])
def test_triton_computes_what_the_cpu_backend_computes(server: TritonServer, bundle: Bundle, scheme: str,
                                                       memory: SharedMemory) -> None:
    url = server.grpc_url if scheme == "grpc" else server.http_url
    engine = TritonEngine(bundle, TritonConfig(url=url, in_flight=2, shared_memory=memory))
    try:
        facts = engine.check()
        assert (facts.max_batch_size, facts.platform, facts.preferred_batch) == (4, "python", 2)
        assert engine.max_batch == 4  # what the sliding window hands it: the preferred 2 for each of 2 in flight
        tiles = np.random.default_rng(7).uniform(-1.0, 1.5, (5, 1, 32, 128, 128)).astype(np.float32)
        assert engine.chunks(len(tiles), facts.max_batch_size) == [(0, 3), (3, 5)]  # two requests in flight
        got, want = engine.run(tiles), _reference(bundle).run(tiles)
        assert got.shape == want.shape == (5, 2, 32, 128, 128)
        np.testing.assert_allclose(got, want, atol=1e-6)
        shared = str(engine.client().get_system_shared_memory_status())
        # an input and an output region per sending thread, registered with the server; none when off
        regions = set(re.findall(r"dsn-[0-9a-f]+-\d+-\d+-(?:in|out)", shared))
        assert len(regions) == (4 if memory is SharedMemory.SYSTEM else 0), shared
    finally:
        engine.close()
    if memory is SharedMemory.SYSTEM:  # closing the engine unregisters them
        assert "dsn-" not in str(TritonEngine(bundle, TritonConfig(url=url)).client().get_system_shared_memory_status())


def test_a_volume_through_triton_gets_the_labels_of_the_cpu_backend(server: TritonServer, bundle: Bundle,
                                                                    tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=24, rows=160, columns=160, pixel_spacing=(2.5, 2.5),
                             slice_thickness=5.0, origin=(-200.0, -200.0, -60.0))
    volume = build_volume(read_series(series.files))
    loaded = EngineLoader(EngineBackend.TRITON, BackendSettings(tmp_path, triton=TritonConfig(
        url=server.grpc_url))).get(bundle)
    assert loaded.engine is not None and "python, batch ≤ 4, 2 requests in flight" in loaded.description
    ours = segment_volume(volume, bundle, loaded.engine)
    theirs = segment_volume(volume, bundle, _reference(bundle))
    assert np.count_nonzero(theirs) > 0
    np.testing.assert_array_equal(ours, theirs)


def test_a_model_that_does_not_fit_the_bundle_stops_with_the_model_and_field(server: TritonServer, bundle: Bundle,
                                                                             tmp_path: Path) -> None:
    wrong = dataclasses.replace(bundle, output_name="logits")
    settings = BackendSettings(tmp_path, triton=TritonConfig(url=server.grpc_url))
    with pytest.raises(InferenceError, match="Triton model 'body-threshold' has no output named 'logits' "
                                             r"\(its outputs: \['probabilities'\]\)") as err:
        EngineLoader(EngineBackend.TRITON, settings).get(wrong)
    assert not isinstance(err.value, Retryable)  # the operator's mistake: trying again cannot fix it
    missing = TritonEngine(bundle, TritonConfig(url=server.grpc_url, models=((MODEL, "liver-trt"),)))
    with pytest.raises(TritonUnavailable, match="has no model 'liver-trt' ready"):
        missing.check()
    missing.close()


def test_triton_killed_and_restarted_fails_retryably_then_serves_again(repo: Path, bundle: Bundle,
                                                                       tmp_path: Path) -> None:
    tiles = np.random.default_rng(3).uniform(-1.0, 1.5, (2, 1, 32, 128, 128)).astype(np.float32)
    with TritonServer(repo, tmp_path / "server") as server:
        engine = TritonEngine(bundle, TritonConfig(url=server.grpc_url, connect_timeout_s=2.0))
        first = engine.run(tiles)
        server.stop()
        with pytest.raises(TritonUnavailable, match=f"Triton at {server.grpc_url} ") as err:
            engine.run(tiles)
        assert isinstance(err.value, Retryable)
        server.start()
        np.testing.assert_array_equal(engine.run(tiles), first)
        engine.close()


def _done(status: dict[str, Any]) -> bool:
    return bool(status["jobs"]) and all(j["state"] in ("done", "failed") for j in status["jobs"])


def _deferred(status: dict[str, Any]) -> bool:
    return any(j["state"] == "queued" and "Triton" in (j["error"] or "") for j in status["jobs"])


def test_storescu_to_a_triton_node_delivers_the_cpu_labels_once_triton_is_up(repo: Path, bundle: Bundle,
                                                                             tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp", "dciodvfy"):
        pytest.skip(reason)
    series = write_ct_series(tmp_path / "ct", slices=24, rows=160, columns=160, pixel_spacing=(2.5, 2.5),
                             slice_thickness=5.0, origin=(-200.0, -200.0, -60.0))
    sources = read_sources(series.files)
    triton = TritonServer(repo, tmp_path / "server")  # ports chosen; not started: Triton is down
    toml = (f'[engines]\nbundles = ["{MODEL}"]\nbackend = "triton"\n'
            f'[triton]\nurl = "{triton.grpc_url}"\nconnect_timeout_s = 2.0\n')
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], extra_toml=toml)
        try:
            with node:  # it starts and receives with Triton down, and says why it is not ready
                ready = next(line for line in node.log_text().splitlines() if " ready: " in line)
                assert "not ready now" in ready, ready
                storescu("127.0.0.1", node.port, node.ae_title, series.directory)
                node.wait_status(_deferred, timeout=120)  # the job is back in the queue with the reason
                triton.start()
                status = node.wait_status(_done, timeout=180)
                files = pacs.wait_for_files(2, timeout=120)
        finally:
            triton.stop()
    (job,) = status["jobs"]
    assert job["state"] == "done" and job["attempts"] >= 2, job
    results = {str(dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
    assert set(results) == {SEG_CLASS, RTSTRUCT_CLASS} and len(files) == 2  # delivered once
    check_seg(results[SEG_CLASS], sources, {"BODY"})
    check_rtstruct(results[RTSTRUCT_CLASS], sources, {"BODY"})
    for path in results.values():
        assert_dciodvfy_clean(path)
    seg = hd.seg.segread(results[SEG_CLASS])
    uids = [str(u) for u in series.sop_instance_uids]
    delivered = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=False)[..., 0] > 0
    labels = segment_volume(build_volume(read_series(series.files)), bundle, _reference(bundle))
    assert int(delivered.sum()) == int(np.count_nonzero(labels == 1)) > 0


def test_two_nodes_sharing_one_triton_both_complete_their_series(server: TritonServer, tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    toml = f'[engines]\nbundles = ["{MODEL}"]\nbackend = "triton"\n[triton]\nurl = "{server.grpc_url}"\n'
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        nodes = [NodeProcess(tmp_path / f"node{i}", ae_title=f"SEGNODE{i}", extra_toml=toml,
                             destinations=[f"PACS@127.0.0.1:{pacs.port}"]) for i in (1, 2)]
        with nodes[0], nodes[1]:
            for i, node in enumerate(nodes):
                ready = next(line for line in node.log_text().splitlines() if " ready: " in line)
                assert "Triton at grpc://127.0.0.1:" in ready and "batch ≤ 4" in ready, ready
                series = write_ct_series(tmp_path / f"ct{i}", slices=16, rows=128, columns=128,
                                         pixel_spacing=(3.0, 3.0), slice_thickness=5.0)
                storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            states = [[j["state"] for j in n.wait_status(_done, timeout=180)["jobs"]] for n in nodes]
            pacs.wait_for_files(4, timeout=120)
    assert states == [["done"], ["done"]]


def _running(status: dict[str, Any]) -> bool:
    return any(j["state"] == "running" for j in status["jobs"])


def test_triton_killed_mid_job_and_restarted_the_job_completes_once(repo: Path, bundle: Bundle,
                                                                    tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    # 300 slices: the job runs for seconds (read, assemble, resampling) before its first request to Triton.
    series = write_ct_series(tmp_path / "ct", slices=300, rows=256, columns=256, pixel_spacing=(1.6, 1.6))
    with TritonServer(repo, tmp_path / "server") as triton, StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        toml = (f'[engines]\nbundles = ["{MODEL}"]\nbackend = "triton"\n'
                f'[triton]\nurl = "{triton.grpc_url}"\nconnect_timeout_s = 2.0\n')
        node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], extra_toml=toml,
                           quiet_period_s=1.0, release_settle_s=0.5)
        with node:
            storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            node.wait_status(_running, timeout=120, interval=0.1)
            triton.stop()  # killed while the job runs: its requests fail, the job goes back to the queue
            node.wait_status(_deferred, timeout=120)
            triton.start()
            status = node.wait_status(_done, timeout=180)
            files = pacs.wait_for_files(2, timeout=120)
            time.sleep(1.0)
            assert len(pacs.files()) == 2  # once: no second copy came later
    (job,) = status["jobs"]
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert {str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files} == {SEG_CLASS, RTSTRUCT_CLASS}
