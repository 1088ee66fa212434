"""`engines doctor`'s CPU part: the CPU and its units, its peak per precision, and per bundle the CPU
backend and precision it gets and what the OpenVINO model cache holds for it (compiled or not, and a
BF16 model's agreement verdict — the reason a bundle runs FP32 when its check failed).

Nothing is compiled or run: it reads ``/proc/cpuinfo``, OpenVINO's device properties and the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.errors import NodeError
from node.infer.backends.onnxrt import status as onnxruntime_status
from node.infer.backends.openvino import openvino_core, plan_cpu_model
from node.infer.backends.openvino import status as openvino_status
from node.infer.cpu.features import CpuInfo, Peak, peak, read_cpu
from node.infer.cpu.model_cache import ModelCache
from node.infer.cpu.precision import CpuPrecision
from node.infer.engine import BackendStatus
from node.model.bundle import Bundle
from node.model.enums import EngineBackend


@dataclass(frozen=True)
class CpuBundleRow:
    bundle: str
    backend: str  # "OpenVINO", "ONNX Runtime", or "-" (built-in, or no CPU engine under this choice)
    precision: str
    why: str
    model: str  # the OpenVINO model cache's state for it ("-" for ONNX Runtime)


@dataclass(frozen=True)
class CpuReport:
    cpu: CpuInfo
    peaks: dict[str, Peak]  # "fp32", "bf16"
    openvino: BackendStatus
    openvino_version: str  # "" when OpenVINO is not installed
    openvino_bf16: bool  # OpenVINO offers BF16 on this CPU
    backend: str  # the CPU backend this configuration runs when the GPU is not used ("" when none)
    rows: list[CpuBundleRow]


def cpu_backend(choice: EngineBackend, openvino: BackendStatus) -> str:
    """The CPU backend that runs the networks under ``choice`` when no GPU does ("" under "tensorrt")."""
    if choice is EngineBackend.CPU:
        return "ONNX Runtime"
    if choice is EngineBackend.OPENVINO:
        return "OpenVINO" if openvino.available else ""
    if choice is EngineBackend.AUTO:
        return "OpenVINO" if openvino.available else "ONNX Runtime"
    return ""


def _openvino_row(bundle: Bundle, cpu: CpuInfo, version: str, bf16: bool, cache: ModelCache | None) -> CpuBundleRow:
    plan = plan_cpu_model(bundle, cpu, openvino_bf16=bf16)
    precision, why = plan.choice.precision, plan.choice.reason
    state = "-"
    if cache is not None:
        key = plan.key(precision, cpu, version)
        found = cache.lookup(key)
        if precision is CpuPrecision.BF16 and found is not None and found.check is not None:
            if found.check.passed:
                why += f"; check passed when compiled: {found.check.summary}"
            else:
                precision = CpuPrecision.FP32
                why = f"FP32: BF16 disagreed with ONNX Runtime FP32 when compiled ({found.check.summary})"
                key = plan.key(precision, cpu, version)
                found = cache.lookup(key)
        state = (f"compiled ({key.digest}, {found.compile_seconds:.1f} s)" if found is not None
                 else f"not compiled ({key.digest}): at the first start")
    return CpuBundleRow(bundle.id, "OpenVINO", precision.value.upper(), why, state)


def cpu_report(bundles: list[Bundle], *, backend: EngineBackend, state_dir: Path | None,
               threads: int = 0) -> CpuReport:
    cpu = read_cpu()
    ov = openvino_status()
    version, bf16 = "", False
    if ov.available:
        import openvino

        version = openvino.get_version()
        from node.infer.backends.openvino import offers_bf16

        bf16 = offers_bf16(openvino_core())
    runner = cpu_backend(backend, ov)
    cache = ModelCache(state_dir) if state_dir is not None else None
    rows = []
    for bundle in bundles:
        if bundle.model_file is None:
            rows.append(CpuBundleRow(bundle.id, "-", "-", "built-in algorithm: runs on the CPU", "-"))
        elif runner == "OpenVINO":
            try:
                rows.append(_openvino_row(bundle, cpu, version, bf16, cache))
            except NodeError as exc:
                rows.append(CpuBundleRow(bundle.id, "OpenVINO", "-", str(exc), "-"))
        elif runner == "ONNX Runtime":
            ort = onnxruntime_status()
            why = "FP32 (ONNX Runtime's CPU provider)" + ("" if ort.available else f": {ort.detail}")
            if backend is EngineBackend.AUTO and not ov.available:
                why += f"; {ov.detail} for BF16 on AMX / AVX-512 BF16"
            rows.append(CpuBundleRow(bundle.id, "ONNX Runtime", "FP32", why, "-"))
        else:
            why = (f"engines.backend is {str(backend)!r}: " +
                   (ov.detail if backend is EngineBackend.OPENVINO else "the GPU or nothing"))
            rows.append(CpuBundleRow(bundle.id, "-", "-", why, "-"))
    peaks = {p: peak(cpu, p, threads) for p in ("fp32", "bf16")}
    return CpuReport(cpu, peaks, ov, version, bf16, runner, rows)
