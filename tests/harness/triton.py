"""A real Triton Inference Server on loopback, for the Triton backend's tests.

The server is the ``tritonserver`` binary that NVIDIA ships in the ``nvidia-pytriton`` wheel, with its
Python backend. Each bundle's ONNX model runs in a Python-backend model (``model.py`` below) through
ONNX Runtime on the CPU, so the server computes exactly what the node's CPU backend computes.

Why not PyTriton's ``bind``: nvidia-pytriton 0.7.0 pins numpy<2 (the node needs numpy 2), and its Python
backend stub is built against numpy 1.x, so under numpy 2 every output tensor reaches the server empty
("output tensor shape does not match size of output"). The wheel is therefore installed beside the node's
environment (``pip install --no-deps --target``), and the Python backend's models run in an execution
environment with numpy 1.26 (``EXECUTION_ENV_PATH``), importing ONNX Runtime from the node's environment.
Both land once in ``~/.cache/dicom-seg-node/triton`` (``DSN_TRITON_CACHE`` moves it).

The binary has only the Python backend (no onnxruntime or TensorRT backend), so a repository written by
``engines export-triton`` cannot be loaded by it; its ``config.pbtxt`` files are checked with Triton's own
protobuf model-config parser instead (tests/unit/test_triton_repo.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from node.infer.triton_repo import InstanceKind, model_config, onnx_io
from tests.harness.dcmtk import free_port
from tests.harness.processes import stop_process_group

PYTRITON = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy==1.26.4"
CACHE = Path(os.environ.get("DSN_TRITON_CACHE", Path.home() / ".cache" / "dicom-seg-node" / "triton"))
PY = f"{sys.version_info.major}.{sys.version_info.minor}"

MODEL_PY = '''\
"""A bundle's ONNX model in Triton's Python backend, through ONNX Runtime on the CPU (tests/harness/triton.py)."""
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        sys.path.append(params["SITE_PACKAGES"])  # onnxruntime from the node's environment, numpy 1.x from this one
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("THREADS", "1"))
        self.session = ort.InferenceSession(params["ONNX_PATH"], options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            outs = self.session.run(self.outputs, feed)
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def _pip(*args: str, timeout: float = 400) -> str | None:
    """Run pip from the node's environment; None when it worked, else why not."""
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                       check=True, capture_output=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return f"pip install {' '.join(args)} failed: {exc} {err.decode(errors='replace')[-400:]}"
    return None


def pytriton_dir() -> tuple[Path | None, str]:
    """The installed ``pytriton`` package (with ``tritonserver/bin/tritonserver``), or None and why not."""
    target = CACHE / "pytriton-0.7.0"
    package = target / "pytriton"
    if not (package / "tritonserver" / "bin" / "tritonserver").is_file():
        shutil.rmtree(target, ignore_errors=True)
        why = _pip("--no-deps", "--target", str(target), PYTRITON)
        if why:
            return None, why
    if sys.platform != "linux":
        return None, f"the tritonserver binary runs on Linux only, not {sys.platform}"
    return package, ""


def stub_env() -> tuple[Path | None, str]:
    """An execution environment for the Python backend's models: a venv whose numpy is 1.x."""
    env = CACHE / f"stub-env-py{PY}"
    if not (env / ".ready").is_file():
        shutil.rmtree(env, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, capture_output=True,
                           timeout=120)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            return None, f"cannot make the Python backend's environment: {exc}"
        why = _pip("--no-deps", "--target", str(env / "lib" / f"python{PY}" / "site-packages"), STUB_NUMPY)
        if why:
            return None, why
        (env / ".ready").write_text("")
    return env, ""


def unavailable_reason() -> str | None:
    """Why a real Triton server cannot run here (None: it can)."""
    package, why = pytriton_dir()
    if package is None:
        return why
    if not (package / "tritonserver" / "python_backend_stubs" / PY / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton has no Python backend stub for Python {PY}"
    env, why = stub_env()
    return why if env is None else None


def write_python_model(repo: Path, name: str, onnx_file: Path, env: Path, *, max_batch: int = 4,
                       preferred: int = 2, threads: int = 1) -> None:
    """``repo/name``: the ONNX model behind Triton's Python backend, with the graph's inputs and outputs."""
    inputs, outputs = onnx_io(onnx_file)
    text = model_config(name, inputs=inputs, outputs=outputs, max_batch=max_batch, preferred=preferred,
                        kind=InstanceKind.CPU, backend="python")
    site = sysconfig.get_paths()["purelib"]
    params = {"EXECUTION_ENV_PATH": str(env), "ONNX_PATH": str(onnx_file.resolve()), "SITE_PACKAGES": site,
              "THREADS": str(threads)}
    text += "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params.items())
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text)
    (repo / name / "1" / "model.py").write_text(MODEL_PY)


class TritonServer:
    """Context manager: ``tritonserver`` on 127.0.0.1 serving ``repo`` (``stop``/``start`` to kill and restart)."""

    def __init__(self, repo: Path, workdir: Path, *, startup_timeout: float = 90.0) -> None:
        package, why = pytriton_dir()
        if package is None:
            raise RuntimeError(why)
        self.server_dir = package / "tritonserver"
        self.repo = repo
        self.workdir = workdir
        self.startup_timeout = startup_timeout
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "tritonserver.log"
        self.backends = workdir / "backends"
        if not self.backends.exists():  # the Python backend and the stub for this interpreter, side by side
            shutil.copytree(self.server_dir / "backends" / "python", self.backends / "python")
            shutil.copy2(self.server_dir / "python_backend_stubs" / PY / "triton_python_backend_stub",
                         self.backends / "python" / "triton_python_backend_stub")

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.X.so: the one of this interpreter, not a system one of another patch level.
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(self.server_dir.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def start(self) -> TritonServer:
        cmd = [str(self.server_dir / "bin" / "tritonserver"), f"--model-repository={self.repo}",
               f"--backend-directory={self.backends}", f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--allow-metrics=false",
               "--exit-timeout-secs=5", "--backend-config=python,shm-default-byte-size=16777216"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver was not ready in {self.startup_timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=10)
            self.proc = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
