"""Accuracy of the bundled models against TotalSegmentator's label maps in ../shared/data.

Run: .venv/bin/python benchmarks/accuracy.py

For every dataset with a TotalSegmentator reference, the node's default bundles run exactly as a worker
runs them (``segment_volume``) and each structure's Dice against the reference is printed, or why there
is none (declined with the reason, or no reference structure in the field). TotalSegmentator's "total"
class map (v2 ids, checked against the data: the example's lung bases carry the lower lobes 11 and 14):
liver 5; left lung = lobes 10, 11; right lung = lobes 12, 13, 14. It has no body outline, so BODY is
reported by volume only. Targets (issue 3): liver ≥ 0.95 on example_ct_sm; lungs ≥ 0.97 where a
reference exists; the 20-slice series declined for liver, with BODY still found.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.assemble.volume import build_volume, read_series  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.errors import Declined  # noqa: E402
from node.infer.backends.loader import make_engine  # noqa: E402
from node.infer.manifest import discover_bundles  # noqa: E402
from node.infer.segment import segment_volume  # noqa: E402
from node.model.volume import Volume  # noqa: E402
from node.write.result import label_mask  # noqa: E402
from tests.harness.nifti import load_nifti_volume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
#: Our structure name → TotalSegmentator "total" label ids.
REFERENCE_IDS = {"Liver": (5,), "Lung_L": (10, 11), "Lung_R": (12, 13, 14)}


@dataclass
class Case:
    name: str
    volume: Volume
    reference: np.ndarray  # TotalSegmentator labels on the volume's grid


def cases() -> list[Case]:
    found = []
    nifti = SHARED / "nifti" / "totalseg"
    if (nifti / "example_ct_sm.nii.gz").is_file():
        voxels, geometry = load_nifti_volume(nifti / "example_ct_sm.nii.gz")
        reference, _ = load_nifti_volume(nifti / "example_seg.nii.gz")
        found.append(Case("example_ct_sm (3 mm, 30 slices)", Volume(voxels.astype(np.float32), geometry, []),
                          np.rint(reference).astype(np.int16)))
    abdomen = SHARED / "ct" / "totalseg-abdomen-20-j2k"
    if abdomen.is_dir():
        volume = build_volume(read_series(sorted(p for p in abdomen.iterdir() if p.name.startswith("CT"))))
        reference, _ = load_nifti_volume(abdomen / "example_seg_dicom.nii.gz")
        found.append(Case("totalseg-abdomen-20-j2k (DICOM, 20 slices)", volume, np.rint(reference).astype(np.int16)))
    return found


def main() -> int:
    all_cases = cases()
    if not all_cases:
        print(f"no reference data under {SHARED}", file=sys.stderr)
        return 1
    bundles = discover_bundles(REPO / "engines")
    engines = {b.id: make_engine(b, NodeConfig()) for b in bundles}
    print(f"{'dataset':<44} {'structure':<8} {'Dice':>6} {'ours mL':>8} {'ref mL':>8}  note")
    for case in all_cases:
        voxel_ml = float(np.prod(case.volume.geometry.spacing)) / 1000.0
        if case.reference.shape != case.volume.voxels.shape:
            print(f"{case.name}: reference shape {case.reference.shape} != volume {case.volume.voxels.shape}")
            return 1
        for bundle in bundles:
            started = time.perf_counter()
            try:
                labels = segment_volume(case.volume, bundle, engines[bundle.id])
            except Declined as exc:
                for label in bundle.labels:
                    print(f"{case.name:<44} {label.name:<8} {'-':>6} {'-':>8} {'-':>8}  declined: {exc}")
                continue
            seconds = time.perf_counter() - started
            for label in bundle.labels:
                ours = label_mask(labels, label)
                ids = REFERENCE_IDS.get(label.name)
                if ids is None:
                    print(f"{case.name:<44} {label.name:<8} {'-':>6} {ours.sum() * voxel_ml:>8.0f} {'-':>8}  "
                          f"no TotalSegmentator reference ({seconds:.1f} s)")
                    continue
                truth = np.isin(case.reference, ids)
                if not truth.any():
                    print(f"{case.name:<44} {label.name:<8} {'-':>6} {ours.sum() * voxel_ml:>8.0f} {0:>8.0f}  "
                          "not in the reference's field")
                    continue
                dice = 2.0 * (ours & truth).sum() / (ours.sum() + truth.sum())
                print(f"{case.name:<44} {label.name:<8} {dice:>6.3f} {ours.sum() * voxel_ml:>8.0f} "
                      f"{truth.sum() * voxel_ml:>8.0f}  ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
