"""`engines doctor`: the GPU and the CPU, what is installed, and what it implies for each bundle.

Works without a GPU: it then says what is missing and how to install it, and with ``--profile`` it
shows what a recorded GPU (tests/data/gpu_profiles/*.json) would do with each bundle — precision,
tile batch, expected time from the model's FLOPs and bytes at that GPU's rates. The CPU part
(node/infer/cpu/doctor.py) names the CPU's units and, per bundle, the CPU backend and precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.errors import InferenceError, NodeError
from node.infer.backends.onnxrt import status as onnxruntime_status
from node.infer.backends.openvino import status as openvino_status
from node.infer.cpu.doctor import CpuReport, cpu_report
from node.infer.engine import BackendStatus
from node.infer.gpu.backend import (
    EnginePlan,
    nvml_status,
    plan_cache_for,
    plan_engine,
    pycuda_status,
    tensorrt_status,
)
from node.infer.gpu.plan import roofline
from node.infer.gpu.profile import GpuProfile, read_profile
from node.infer.transforms import model_grid_shape
from node.infer.window import tile_grid
from node.model.bundle import Bundle
from node.model.enums import EngineBackend, WindowMode

#: The volume "per volume" figures refer to: a 300-slice abdominal CT, 512 x 512, 1.0 x 0.8 x 0.8 mm.
REFERENCE_SHAPE = (300, 512, 512)
REFERENCE_SPACING = (1.0, 0.8, 0.8)

GiB = 1 << 30


def tiles_per_reference_volume(bundle: Bundle) -> int:
    """How many network inputs one reference CT needs: 1 block, or the sliding window's tile count."""
    if bundle.window.mode is WindowMode.SINGLE_BLOCK:
        return 1
    spacing = bundle.preprocess.spacing_mm or REFERENCE_SPACING
    grid = model_grid_shape(REFERENCE_SHAPE, REFERENCE_SPACING, spacing)
    return len(tile_grid(grid, bundle.window.patch, bundle.window.overlap))


def describe_gpu(gpu: GpuProfile) -> str:
    return (f"{gpu.name} (compute capability {gpu.cc_text}): {gpu.sm_count} SMs at {gpu.sm_clock_khz / 1e3:,.0f} MHz; "
            f"{gpu.free_memory_bytes / GiB:,.1f} GiB free of {gpu.total_memory_bytes / GiB:,.1f} GiB; "
            f"{gpu.memory_bus_width_bits}-bit bus at {gpu.memory_clock_khz / 1e3:,.0f} MHz = "
            f"{gpu.peak_bandwidth_bytes_s / 1e12:,.2f} TB/s; L2 {gpu.l2_cache_bytes / 2**20:,.0f} MiB; peak "
            f"{gpu.peak_flops('fp16') / 1e12:,.0f} TFLOP/s FP16{' (tensor cores)' if gpu.has_tensor_cores else ''}, "
            f"{gpu.peak_fp32_flops / 1e12:,.1f} TFLOP/s FP32; driver {gpu.driver_version or 'unknown'} "
            f"[{gpu.source}]")


@dataclass(frozen=True)
class BundleRow:
    bundle: str
    precision: str
    why_precision: str
    sample: str
    gflop: str
    mb_moved: str
    batch: str
    why_batch: str
    tiles: str
    per_tile_ms: str
    per_volume_s: str
    bound: str
    plan: str


