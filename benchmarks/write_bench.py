"""Writing benchmark: SEG + RTSTRUCT for a 512×512×N CT with 4 structures.

Run: .venv/bin/python benchmarks/write_bench.py [--slices 300] [--repeats 3]
Prints a table: build and encode time of each object, its size, and the total (target ≤ 2 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.assemble.volume import build_volume, read_series  # noqa: E402
from node.infer.bundle import Code, Label, discover_bundles  # noqa: E402
from node.write.files import write_results  # noqa: E402
from node.write.provenance import Provenance  # noqa: E402
from node.write.result import Result  # noqa: E402
from node.write.uids import ResultUids  # noqa: E402
from tests.harness.synthetic_ct import write_ct_series  # noqa: E402

SCT = "SCT"


def four_structure_bundle():  # type: ignore[no-untyped-def]
    base = discover_bundles(Path(__file__).resolve().parents[1] / "engines", ("body-threshold",))[0]
    anatomy = Code(SCT, "123037004", "Anatomical Structure")
    labels = (
        base.labels[0],
        Label(2, "Lung_L", anatomy, Code(SCT, "44029006", "Left lung"), (0, 128, 255), "ORGAN"),
        Label(3, "Lung_R", anatomy, Code(SCT, "3341006", "Right lung"), (0, 200, 255), "ORGAN"),
        Label(4, "Spine", anatomy, Code(SCT, "421060004", "Spinal column"), (255, 255, 0), "ORGAN"),
    )
    return dataclasses.replace(base, labels=labels)


def labels_for(volume) -> np.ndarray:  # type: ignore[no-untyped-def]
    hu = volume.voxels
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu > -300] = 1
    lungs = (hu < -600) & (hu > -950)
    cols = np.arange(hu.shape[2])
    labels[lungs & (cols < hu.shape[2] // 2)] = 3  # image left = patient right
    labels[lungs & (cols >= hu.shape[2] // 2)] = 2
    labels[hu > 500] = 4
    return labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        series = write_ct_series(Path(tmp) / "ct", slices=args.slices)
        volume = build_volume(read_series(series.files))
    bundle = four_structure_bundle()
    labels = labels_for(volume)
    result = Result.of(volume, labels, bundle, ResultUids.for_job("bench"), Provenance(created=dt.datetime(2026, 1, 1)))
    found = result.found
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            objects = write_results(result, Path(tmp))
            rows.append((time.perf_counter() - t0, {o.kind: o.path.stat().st_size for o in objects}))
    best, sizes = min(rows, key=lambda r: r[0])
    print(f"volume {volume.voxels.shape}, structures {[l.name for l in found]}, best of {args.repeats}")
    print("SEG (BINARY, every frame kept) and RTSTRUCT built, encoded and fsynced, as the pipeline does")
    print(f"{'object':10} {'size MiB':>9}")
    for kind, size in sizes.items():
        print(f"{kind:10} {size / 2**20:9.1f}")
    print(f"{'total':10} {best:8.2f} s  (target ≤ 2 s; runs: {', '.join(f'{r[0]:.2f}' for r in rows)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
