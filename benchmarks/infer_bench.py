"""Infer-stage benchmark: volume in → labels out for every default bundle, on a 512×512×300 CT.

Run: .venv/bin/python benchmarks/infer_bench.py [--repeats 2] [--threads 0] [--bundle NAME ...]
         [--backend onnxruntime --backend openvino-fp32 --backend openvino-bf16 ...]

The volume: with ``../shared/data`` present, TotalSegmentator's example CT (3 mm, 122×101×30, real
anatomy) mirrored-tiled four times along z (360 mm) and resampled to 512×512×300 (0.71 × 0.59 mm,
1.2 mm slices) — real tissue contrast at a clinical size, though the anatomy repeats; otherwise the
analytic phantom of ``tests/harness/synthetic_ct.py`` on the same grid. Each repeat runs in a fresh
process, as a worker would: the bundles one after another (engines created first, as a warm worker
has them), so the peak RSS is that of a worker holding the volume and every engine.
Targets (issue 3): ≤ 20 s and ≤ 2.5 GB for the infer stage on 2 CPU cores.

``--backend`` (repeatable) names engine variants (benchmarks/cpu_variants.py: ONNX Runtime FP32, OpenVINO
FP32 or BF16, ...), measured one after another with the same volume; the default is the node's own
choice ("auto"). Each variant has its own state directory, and a first untimed process loads its engines
there, so the timed processes find OpenVINO's compiled models (and a BF16 model's agreement verdict) in
the cache as a restarted worker does: the compile-and-check process's time and peak are reported apart.
Targets (issue 20): liver block ≤ 3 s, peak ≤ 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.model.volume import Geometry, Volume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SHAPE = (300, 512, 512)


def make_volume(path: Path) -> str:
    """Write the benchmark volume (voxels + geometry) to ``path`` (.npz); return what it is."""
    from node.infer.transforms import resample_linear

    example = SHARED / "nifti" / "totalseg" / "example_ct_sm.nii.gz"
    if example.is_file():
        from tests.harness.nifti import load_nifti_volume

        voxels, geometry = load_nifti_volume(example)
        tiled = np.concatenate([voxels, voxels[::-1], voxels, voxels[::-1]], axis=0).astype(np.float32)
        extent = np.array(tiled.shape) * np.array(geometry.spacing)
        big = resample_linear(tiled, SHAPE)
        spacing = tuple(float(e / n) for e, n in zip(extent, SHAPE, strict=True))
        row_dir, col_dir = geometry.row_dir, geometry.col_dir
        source = "TotalSegmentator example CT, mirrored ×4 along z, resampled"
    else:
        from tests.harness.synthetic_ct import phantom_hu

        spacing = (1.2, 0.7, 0.7)
        row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        k, i, j = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij", sparse=True)
        points = np.stack(np.broadcast_arrays((j - 256) * 0.7, (i - 256) * 0.7, (k - 150) * 1.2), axis=-1)
        big = phantom_hu(points).astype(np.float32)
        source = "analytic phantom (shared data not found)"
    normal = np.cross(row_dir, col_dir)
    # HU are integers: the node holds a CT volume as int16 (node.assemble.volume), so does the benchmark.
    np.savez(path, voxels=np.rint(big).astype(np.int16), spacing=np.array(spacing), row_dir=row_dir, col_dir=col_dir,
             normal=normal)
    return source


def load_volume(path: Path) -> Volume:
    data = np.load(path)
    spacing = tuple(float(s) for s in data["spacing"])
    normal = data["normal"]
    geometry = Geometry(origin=np.zeros(3), row_dir=data["row_dir"], col_dir=data["col_dir"], normal=normal,
                        slice_step=spacing[0] * normal, spacing=spacing, shape=SHAPE)  # type: ignore[arg-type]
    return Volume(np.ascontiguousarray(data["voxels"]), geometry, [])


def child(volume_path: Path, bundle_names: list[str], threads: int, backend: str, bundles_dir: Path,
          state_dir: Path, prepare: bool) -> None:
    """One worker's run: print a JSON line of per-bundle seconds, the outcome and the peak RSS (with
    ``prepare``: only load the engines, and print how long that took and what each engine is)."""
    from node.config import NodeConfig
    from node.errors import Declined
    from node.infer.backends.loader import EngineLoader
    from node.infer.manifest import discover_bundles
    from node.infer.segment import segment_volume
    from node.model.enums import EngineBackend

    cfg = NodeConfig(engine_threads=threads, engine_backend=EngineBackend(backend), bundles_dir=bundles_dir,
                     state_dir=state_dir)
    bundles = discover_bundles(bundles_dir, tuple(bundle_names))
    started = time.perf_counter()
    loader = EngineLoader.from_config(cfg)
    loaded = {b.id: loader.get(b) for b in bundles}
    engines = {bundle_id: x.engine for bundle_id, x in loaded.items()}
    if prepare:
        print(json.dumps({"seconds": time.perf_counter() - started,
                          "engines": {bundle_id: x.description for bundle_id, x in loaded.items()},
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    volume = load_volume(volume_path)
    rows = []
    for bundle in bundles:
        started = time.perf_counter()
        try:
            labels = segment_volume(volume, bundle, engines[bundle.id])
            counts = np.bincount(labels.ravel(), minlength=256)
            outcome = ", ".join(f"{label.name} {counts[label.value] * np.prod(volume.geometry.spacing) / 1e3:.0f} mL"
                                for label in bundle.labels)
        except Declined as exc:
            outcome = f"declined: {exc}"
        rows.append({"bundle": bundle.id, "seconds": time.perf_counter() - started, "outcome": outcome})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_mib}))


def _run_child(volume_path: Path, args: argparse.Namespace, variant: str, work: Path,
               prepare: bool = False) -> dict[str, Any]:
    from benchmarks.cpu_variants import VARIANTS, bundles_for

    bundles_dir = bundles_for(variant, REPO / "engines", work)
    cmd = [sys.executable, __file__, "--child", str(volume_path), "--threads", str(args.threads),
           "--child-backend", VARIANTS[variant][0], "--child-bundles", str(bundles_dir),
           "--child-state", str(work / f"state-{variant}")]
    for name in args.bundle:
        cmd += ["--bundle", name]
    if prepare:
        cmd.append("--child-prepare")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    from benchmarks.cpu_variants import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: every core)")
    parser.add_argument("--bundle", action="append", default=[], help="only this bundle (default: the defaults)")
    parser.add_argument("--backend", action="append", default=[], choices=list(VARIANTS),
                        help="engine variant (repeatable; default: auto, the node's own choice)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--child-bundles", type=Path, default=REPO / "engines", help=argparse.SUPPRESS)
    parser.add_argument("--child-state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.bundle, args.threads, args.child_backend, args.child_bundles, args.child_state,
              args.child_prepare)
        return 0

    variants = list(dict.fromkeys(args.backend or ["auto"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        volume_path = work / "volume.npz"
        source = make_volume(volume_path)
        results = {}
        for variant in variants:
            try:
                prepared = _run_child(volume_path, args, variant, work, prepare=True)
                runs = [_run_child(volume_path, args, variant, work) for _ in range(args.repeats)]
            except RuntimeError as exc:
                print(f"{variant}: {exc}", file=sys.stderr)
                return 1
            results[variant] = (prepared, runs)

    print(f"\nInfer stage, {SHAPE[2]}×{SHAPE[1]}×{SHAPE[0]} CT ({source}), {os.cpu_count()} CPU cores, "
          f"{args.repeats} fresh worker processes per variant (engines loaded from their caches)")
    print(f"{'variant':<14} {'bundle':<22} {'best s':>8} {'median s':>9}  outcome")
    for variant, (prepared, runs) in results.items():
        names = [row["bundle"] for row in runs[0]["rows"]]
        for n, name in enumerate(names):
            times = sorted(run["rows"][n]["seconds"] for run in runs)
            print(f"{variant:<14} {name:<22} {times[0]:>8.2f} {float(np.median(times)):>9.2f}  "
                  f"{runs[0]['rows'][n]['outcome']}")
        totals = sorted(sum(row["seconds"] for row in run["rows"]) for run in runs)
        peak = max(run["peak_rss_mib"] for run in runs)
        print(f"{variant:<14} {'total (goal ≤ 20 s)':<22} {totals[0]:>8.2f} {float(np.median(totals)):>9.2f}")
        print(f"{variant:<14} {'peak RSS (≤ 2,048 MiB)':<22} {peak:>8.0f} MiB")
        print(f"{variant:<14} {'first load (compile)':<22} {prepared['seconds']:>8.2f} {'':>9}  "
              f"peak {prepared['peak_rss_mib']:.0f} MiB")
        for bundle_id, description in prepared["engines"].items():
            print(f"{'':<14}   {bundle_id}: {description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
