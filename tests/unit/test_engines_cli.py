"""`engines doctor | build | bench` as an operator runs them, on a machine without a GPU or TensorRT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.infer.backends.openvino import status as openvino_status

REPO = Path(__file__).resolve().parents[2]
H100 = REPO / "tests" / "data" / "gpu_profiles" / "h100-sxm-80gb.json"
GTX1650 = REPO / "tests" / "data" / "gpu_profiles" / "gtx1650-4gb.json"


def engines(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "engines", *args, "--state-dir", str(state)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(_has_tensorrt(),
                                reason="TensorRT is installed: these tests describe a machine without it")


def test_doctor_says_what_is_missing_and_how_to_install_it(tmp_path: Path) -> None:
    proc = engines("doctor", state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "onnxruntime-cpu" in out and "TensorRT is not installed" in out
    assert "pip install '.[gpu]'" in out  # not swallowed as markup
    runner = "OpenVINO" if openvino_status().available else "ONNX Runtime"
    assert f"this node will run: {runner} on the CPU, because" in out
    assert "CPU: " in out and "AVX-512 BF16" in out  # the CPU's units (issue 20)


def test_doctor_plans_for_a_recorded_gpu(tmp_path: Path) -> None:
    proc = engines("doctor", "--profile", str(H100), "--bundle", "liver", "--bundle", "body-threshold", state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in out and "3.35 TB/s" in out
    liver = next(line for line in out.splitlines() if line.startswith("│ liver@"))
    body = next(line for line in out.splitlines() if line.startswith("│ body-threshold@"))
    assert "FP16" in liver and "162x162x189" in liver and "929.5" in liver and "1/1" in liver
    assert "FP16" in body and "2/32" in body
    assert "recorded profile, not this machine's" in out


def test_doctor_says_when_a_model_does_not_fit_the_gpu(tmp_path: Path) -> None:
    proc = engines("doctor", "--profile", str(GTX1650), "--bundle", "liver", state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())
    assert "CPU fallback" in text
    assert "bundle liver needs" in text and "MiB per sample at FP32" in text and "GeForce GTX 1650" in text


def test_build_without_a_gpu_exits_with_the_reason(tmp_path: Path) -> None:
    proc = engines("build", state=tmp_path)
    assert proc.returncode == 2
    assert "cannot build TensorRT plans here: TensorRT is not installed" in proc.stderr


def test_bench_measures_onnxruntime_and_says_why_tensorrt_is_not_measured(tmp_path: Path) -> None:
    proc = engines("bench", "--bundle", "body-threshold", "--repeats", "1", state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "onnxruntime-cpu" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[0] == "body-threshold@0.1.0" and cells[2] == "2"
    assert float(cells[4].replace(",", "")) > 0  # ms per tile, measured
    assert "TensorRT: not measured" in proc.stdout and "TensorRT is not installed" in proc.stdout
    assert "CPU peak FP32: " in proc.stdout  # how the CPU rows' fraction of peak is had
