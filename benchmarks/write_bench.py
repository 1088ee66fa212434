"""Writing benchmark: SEG + RTSTRUCT for a 512×512×N CT with 4 structures (issue 5: total ≤ 2 s), or with
a hundred (issue 12: ``--structures 117``, cleaning + total ≤ 3 s).

Run: .venv/bin/python benchmarks/write_bench.py [--slices 300] [--repeats 5] [--seg-type BINARY]
     .venv/bin/python benchmarks/write_bench.py --series ../shared/data/ct/philips-head-5mm/S2010
     .venv/bin/python benchmarks/write_bench.py --structures 117 [--select 5]

``--structures N``: N organ-sized labels (tests/harness/many_structures.py: one ellipsoid each, coded with
TotalSegmentator's names and SNOMED CT codes when that package is installed) on the synthetic 300-slice CT.
``--select K`` also times writing a second selection of K of them (a destination's own ``structures``).

With ``--series`` the CT is a real series (every DICOM file with pixel data in the folder) and its
labels are the body-lungs bundle's (BODY, lungs); otherwise the synthetic phantom thresholded into
BODY, lungs and spine (noisy: the phantom carries 10 HU of noise).

Prints the labels' cleaning time (node/write/clean.py, which the pipeline runs before both writers),
then one table, best and median of the repeats, of writing the cleaned labels:
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
``--noise`` adds the noise issue 16 saw on a real chest CT's BODY to the labels first (specks of 1–19 px
outside the skin, pockets of 1–46 px where the back meets the table; tests/harness/contour_geometry.py).
Then a before/after table (issue 16): the labels as segmented, traced without cleaning or smoothing,
against the cleaned labels with each structure's smoothing: per ROI the contours, holes and tiny parts
(the writer's check, node/write/contour_check.py, by the bundle's rules), the file sizes and the median
write_results time.
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
from pydicom import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.assemble.volume import build_volume, read_series
from node.infer.manifest import discover_bundles
from node.infer.segment import segment_volume
from node.jobs.pipeline import derive_missing_filing_uids
from node.model.bundle import Bundle, Code, ContourOptions, ContourRule, ContourSmoothing, Label
from node.model.enums import SegType
from node.model.volume import Volume
from node.write.clean import clean_labels
from node.write.contour_check import RoiCheck, check_contours
from node.write.contours import Contours, Outlines
from node.write.files import save_dataset, write_results
from node.write.provenance import Provenance
from node.write.result import Result
from node.write.rtstruct import build_rtstruct, trace_contours
from node.write.seg import build_seg
from node.write.selection import narrowed
from node.write.uids import ResultUids
from tests.harness.contour_geometry import add_body_noise
from tests.harness.many_structures import many_structure_bundle, many_structure_labels
from tests.harness.synthetic_ct import write_ct_series

SCT = "SCT"
TARGET_S = 2.0
#: Issue 12: a hundred structures, cleaning and writing together.
MANY_TARGET_S = 3.0


def four_structure_bundle() -> Bundle:
    base = discover_bundles(Path(__file__).resolve().parents[1] / "engines", ("body-threshold",))[0]
    anatomy = Code(SCT, "123037004", "Anatomical Structure")
    labels = (
        dataclasses.replace(base.labels[0], includes=(2, 3, 4)),  # BODY includes the others, as body-lungs' does
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


def _real_series(folder: Path) -> tuple[Volume, Bundle, np.ndarray]:
    """A real CT folder: its volume, the body-lungs bundle and that bundle's labels."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DIRFILE" and not p.name.endswith(".gz"))
    volume = build_volume(read_series(paths))
    derive_missing_filing_uids(volume)  # the shared abdomen has its UIDs only in the file meta
    bundle = discover_bundles(Path(__file__).resolve().parents[1] / "engines", ("body-lungs",))[0]
    return volume, bundle, segment_volume(volume, bundle, None)


