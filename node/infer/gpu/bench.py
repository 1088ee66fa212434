"""`engines bench`: each engine's time per tile and per volume, tiles/s, and the achieved fraction of
the GPU's bandwidth and compute roofline for that model, with ONNX Runtime and OpenVINO on the CPU
beside it (FP32, and BF16 where the CPU has a BF16 unit) and their fraction of the CPU's peak for that
precision (node/infer/cpu/features.py says how the peak is computed).

The TensorRT rows time the network alone on device buffers (CUDA events around ``enqueue``) and the
network with its PCIe copies (``run``); ONNX Runtime's rows time ``run`` on the same inputs. Per volume
is per tile × the tiles one reference CT needs (``node.infer.gpu.doctor.REFERENCE_SHAPE``). The
OpenVINO rows compile the model afresh for each precision (the model cache and the BF16 agreement
check are the backend's business, not the bench's).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import NodeError
from node.infer.engine import Engine
from node.infer.gpu.doctor import tiles_per_reference_volume
from node.infer.model_cost import model_cost
from node.model.bundle import Bundle
from node.model.enums import WindowMode


@dataclass(frozen=True)
class BenchRow:
    bundle: str
    engine: str
    batch: int
    per_batch_ms: float
    per_tile_ms: float
    tiles_per_s: float
    per_volume_s: float
    achieved_tflops: float
    compute_fraction: str   # of the roofline's compute peak (on the CPU: of the CPU's peak at that precision)
    bandwidth_fraction: str
    note: str = ""


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up (first-run allocations, lazy initialisation)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _inputs(bundle: Bundle, batch: int) -> np.ndarray:
    spatial = bundle.window.network_input
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 0.5, size=(batch, 1, *spatial)).astype(np.float32)


def bench_cpu_engine(bundle: Bundle, engine: Engine, label: str, repeats: int, peak_flops: float = 0.0) -> BenchRow:
    """A CPU engine's row; ``peak_flops``: the CPU's peak at the engine's precision (0: unknown)."""
    batch = 1 if bundle.window.mode is WindowMode.SINGLE_BLOCK else bundle.window.batch
    tiles = _inputs(bundle, batch)
    seconds = _time(lambda: engine.run(tiles), repeats)
    assert bundle.model_file is not None
    cost = model_cost(bundle.model_file, (1, *tiles.shape[1:]))
    per_tile = seconds / batch
    rate = cost.flops / per_tile
    return BenchRow(bundle.id, label, batch, seconds * 1e3, per_tile * 1e3, 1 / per_tile,
                    per_tile * tiles_per_reference_volume(bundle), rate / 1e12,
                    f"{rate / peak_flops:.0%}" if peak_flops else "-", "-")


def bench_onnxruntime(bundle: Bundle, engine: Engine, repeats: int, peak_flops: float = 0.0) -> BenchRow:
    return bench_cpu_engine(bundle, engine, "onnxruntime-cpu fp32", repeats, peak_flops)


def bench_openvino(bundle: Bundle, threads: int, repeats: int, peaks: dict[str, float]) -> tuple[list[BenchRow], str]:
    """OpenVINO rows (FP32, and BF16 where this CPU and OpenVINO have it); a note when BF16 is not measured."""
    from node.infer.backends.openvino import (
        compile_model,
        engine_for,
        input_shape,
        offers_bf16,
        openvino_core,
    )
    from node.infer.cpu.features import read_cpu
    from node.infer.cpu.precision import CpuPrecision

    core = openvino_core()
    cpu = read_cpu()
    precisions = [CpuPrecision.FP32]
    note = ""
    if cpu.bf16_unit and offers_bf16(core):
        precisions.append(CpuPrecision.BF16)
    else:
        note = f"OpenVINO BF16: not measured: {cpu.model} has no AMX-BF16 or AVX-512 BF16 unit OpenVINO uses"
    rows = []
    for precision in precisions:
        compiled = compile_model(core, bundle, input_shape(bundle), precision, threads)
        engine = engine_for(bundle, compiled, precision)
        rows.append(bench_cpu_engine(bundle, engine, f"openvino-cpu {precision.value}", repeats,
                                     peaks[precision.value]))
        engine.close()
        del engine, compiled
    return rows, note


