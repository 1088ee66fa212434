"""How the service starts and refuses to start: messages a PACS administrator can act on."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.harness.dcmtk import free_port
from tests.harness.node_process import REPO, NodeProcess


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "serve", "--bind", "127.0.0.1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_port_in_use_exits_1_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = serve("--port", str(port), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_second_node_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "a") as first:
        proc = serve("--port", str(free_port()), "--state-dir", str(first.state_dir))
    assert proc.returncode == 2
    assert "is in use by another running node" in proc.stderr


def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[node]\nport = 'eleven'\n")
    proc = serve("-c", str(config), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "key 'node.port' is 'eleven'; expected int" in proc.stderr and str(config) in proc.stderr


def test_ready_only_after_the_engines_loaded_and_it_says_which(tmp_path: Path) -> None:
    """The ready line comes after the worker loaded each bundle's engine, and names the engine."""
    with NodeProcess(tmp_path / "n", bundles=("body-threshold", "body-lungs")) as node:
        log = node.log_text()
    ready = log.index("ready:")
    assert log.index("body-threshold@0.1.0: ") < ready
    line = log[ready:].splitlines()[0]
    assert "body-threshold@0.1.0 (" in line and "body-lungs@1.0.0 (built-in algorithm (CPU))" in line


def test_backend_tensorrt_without_a_gpu_stops_with_the_reason(tmp_path: Path) -> None:
    """engines.backend = "tensorrt" is the operator saying: the GPU or nothing. Without one the
    service does not report ready and exits 1 naming what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        import pytest

        pytest.skip("TensorRT is installed here: this test needs a machine without it")
    node = NodeProcess(tmp_path / "n", extra_toml='[engines]\nbundles = ["body-threshold"]\nbackend = "tensorrt"\n')
    try:
        node.start()
    except RuntimeError as exc:
        assert "exited with 1" in str(exc)
    else:
        node.stop()
        raise AssertionError("the node reported ready without a GPU under engines.backend = 'tensorrt'")
    log = node.log_text()
    assert "ready:" not in log
    assert "engines.backend is 'tensorrt'" in log and "TensorRT is not installed" in log