def bundle_row(bundle: Bundle, gpu: GpuProfile, tensorrt_version: str, state_dir: Path | None) -> BundleRow:
    if bundle.model_file is None:
        return BundleRow(bundle.id, "-", "built-in algorithm: runs on the CPU", "-", "-", "-", "-", "", "-", "-", "-",
                         "-", "-")
    try:
        plan: EnginePlan = plan_engine(bundle, gpu, tensorrt_version)
    except NodeError as exc:
        return BundleRow(bundle.id, "-", str(exc), "-", "-", "-", "-", "", "-", "-", "-", "-", "CPU fallback")
    est = roofline(gpu, plan.cost, plan.precision.precision)
    tiles = tiles_per_reference_volume(bundle)
    cache = "-"
    if state_dir is not None:
        found = plan_cache_for(state_dir).lookup(plan.key)
        cache = f"cached ({plan.key.digest})" if found is not None else f"not built ({plan.key.digest})"
    return BundleRow(
        bundle=bundle.id,
        precision=plan.precision.precision.value.upper(),
        why_precision=plan.precision.reason,
        sample="x".join(str(d) for d in plan.cost.input_shape[2:]),
        gflop=f"{plan.cost.flops / 1e9:,.1f}",
        mb_moved=f"{plan.cost.bytes_moved(plan.precision.precision.element_size) / 1e6:,.0f}",
        batch=f"{plan.sizing.opt_batch}/{plan.sizing.max_batch}",
        why_batch=plan.sizing.reason,
        tiles=str(tiles),
        per_tile_ms=f"{est.seconds * 1e3:,.2f}",
        per_volume_s=f"{est.seconds * tiles:,.3f}",
        bound=est.bound,
        plan=cache,
    )


@dataclass(frozen=True)
class DoctorReport:
    backends: list[BackendStatus]
    gpu: GpuProfile | None
    gpu_problem: str           # why no GPU was read ("" when one was)
    profile_is_recorded: bool  # the GPU came from --profile, not from this machine
    rows: list[BundleRow]
    verdict: str
    cpu: CpuReport


def doctor(bundles: list[Bundle], *, backend: EngineBackend, state_dir: Path | None, profile_path: Path | None = None,
           gpu_index: int = 0, threads: int = 0) -> DoctorReport:
    from node.infer.backends.cuda import status as cuda_status
    from node.infer.backends.triton import status as triton_status

    backends = [onnxruntime_status(), openvino_status(), tensorrt_status(), pycuda_status(), nvml_status(),
                cuda_status(), triton_status()]
    status = {b.name: b for b in backends}
    gpu: GpuProfile | None = None
    problem = ""
    if profile_path is not None:
        gpu = GpuProfile.load(profile_path)
    elif status["pycuda"].available:
        try:
            gpu = read_profile(gpu_index)
        except InferenceError as exc:
            problem = str(exc)
    else:
        problem = status["pycuda"].detail
    trt_version = (status["tensorrt"].detail.removeprefix("TensorRT ") if status["tensorrt"].available
                   else "(not installed)")
    rows = ([bundle_row(b, gpu, trt_version, state_dir if profile_path is None else None) for b in bundles]
            if gpu else [])
    missing = [status[name].detail for name in ("tensorrt", "pycuda") if not status[name].available]
    cpu = cpu_report(bundles, backend=backend, state_dir=state_dir if profile_path is None else None, threads=threads)
    if backend is EngineBackend.CPU:
        verdict = "engines.backend is 'cpu': every model runs on ONNX Runtime on the CPU; the GPU is not used."
    elif backend is EngineBackend.OPENVINO:
        verdict = ("engines.backend is 'openvino': every model runs on OpenVINO on the CPU; the GPU is not used."
                   if status["openvino"].available else
                   f"engines.backend is 'openvino' and the service will not start: {status['openvino'].detail}.")
    elif backend is EngineBackend.TRITON:
        verdict = ("engines.backend is 'triton': the networks run on the Triton server of [triton] url; the node "
                   "starts even when it is down (jobs wait in the queue).")
    elif backend is EngineBackend.CUDA:
        cuda = status["onnxruntime-cuda"]
        verdict = ("engines.backend is 'cuda': every model runs on ONNX Runtime's CUDA provider (FP32)."
                   if cuda.available else f"engines.backend is 'cuda' and the service will not start: {cuda.detail}.")
    elif profile_path is None and gpu is not None and not missing:
        verdict = "TensorRT on the GPU: plans are built at the first start (or by `engines build`) and cached."
    else:
        reasons = "; ".join(missing or [problem]) or "no GPU"
        if profile_path is not None:
            reasons = f"the GPU above is a recorded profile, not this machine's; here: {reasons}"
        verdict = (f"{cpu.backend} on the CPU, because {reasons}." if backend is EngineBackend.AUTO
                   else f"engines.backend is 'tensorrt' and the service will not start: {reasons}.")
    return DoctorReport(backends, gpu, problem, profile_path is not None, rows, verdict, cpu)
