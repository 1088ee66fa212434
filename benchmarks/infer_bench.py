"""Infer-stage benchmark: volume in → labels out for every default bundle, on a 512×512×300 CT.

Run: .venv/bin/python benchmarks/infer_bench.py [--repeats 2] [--threads 0] [--bundle NAME ...]

The volume: with ``../shared/data`` present, TotalSegmentator's example CT (3 mm, 122×101×30, real
anatomy) mirrored-tiled four times along z (360 mm) and resampled to 512×512×300 (0.71 × 0.59 mm,
1.2 mm slices) — real tissue contrast at a clinical size, though the anatomy repeats; otherwise the
analytic phantom of ``tests/harness/synthetic_ct.py`` on the same grid. Each repeat runs in a fresh
process, as a worker would: the bundles one after another (engines created first, as a warm worker
has them), so the peak RSS is that of a worker holding the volume and every engine.
Targets (issue 3): ≤ 20 s and ≤ 2.5 GB for the infer stage on 2 CPU cores.
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


def child(volume_path: Path, bundle_names: list[str], threads: int) -> None:
    """One worker's run: print a JSON line of per-bundle seconds, the outcome and the peak RSS."""
    from node.config import NodeConfig
    from node.errors import Declined
    from node.infer.backends.loader import make_engine
    from node.infer.manifest import discover_bundles
    from node.infer.segment import segment_volume

    cfg = NodeConfig(engine_threads=threads)
    bundles = discover_bundles(REPO / "engines", tuple(bundle_names))
    engines = {b.id: make_engine(b, cfg) for b in bundles}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: every core)")
    parser.add_argument("--bundle", action="append", default=[], help="only this bundle (default: the defaults)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.bundle, args.threads)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        volume_path = Path(tmp) / "volume.npz"
        source = make_volume(volume_path)
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", str(volume_path), "--threads", str(args.threads)]
            for name in args.bundle:
                cmd += ["--bundle", name]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"\nInfer stage, {SHAPE[2]}×{SHAPE[1]}×{SHAPE[0]} CT ({source}), {os.cpu_count()} CPU cores, "
          f"{args.repeats} fresh worker processes")
    print(f"{'bundle':<24} {'best s':>8} {'median s':>9}  outcome")
    names = [row["bundle"] for row in runs[0]["rows"]]
    for n, name in enumerate(names):
        times = sorted(run["rows"][n]["seconds"] for run in runs)
        print(f"{name:<24} {times[0]:>8.2f} {float(np.median(times)):>9.2f}  {runs[0]['rows'][n]['outcome']}")
    totals = sorted(sum(row["seconds"] for row in run["rows"]) for run in runs)
    peak = max(run["peak_rss_mib"] for run in runs)
    print(f"{'total (target ≤ 20 s)':<24} {totals[0]:>8.2f} {float(np.median(totals)):>9.2f}")
    print(f"{'peak RSS (target ≤ 2,560 MiB)':<24} {peak:>8.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