def bench_tensorrt(bundle: Bundle, state_dir: Path, repeats: int, gpu_index: int = 0) -> list[BenchRow]:
    """Two rows: the network on device buffers, and with host copies (double-buffered ``run``)."""
    from node.infer.gpu.backend import GpuSession
    from node.infer.gpu.plan import roofline

    session = GpuSession(gpu_index)  # first: says what is missing when TensorRT, pycuda or a GPU is

    import pycuda.driver as cuda
    engine, plan, _ = session.engine(bundle, state_dir)
    batch = plan.sizing.opt_batch if bundle.window.mode is not WindowMode.SINGLE_BLOCK else 1
    tiles = _inputs(bundle, batch)
    est = roofline(plan.gpu, plan.cost, plan.precision.precision)
    device_in = cuda.mem_alloc(tiles.nbytes)
    device_out = cuda.mem_alloc(batch * engine.channels * int(np.prod(engine.output_shape)) * 4)
    cuda.memcpy_htod(device_in, tiles)
    stream = cuda.Stream()
    start, end = cuda.Event(), cuda.Event()

    def device_only() -> None:
        start.record(stream)
        engine.enqueue(int(device_in), int(device_out), batch, stream)
        end.record(stream)
        end.synchronize()

    device_only()
    samples = []
    for _ in range(repeats):
        device_only()
        samples.append(end.time_since(start) / 1e3)
    on_device = statistics.median(samples)
    with_copies = _time(lambda: engine.run(tiles), repeats)
    rows = []
    for label, seconds in (("network on device", on_device), ("with PCIe copies", with_copies)):
        per_tile = seconds / batch
        flops_rate = est.flops / per_tile
        bytes_rate = est.bytes_moved / per_tile
        rows.append(BenchRow(
            bundle.id, f"tensorrt {plan.precision.precision.value}", batch, seconds * 1e3, per_tile * 1e3, 1 / per_tile,
            per_tile * tiles_per_reference_volume(bundle), flops_rate / 1e12,
            f"{est.compute_s / per_tile:.0%}", f"{bytes_rate / est.peak_bandwidth:.0%}", label))
    device_in.free()
    device_out.free()
    return rows


def bench(bundles: list[Bundle], *, state_dir: Path, repeats: int, gpu_index: int,
          threads: int) -> tuple[list[BenchRow], list[str]]:
    """Rows for every network bundle; notes say why a backend has no rows, and how the CPU's peaks are had."""
    from node.infer.backends.onnxrt import OnnxRuntimeEngine
    from node.infer.cpu.features import peak, read_cpu

    rows: list[BenchRow] = []
    notes: list[str] = []
    gpu_problem: str | None = None
    openvino_problem: str | None = None
    cpu_peaks = {p: peak(read_cpu(), p, threads) for p in ("fp32", "bf16")}
    peaks = {p: q.flops for p, q in cpu_peaks.items()}
    for bundle in bundles:
        if bundle.model_file is None:
            notes.append(f"{bundle.id}: built-in algorithm, no network to benchmark")
            continue
        if gpu_problem is None:
            try:
                rows.extend(bench_tensorrt(bundle, state_dir, repeats, gpu_index))
            except (NodeError, ImportError) as exc:
                gpu_problem = str(exc)
                notes.append(f"TensorRT: not measured: {exc}")
        ort = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name,
                                threads=threads)
        rows.append(bench_onnxruntime(bundle, ort, repeats, peaks["fp32"]))
        del ort
        if openvino_problem is None:
            try:
                found, note = bench_openvino(bundle, threads, repeats, peaks)
                rows.extend(found)
                if note and note not in notes:
                    notes.append(note)
            except NodeError as exc:
                openvino_problem = str(exc)
                notes.append(f"OpenVINO: not measured: {exc}")
    notes += [f"CPU peak {p.upper()}: {q.how}" for p, q in cpu_peaks.items()]
    return rows, notes