def as_traced(bundle: Bundle) -> Bundle:
    """``bundle`` with no cleaning and no smoothing: its contours as traced (the writers before issue 16)."""
    rule = ContourRule(min_island_mm2=0.0, min_hole_mm2=0.0, keep_holes=True, smoothing=ContourSmoothing.NONE)
    return dataclasses.replace(bundle, contours=ContourOptions(tuple((label.value, rule) for label in bundle.labels)))


def before_after(volume: Volume, raw: np.ndarray, cleaned: np.ndarray, bundle: Bundle, repeats: int,
                 seg_type: SegType) -> None:
    """Print contours, holes and tiny parts per ROI, file sizes and write time, as traced and cleaned."""
    provenance = Provenance(created=dt.datetime(2026, 1, 1))
    print(f"\n{'labels':30} {'ROI':8} {'contours':>8} {'holes':>6} {'tiny':>5} {'points':>8} "
          f"{'RTSTRUCT MiB':>12} {'SEG MiB':>8} {'write s':>8} {'CPU s':>6}")
    for name, labels, used in (("as segmented, traced as is", raw, as_traced(bundle)),
                               ("cleaned, smoothed (default)", cleaned, bundle)):
        result = Result.of(volume, labels, used, ResultUids.for_job("bench"), provenance)
        checks: list[RoiCheck] = check_contours(result.found, trace_contours(result), bundle, volume.geometry)
        points = [len(c.points_lps) for c in trace_contours(result)]
        times, cpu, sizes = [], [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                objects = write_results(result, Path(tmp) / str(n), seg_type=seg_type)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                sizes = {o.kind: o.path.stat().st_size / 2**20 for o in objects}
        for i, check in enumerate(checks):
            tail = (f" {sizes['RTSTRUCT']:12.2f} {sizes['SEG']:8.2f} {statistics.median(times):8.3f} "
                    f"{statistics.median(cpu):6.3f}" if i == 0 else "")
            print(f"{name if i == 0 else '':30} {check.name:8} {check.contours:8} {check.holes:6} {check.tiny:5} "
                  f"{points[i]:8}{tail}")


def many_structures(volume: Volume, labels: np.ndarray, bundle: Bundle, args: argparse.Namespace,
                    cleaning_s: float) -> int:
    """Issue 12's figures: per repeat the cleaning (fresh labels each time), SEG and RTSTRUCT write times,
    sizes and frames; the total (cleaning + write_results) against MANY_TARGET_S."""
    provenance = Provenance(created=dt.datetime(2026, 1, 1))
    result = Result.of(volume, labels, bundle, ResultUids.for_job("bench"), provenance)
    names = ("clean", "SEG build+save", "RTSTRUCT trace", "RTSTRUCT build+save", "write_results", "clean + write")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    raw = labels.copy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_results(result, out / "warm-up", seg_type=args.seg_type)
        for n in range(args.repeats):
            fresh = raw.copy()
            outlines: dict[int, Outlines] = {}  # as the pipeline does: the RTSTRUCT reuses the cleaning's tracing
            _timed("clean", partial(clean_labels, fresh, bundle, volume.geometry, outlines), wall, cpu)
            run = Result.of(volume, fresh, bundle, ResultUids.for_job(f"bench{n}"), provenance, outlines=outlines)
            seg = _timed("SEG build+save", partial(_build_and_save_seg, run, out / "seg.dcm", args.seg_type), wall, cpu)
            traced = _timed("RTSTRUCT trace", partial(trace_contours, run), wall, cpu)
            _timed("RTSTRUCT build+save", partial(_save_rtstruct, run, traced, out / "rt.dcm"), wall, cpu)
            del traced
            gc.collect()
            again = Result.of(volume, fresh, bundle, ResultUids.for_job(f"bench{n}"), provenance, outlines=outlines)
            objects = _timed("write_results", partial(write_results, again, out / f"pipeline{n}",
                                                      seg_type=SegType(args.seg_type)), wall, cpu)
            wall["clean + write"].append(wall["clean"][-1] + wall["write_results"][-1])
            cpu["clean + write"].append(cpu["clean"][-1] + cpu["write_results"][-1])
            sizes = {o.kind: o.path.stat().st_size for o in objects}
            for o in objects:
                o.path.unlink()
    print(f"volume {volume.voxels.shape}, {len(result.found)} of {len(bundle.labels)} structures present, "
          f"SEG {args.seg_type} with {int(seg.NumberOfFrames)} non-empty frames (of "
          f"{len(volume.headers) * (len(result.found) if args.seg_type == 'BINARY' else 1)}); {args.repeats} repeats")
    print(f"{'phase':20} {'best s':>7} {'median s':>9} {'CPU s':>6}   runs (wall s)")
    for name in names:
        runs = wall[name]
        print(f"{name:20} {min(runs):7.3f} {statistics.median(runs):9.3f} {statistics.median(cpu[name]):6.3f}   "
              f"{', '.join(f'{r:.2f}' for r in runs)}")
    verdict = "met" if statistics.median(wall["clean + write"]) <= MANY_TARGET_S else "NOT met"
    print(f"target: clean + write ≤ {MANY_TARGET_S:.0f} s ({verdict} by the median)")
    print(f"sizes: {', '.join(f'{kind} {size / 2**20:.1f} MiB' for kind, size in sizes.items())}")
    if args.select:
        chosen = tuple(label.name for label in result.found[: args.select])
        with tempfile.TemporaryDirectory() as tmp:
            times = []
            for n in range(args.repeats):
                t0 = time.perf_counter()
                selected = narrowed(result, chosen, ResultUids.for_job(f"selection{n}"))
                assert selected is not None
                objects = write_results(selected, Path(tmp) / str(n), seg_type=SegType(args.seg_type))
                times.append(time.perf_counter() - t0)
            print(f"a selection of {len(chosen)} structures (a destination's own): median "
                  f"{statistics.median(times):.3f} s, "
                  + ", ".join(f"{o.kind} {o.path.stat().st_size / 2**20:.1f} MiB" for o in objects))
    return 0


def _build_and_save_seg(result: Result, path: Path, seg_type: str) -> Dataset:
    seg = build_seg(result, seg_type=SegType(seg_type))
    save_dataset(seg, path)
    return seg


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seg-type", choices=("BINARY", "LABELMAP"), default="BINARY")
    parser.add_argument("--series", type=Path, help="a folder holding one real CT series (default: synthetic)")
    parser.add_argument("--structures", type=int, default=0,
                        help="write this many synthetic organ labels (e.g. 117) instead of the 4 structures")
    parser.add_argument("--select", type=int, default=0,
                        help="with --structures: also write a selection of this many of them (a destination's own)")
    parser.add_argument("--noise", action="store_true",
                        help="add issue 16's BODY noise to the labels: specks outside the skin, pockets at the back")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(f"$ {' '.join(sys.argv)}")
    if args.series:
        volume, bundle, raw = _real_series(args.series)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            series = write_ct_series(Path(tmp) / "ct", slices=args.slices)
            volume = build_volume(read_series(series.files))
        if args.structures:
            bundle = many_structure_bundle(args.structures)
            raw = many_structure_labels(volume.voxels.shape, args.structures)
        else:
            bundle = four_structure_bundle()
            raw = labels_for(volume)
    if args.noise:
        specks, pockets = add_body_noise(raw, np.random.default_rng(16))
        print(f"noise added: {int(specks.sum())} speck px, {int(pockets.sum())} pocket px")
    labels = raw.copy()
    t0 = time.perf_counter()
    clean_labels(labels, bundle, volume.geometry)
    cleaning_s = time.perf_counter() - t0
    print(f"cleaning the labels (clean_labels): {cleaning_s:.3f} s")
    if args.structures:
        return many_structures(volume, labels, bundle, args, cleaning_s)
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
    before_after(volume, raw, labels, bundle, args.repeats, SegType(args.seg_type))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
