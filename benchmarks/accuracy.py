"""Accuracy of the bundled models against TotalSegmentator's label maps in ../shared/data.

Run: .venv/bin/python benchmarks/accuracy.py [--backend onnxruntime --backend openvino-bf16 ...] [--abdomen DIR]

For every dataset with a TotalSegmentator reference, the node's default bundles run exactly as a worker
runs them (``segment_volume``) on each engine variant (``--backend``, repeatable; default: ONNX Runtime
FP32, and OpenVINO FP32 and BF16 where openvino is installed and the CPU has a BF16 unit) and each
structure's Dice and volume ratio (ours / reference) against the reference is printed with the variant, its
change against ONNX Runtime FP32
(issue 20: BF16 may lose at most 0.002), or why there is none (declined with the reason, or no reference
structure in the field). TotalSegmentator's "total" class map (v2 ids, checked against the data: the
example's lung bases carry the lower lobes 11 and 14): liver 5; left lung = lobes 10, 11; right lung =
lobes 12, 13, 14. It has no body outline, so BODY is reported by volume only. Targets (issue 3): liver ≥
0.95 on example_ct_sm; lungs ≥ 0.97 where a reference exists; the 20-slice series declined for liver,
with BODY still found. The third case, TotalSegmentator's 336 mm abdomen CT with its pelvis (its tests'
``example_ct.nii.gz`` and the per-organ ``liver.nii.gz``), is measured when a folder holding them is found
(``tests/data/totalseg-abdomen``, shipped with the tests, or ``--abdomen DIR``): the case of issue 16's liver
over-segmentation (1.25× before the crop stopped at the pelvis).
The OpenVINO variants are compiled at the stated precision without the backend's
agreement check (the Dice here is what that precision gives, whatever the check would decide); the
built-in bundle (body-lungs) runs no network, so its rows are the same on every variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.assemble.volume import build_volume, read_series  # noqa: E402
from node.errors import Declined  # noqa: E402
from node.infer.backends.onnxrt import OnnxRuntimeEngine  # noqa: E402
from node.infer.engine import Engine  # noqa: E402
from node.infer.manifest import discover_bundles  # noqa: E402
from node.infer.segment import segment_volume  # noqa: E402
from node.model.bundle import Bundle  # noqa: E402
from node.model.volume import Volume  # noqa: E402
from node.write.result import label_mask  # noqa: E402
from tests.harness.nifti import labels_on_grid, load_nifti_volume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
#: Our structure name → TotalSegmentator "total" label ids.
REFERENCE_IDS = {"Liver": (5,), "Lung_L": (10, 11), "Lung_R": (12, 13, 14)}


@dataclass
class Case:
    name: str
    volume: Volume
    reference: np.ndarray  # TotalSegmentator labels on the volume's grid
    covers: tuple[str, ...] | None = None  # the structures the reference holds, when not all of them


def cases(abdomen_dir: Path | None = None) -> list[Case]:
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
        reference, reference_geometry = load_nifti_volume(abdomen / "example_seg_dicom.nii.gz")
        # The label map's voxel order is not the DICOM series' (its rows run the other way): resample.
        reference = labels_on_grid(reference, reference_geometry, volume.geometry)
        found.append(Case("totalseg-abdomen-20-j2k (DICOM, 20 slices)", volume, np.rint(reference).astype(np.int16)))
    long_ct = abdomen_dir or Path(__file__).resolve().parents[1] / "tests" / "data" / "totalseg-abdomen"
    if (long_ct / "example_ct.nii.gz").is_file() and (long_ct / "liver.nii.gz").is_file():
        voxels, geometry = load_nifti_volume(long_ct / "example_ct.nii.gz")
        liver, _ = load_nifti_volume(long_ct / "liver.nii.gz")
        found.append(Case("totalseg example_ct (3 mm, 112 slices)", Volume(voxels.astype(np.float32), geometry, []),
                          np.where(liver > 0.5, 5, 0).astype(np.int16), covers=("Liver",)))
    return found


def _onnxruntime(bundle: Bundle) -> Engine:
    assert bundle.model_file is not None
    return OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name)


def _openvino(precision: str) -> Callable[[Bundle], Engine]:
    def make(bundle: Bundle) -> Engine:
        from node.infer.backends.openvino import compile_model, engine_for, input_shape, openvino_core
        from node.infer.cpu.precision import CpuPrecision

        compiled = compile_model(openvino_core(), bundle, input_shape(bundle), CpuPrecision(precision), 0)
        return engine_for(bundle, compiled, CpuPrecision(precision))
    return make


#: Engine variants: name → engine factory for a network bundle.
VARIANTS: dict[str, Callable[[Bundle], Engine]] = {
    "onnxruntime": _onnxruntime, "openvino-fp32": _openvino("fp32"), "openvino-bf16": _openvino("bf16"),
}


def default_variants() -> list[str]:
    from node.infer.backends.openvino import offers_bf16, openvino_core, status
    from node.infer.cpu.features import read_cpu

    if not status().available:
        return ["onnxruntime"]
    bf16 = read_cpu().bf16_unit is not None and offers_bf16(openvino_core())
    return ["onnxruntime", "openvino-fp32"] + (["openvino-bf16"] if bf16 else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=sorted(VARIANTS), default=[],
                        help="engine variant (repeatable; default: every one available here)")
    parser.add_argument("--abdomen", type=Path,
                        help="folder with TotalSegmentator's example_ct.nii.gz and liver.nii.gz")
    args = parser.parse_args()
    # The first variant is the baseline of the ΔDice column: ONNX Runtime FP32 whenever it is measured.
    variants = sorted(dict.fromkeys(args.backend or default_variants()), key=lambda v: v != "onnxruntime")
    all_cases = cases(args.abdomen)
    if not all_cases:
        print(f"no reference data under {SHARED}", file=sys.stderr)
        return 1
    bundles = discover_bundles(REPO / "engines")
    baseline: dict[tuple[str, str], float] = {}
    print(f"{'dataset':<44} {'structure':<8} {'backend':<14} {'Dice':>6} {'ΔDice':>7} {'ours mL':>8} {'ref mL':>8}"
          f" {'ratio':>6}  note")
    for variant in variants:
        engines = {b.id: VARIANTS[variant](b) if b.model_file is not None else None for b in bundles}
        for case in all_cases:
            if case.reference.shape != case.volume.voxels.shape:
                print(f"{case.name}: reference shape {case.reference.shape} != volume {case.volume.voxels.shape}")
                return 1
            for bundle in bundles:
                _score(case, bundle, engines[bundle.id], variant, baseline)
        del engines
    return 0


def _score(case: Case, bundle: Bundle, engine: Engine | None, variant: str,
           baseline: dict[tuple[str, str], float]) -> None:
    """Print one row per label of ``bundle`` on ``case``; the first variant's Dice is the baseline."""
    voxel_ml = float(np.prod(case.volume.geometry.spacing)) / 1000.0
    started = time.perf_counter()
    try:
        labels = segment_volume(case.volume, bundle, engine)
    except Declined as exc:
        for label in bundle.labels:
            print(f"{case.name:<44} {label.name:<8} {variant:<14} {'-':>6} {'-':>7} {'-':>8} {'-':>8} {'-':>6}  "
                  f"declined: {exc}")
        return
    seconds = time.perf_counter() - started
    for label in bundle.labels:
        ours = label_mask(labels, label)
        ids = REFERENCE_IDS.get(label.name) if case.covers is None or label.name in case.covers else None
        head = f"{case.name:<44} {label.name:<8} {variant:<14}"
        if ids is None:
            print(f"{head} {'-':>6} {'-':>7} {ours.sum() * voxel_ml:>8.0f} {'-':>8} {'-':>6}  "
                  f"no TotalSegmentator reference ({seconds:.1f} s)")
            continue
        truth = np.isin(case.reference, ids)
        if not truth.any():
            print(f"{head} {'-':>6} {'-':>7} {ours.sum() * voxel_ml:>8.0f} {0:>8.0f} {'-':>6}  "
                  "not in the reference's field")
            continue
        dice = 2.0 * (ours & truth).sum() / (ours.sum() + truth.sum())
        first = baseline.setdefault((case.name, label.name), dice)
        print(f"{head} {dice:>6.4f} {dice - first:>+7.4f} {ours.sum() * voxel_ml:>8.0f} "
              f"{truth.sum() * voxel_ml:>8.0f} {ours.sum() / truth.sum():>6.3f}  ({seconds:.1f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
