"""BODY + lungs benchmark: ``segment_body_lungs`` on a 300×512×512 CT (target ≤ 3 s, ≤ 1 GB extra).

Run: .venv/bin/python benchmarks/anatomy_bench.py [--slices 300] [--size 512] [--repeats 3]
         [--grid 0.98x3 --grid 0.8x1.25 …]   (pixel × slice spacing in mm; these two by default)

The CT is the analytic phantom of ``tests/harness/synthetic_ct.py`` (body on a couch, two lungs,
spine; 10 HU noise) sampled on an axial HFS grid, centred on the lungs, with a trachea, main
bronchi and bowel gas added so every rule runs. Each run is a fresh process (the volume is handed
over as a .npy file), so the peak resident memory it reports is the segmentation's own: peak RSS
minus RSS once the volume is loaded. Prints one row per grid: wall and CPU seconds of each run,
extra peak memory, and the Dice of BODY and lungs against the phantom's truth. The machine's load
average is printed too: on a shared machine wall times stretch with it.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository root must be importable before these imports

from node.model.volume import Geometry  # noqa: E402
from tests.harness.synthetic_ct import HU_LUNG, body_mask_lps, phantom_hu  # noqa: E402


def phantom(slices: int, size: int, pixel_mm: float = 0.8, slice_mm: float = 1.25,
            seed: int = 0) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """HU volume, its geometry and the truth labels (0/1 body/2 left/3 right), one slice at a time."""
    half = size * pixel_mm / 2
    z0 = 60.0 - slices * slice_mm / 2  # centred on the lungs
    geometry = Geometry(
        origin=np.array([-half, -half, z0]), row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]),
        normal=np.array([0, 0, 1.0]), slice_step=np.array([0, 0, slice_mm]),
        spacing=(slice_mm, pixel_mm, pixel_mm), shape=(slices, size, size),
    )
    voxels = np.empty((slices, size, size), dtype=np.float32)
    truth = np.zeros((slices, size, size), dtype=np.uint8)
    axis = np.arange(size) * pixel_mm - half
    x, y = np.meshgrid(axis, axis, indexing="xy")  # [row, col]: x along columns, y along rows
    rng = np.random.default_rng(seed)
    for k in range(slices):
        z = z0 + k * slice_mm
        points = np.stack([x, y, np.full_like(x, z)], axis=-1)
        hu = phantom_hu(points)
        body = body_mask_lps(points)
        lung = hu == HU_LUNG
        # A trachea with main bronchi into both lungs (airway, not lung) and bowel gas below the lungs.
        yc = float(np.mean(y[body])) if body.any() else 0.0
        if z > 140:
            hu[(x ** 2 + (y - yc) ** 2 < 9.0 ** 2) & body] = -1000.0
        if 140 < z < 150:
            hu[(np.abs(y - yc) < 5.0) & (np.abs(x) < 70.0) & body] = -1000.0
        if -140 < z < -100:
            hu[((x - 60) ** 2 + (y - yc) ** 2 < 25.0 ** 2) & body] = -1000.0
        truth[k][body] = 1
        truth[k][lung & (x > 0)] = 2
        truth[k][lung & (x < 0)] = 3
        voxels[k] = hu + rng.normal(0.0, 10.0, hu.shape).astype(np.float32)
    return voxels, geometry, truth


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(path: Path, meta: dict) -> None:
    """Run once in this process and print a JSON line: seconds, stage times, extra peak KiB."""
    from node.infer import anatomy

    voxels = np.load(path)
    g = meta["geometry"]
    geometry = Geometry(origin=np.array(g["origin"]), row_dir=np.array(g["row_dir"]), col_dir=np.array(g["col_dir"]),
                        normal=np.array(g["normal"]), slice_step=np.array(g["slice_step"]),
                        spacing=tuple(g["spacing"]), shape=tuple(g["shape"]))
    base = _rss_kib()
    start, cpu = time.perf_counter(), time.process_time()
    labels = anatomy.segment_body_lungs(voxels, geometry)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(path.with_name("labels.npy"), labels)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "extra_kib": peak - base}))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(int(np.count_nonzero(a) + np.count_nonzero(b)), 1))


def run_grid(slices: int, size: int, pixel_mm: float, slice_mm: float, repeats: int) -> list[str]:
    voxels, geometry, truth = phantom(slices, size, pixel_mm, slice_mm)
    meta = {"geometry": {
        "origin": geometry.origin.tolist(), "row_dir": geometry.row_dir.tolist(), "col_dir": geometry.col_dir.tolist(),
        "normal": geometry.normal.tolist(), "slice_step": geometry.slice_step.tolist(),
        "spacing": list(geometry.spacing), "shape": list(geometry.shape)}}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "voxels.npy"
        np.save(path, voxels)
        del voxels
        for _ in range(repeats):
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--meta", json.dumps(meta)],
                                  capture_output=True, text=True, cwd=ROOT, env={**os.environ}, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        labels = np.load(Path(tmp) / "labels.npy")
    return [
        f"{slices}×{size}×{size}", f"{pixel_mm:g}×{slice_mm:g}",
        " ".join(f"{r['seconds']:.2f}" for r in runs), f"{min(r['seconds'] for r in runs):.2f}",
        f"{min(r['cpu'] for r in runs):.2f}", f"{max(r['extra_kib'] for r in runs) / 1024:.0f}",
        f"{dice(labels > 0, truth > 0):.4f}", f"{dice(labels == 2, truth == 2):.4f}",
        f"{dice(labels == 3, truth == 3):.4f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", action="append", help="PIXELxSLICE spacing in mm (repeatable)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--meta", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.meta))
        return 0
    grids = [tuple(float(v) for v in g.lower().split("x")) for g in (args.grid or ["0.98x3", "0.8x1.25"])]
    header = ["volume", "pixel×slice mm", "wall s per run", "best wall s", "best CPU s", "extra peak MiB",
              "Dice BODY", "Dice left", "Dice right"]
    rows = [run_grid(args.slices, args.size, pixel, slice_mm, args.repeats) for pixel, slice_mm in grids]
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(header)]
    print(f"CPU cores {os.cpu_count()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          "targets: ≤ 3 s, ≤ 1024 MiB extra")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
