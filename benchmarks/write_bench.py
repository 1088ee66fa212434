"""Writing benchmark: SEG + RTSTRUCT for a 512×512×N CT with 4 structures (issue 5: total ≤ 2 s).

Run: .venv/bin/python benchmarks/write_bench.py [--slices 300] [--repeats 5] [--seg-type BINARY]

Prints one table, best and median of the repeats:
  SEG build        build_seg (highdicom template + frames, references and pixel data encoded here)
  SEG encode       pydicom writing it to bytes, then the durable write (tmp → fsync → rename)
  RTSTRUCT trace   contours of every structure (trace_contours; one thread per structure)
  RTSTRUCT encode  build_rtstruct from those contours (ContourData text, items) and its durable write
  total            write_results: both objects as the pipeline writes them, SEG on a second thread
The phase rows are timed one after another, each alone; the total overlaps SEG and RTSTRUCT, so it
is less than the sum. Before the timed runs, after a warm-up, one write_results pass samples the
process's resident memory every few milliseconds: RSS before writing (volume, labels, headers) and
the peak while writing.
"CPU s" is the median CPU time of all the process's threads: what the work costs when other load
on the machine makes the wall-clock times noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.assemble.volume import build_volume, read_series
from node.infer.manifest import discover_bundles
from node.model.bundle import Bundle, Code, Label
from node.model.volume import Volume
from node.write.contours import Contours
from node.write.files import save_dataset, write_results
from node.write.provenance import Provenance
from node.write.result import Result
from node.write.rtstruct import build_rtstruct, trace_contours
from node.write.seg import build_seg
from node.write.uids import ResultUids
from tests.harness.synthetic_ct import write_ct_series

SCT = "SCT"
TARGET_S = 2.0


def four_structure_bundle() -> Bundle:
    base = discover_bundles(Path(__file__).resolve().parents[1] / "engines", ("body-threshold",))[0]
    anatomy = Code(SCT, "123037004", "Anatomical Structure")
    labels = (
        base.labels[0],
        Label(2, "Lung_L", anatomy, Code(SCT, "44029006", "Left lung"), (0, 128, 255), "ORGAN"),
        Label(3, "Lung_R", anatomy, Code(SCT, "3341006", "Right lung"), (0, 200, 255), "ORGAN"),
        Label(4, "Spine", anatomy, Code(SCT, "421060004", "Spinal column"), (255, 255, 0), "ORGAN"),
    )
    return dataclasses.replace(base, labels=labels)


def labels_for(volume: Volume) -> np.ndarray:
    hu = volume.voxels
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu > -300] = 1
    lungs = (hu < -600) & (hu > -950)
    cols = np.arange(hu.shape[2])
    labels[lungs & (cols < hu.shape[2] // 2)] = 3  # image left = patient right
    labels[lungs & (cols >= hu.shape[2] // 2)] = 2
    labels[hu > 500] = 4
    return labels


T = TypeVar("T")


def _save_rtstruct(result: Result, traced: list[Contours], path: Path) -> None:
    save_dataset(build_rtstruct(result, traced), path)


def _timed(name: str, fn: Callable[[], T], wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> T:
    """Run ``fn``; add its wall-clock and CPU seconds (all threads of the process) to ``name``'s runs."""
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    wall[name].append(time.perf_counter() - w0)
    cpu[name].append(time.process_time() - c0)
    return value


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_while(fn: Callable[[], object]) -> tuple[int, int]:
    """(RSS before, peak RSS during) ``fn``, sampled every 2 ms from a second thread."""
    before = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return before, max(peak, _rss_bytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seg-type", choices=("BINARY", "LABELMAP"), default="BINARY")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(f"$ {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        series = write_ct_series(Path(tmp) / "ct", slices=args.slices)
        volume = build_volume(read_series(series.files))
    bundle = four_structure_bundle()
    labels = labels_for(volume)
    result = Result.of(volume, labels, bundle, ResultUids.for_job("bench"), Provenance(created=dt.datetime(2026, 1, 1)))
    names = ("SEG build", "SEG encode", "RTSTRUCT trace", "RTSTRUCT encode", "total")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_results(result, out / "warm-up", seg_type=args.seg_type)  # imports, first-call caches
        gc.collect()
        before, peak = _peak_rss_while(lambda: write_results(result, out / "memory", seg_type=args.seg_type))
        for _ in range(args.repeats):
            seg = _timed("SEG build", lambda: build_seg(result, seg_type=args.seg_type), wall, cpu)
            _timed("SEG encode", partial(save_dataset, seg, out / "seg.dcm"), wall, cpu)
            traced = _timed("RTSTRUCT trace", lambda: trace_contours(result), wall, cpu)
            _timed("RTSTRUCT encode", partial(_save_rtstruct, result, traced, out / "rt.dcm"), wall, cpu)
            del seg, traced
            gc.collect()
            objects = _timed("total", lambda: write_results(result, out / "pipeline", seg_type=args.seg_type),
                             wall, cpu)
            sizes = {o.kind: o.path.stat().st_size for o in objects}

    print(f"volume {volume.voxels.shape}, structures {[label.name for label in result.found]}, "
          f"SEG {args.seg_type} with every frame kept; {args.repeats} repeats")
    print(f"{'phase':16} {'best s':>7} {'median s':>9} {'CPU s':>6}   runs (wall s)")
    for name in names:
        if name == "total":
            print("-" * 16)
        runs = wall[name]
        print(f"{name:16} {min(runs):7.3f} {statistics.median(runs):9.3f} {statistics.median(cpu[name]):6.3f}   "
              f"{', '.join(f'{r:.2f}' for r in runs)}")
    verdict = "met" if statistics.median(wall["total"]) <= TARGET_S else "NOT met"
    print(f"target: total ≤ {TARGET_S:.0f} s ({verdict} by the median)")
    print(f"sizes: {', '.join(f'{kind} {size / 2**20:.1f} MiB' for kind, size in sizes.items())}")
    print(f"RSS: {before / 2**20:.0f} MiB before writing, peak {peak / 2**20:.0f} MiB while writing "
          f"(+{(peak - before) / 2**20:.0f} MiB); process high-water mark "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (includes building the test CT)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
