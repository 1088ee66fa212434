"""`engines bench`: each engine's time per tile and per volume, tiles/s, and the achieved fraction of
the GPU's bandwidth and compute roofline for that model, with ONNX Runtime on the CPU beside it.

The TensorRT rows time the network alone on device buffers (CUDA events around ``enqueue``) and the
network with its PCIe copies (``run``); ONNX Runtime's rows time ``run`` on the same inputs. Per volume
is per tile × the tiles one reference CT needs (``node.infer.gpu.doctor.REFERENCE_SHAPE``).
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
    compute_fraction: str   # of the roofline's compute peak ("-" on the CPU: no peak known)
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


def bench_onnxruntime(bundle: Bundle, engine: Engine, repeats: int) -> BenchRow:
    batch = 1 if bundle.window.mode is WindowMode.SINGLE_BLOCK else bundle.window.batch
    tiles = _inputs(bundle, batch)
    seconds = _time(lambda: engine.run(tiles), repeats)
    assert bundle.model_file is not None
    cost = model_cost(bundle.model_file, (1, *tiles.shape[1:]))
    per_tile = seconds / batch
    return BenchRow(bundle.id, "onnxruntime-cpu fp32", batch, seconds * 1e3, per_tile * 1e3, 1 / per_tile,
                    per_tile * tiles_per_reference_volume(bundle), cost.flops / per_tile / 1e12, "-", "-")


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
    """Rows for every network bundle; notes say why a backend has no rows."""
    from node.infer.backends.onnxrt import OnnxRuntimeEngine

    rows: list[BenchRow] = []
    notes: list[str] = []
    gpu_problem: str | None = None
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
        rows.append(bench_onnxruntime(bundle, ort, repeats))
    return rows, notes
