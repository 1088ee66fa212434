"""Imported nnU-Net models, node vs nnUNetPredictor: infer time, peak RSS and label agreement.

For each model, each pipeline runs in its own process (so each peak RSS is its own) on the same CT and
the same weights: the node's imported bundle through segment_volume on ONNX Runtime, nnU-Net's predictor
on the same voxels and spacing (fold 0, mirroring off, step 0.5, Gaussian, everything on the CPU).

Models (``--models``): ``3mm`` and ``1.5mm`` are 3d_fullres networks with the architecture nnU-Net's own
ExperimentPlanner gives a CT dataset like TotalSegmentator's at 3 mm (``total_fast``) and 1.5 mm
(``total``) target spacing (6-stage PlainConvUNet, 32..320 features, patch 160x128x112), ``--classes``
outputs (default 25: one TotalSegmentator part, 24 structures + background), seeded random weights
with BatchNorm (benchmarks/realistic_nnunet.py); ``tiny`` is the tests' tiny model trained a few hundred
steps on the CT's intensity bands; or ``--model MODEL_DIR [--labels-map CSV]`` for a model of your own.

The CT: ``--ct`` (default ../shared/data/ct/totalseg-abdomen-20-j2k, 20 real abdominal slices of 512²)
made into ``--slices`` slices (default 300) by mirroring the real slices back and forth along the stack
(0..19, 19..0, ...), every slice a real CT slice, at ``--slice-mm`` (default 1.5 mm) apart.

    .venv/bin/python benchmarks/import_parity.py [--models 3mm 1.5mm] [--classes 25] [--slices 300]
        [--threads 2] [--ct DIR] [--model MODEL_DIR --labels-map CSV]

Needs the [import] extra (torch, nnunetv2). On 2 idle cores (3 Dec 2026) both models took 17 min: the models made
and imported in ~30 s each, the node 26 s and 106 s (OpenVINO BF16), nnUNetPredictor 162 s and 629 s; its peak
is 10 GB at 3 mm and 14 GB at 1.5 mm with 25 classes (it resamples every class's logits to the native grid at
once): run it on an otherwise idle machine with 16 GB or more. Figures and their reading: README, "Speed and
memory: node vs nnUNetPredictor".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.volume import Volume  # noqa: E402

DEFAULT_CT = ROOT.parent / "shared" / "data" / "ct" / "totalseg-abdomen-20-j2k"
MIN_VOXELS = 1000


def mirrored_volume(ct: Path, slices: int, slice_mm: float) -> Volume:
    """The series at ``ct`` made into ``slices`` slices, ``slice_mm`` apart, by mirroring its slices."""
    from node.assemble.volume import build_volume, read_series

    volume = build_volume(read_series(sorted(p for p in ct.iterdir() if p.name.startswith("CT")
                                             or p.suffix == ".dcm")))
    n = volume.voxels.shape[0]
    if slices == n and slice_mm <= 0:
        return volume
    period = np.concatenate([np.arange(n), np.arange(n)[::-1]]) if n > 1 else np.zeros(1, dtype=int)
    order = np.resize(period, slices)
    g = volume.geometry
    step = g.normal * slice_mm if slice_mm > 0 else g.slice_step
    spacing = (float(np.linalg.norm(step)), g.spacing[1], g.spacing[2])
    geometry = dataclasses.replace(g, slice_step=step, spacing=spacing, shape=(slices, *g.shape[1:]), positions=None)
    return Volume(voxels=np.ascontiguousarray(volume.voxels[order]), geometry=geometry,
                  headers=[volume.headers[i] for i in order], notes=list(volume.notes))


def _worker(args: argparse.Namespace) -> int:
    """One pipeline in this process: labels to ``--out``, time and peak RSS to stdout (JSON)."""
    volume = mirrored_volume(Path(args.ct), args.slices, args.slice_mm)
    from tests.harness.nnunet_parity import nnunet_labels

    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    described = ""
    if args.side in ("node", "prepare"):  # the engine as the node's worker makes it (engines.backend, options)
        from node.infer.backends.base import BackendSettings
        from node.infer.backends.loader import EngineLoader
        from node.infer.manifest import load_bundle
        from node.infer.segment import segment_volume
        from node.model.enums import EngineBackend

        bundle = load_bundle(Path(args.bundle))
        settings = BackendSettings(Path(args.out).parent / "state", threads=args.threads)
        loaded = EngineLoader(EngineBackend(args.backend), settings).get(bundle)  # compiling/checking: not timed
        described = loaded.description
        if args.side == "prepare":  # a first load compiles, checks and caches; the measured run finds it cached
            print(json.dumps({"engine": described}))
            return 0
        start = time.perf_counter()
        labels = segment_volume(volume, bundle, loaded.engine)
        seconds = time.perf_counter() - start
    else:
        labels, seconds = nnunet_labels(volume, Path(args.model), ("0",), threads=args.threads)
    np.save(args.out, labels)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb, "before_mb": before_mb, "engine": described}))
    return 0


def _run(side: str, args: argparse.Namespace, work: Path, **paths: Path) -> tuple[dict[str, float], np.ndarray]:
    out = work / f"{side}.npy"
    command = [sys.executable, __file__, "--worker", side, "--ct", str(args.ct), "--threads", str(args.threads),
               "--backend", args.backend,
               "--slices", str(args.slices), "--slice-mm", str(args.slice_mm), "--out", str(out)]
    command += [item for k, v in paths.items() for item in (f"--{k}", str(v))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {side} pipeline failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    labels = np.load(out)
    out.unlink()
    return figures, labels


@dataclasses.dataclass
class Row:
    model: str
    grid: str
    tiles: int
    node: dict[str, float]
    nnunet: dict[str, float]
    voxel_agreement: float
    dice: dict[int, float]
    voxels: dict[int, int]  # per label: voxels in either pipeline's labels

    @property
    def min_dice(self) -> float:
        """The lowest Dice over the labels with at least MIN_VOXELS voxels (a few stray voxels say nothing)."""
        return min((d for v, d in self.dice.items() if self.voxels[v] >= MIN_VOXELS), default=float("nan"))


def _make_model(kind: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path | None]:
    if kind == "own":
        return Path(args.model), Path(args.labels_map) if args.labels_map else None
    if kind == "tiny":
        from tests.harness.nnunet_tiny import LABELS_CSV
        from tests.harness.nnunet_tiny import make_model_folder as make_tiny

        hu = mirrored_volume(Path(args.ct), 20, 0.0).voxels.astype(np.float32)
        return make_tiny(work / kind, hu=hu, iterations=args.iterations, batch_norm=True), LABELS_CSV
    from benchmarks.realistic_nnunet import PRESETS, labels_csv, make_model_folder

    model = make_model_folder(work / kind, PRESETS[kind], args.classes)
    return model, labels_csv(work / f"{kind}.csv", args.classes)


def _one(kind: str, args: argparse.Namespace, work: Path) -> Row:
    from node.infer.transforms import model_grid_shape
    from node.infer.window import tile_grid
    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_parity import agreement

    start = time.perf_counter()
    model, labels_map = _make_model(kind, args, work)
    report = import_nnunet(model, work / f"{kind}-bundle", labels_map=labels_map)
    bundle = report.bundle
    print(f"[{kind}] model made and imported in {time.perf_counter() - start:.0f} s "
          f"(ONNX vs PyTorch max |Δ| {report.max_difference:.2e})", flush=True)
    volume = mirrored_volume(Path(args.ct), args.slices, args.slice_mm)
    spacing = bundle.preprocess.spacing_mm or volume.geometry.spacing
    grid = model_grid_shape(volume.geometry.shape, volume.geometry.spacing, spacing)
    tiles = len(tile_grid(grid, bundle.window.patch, bundle.window.overlap))
    prepared = subprocess.run([sys.executable, __file__, "--worker", "prepare", "--backend", args.backend, "--ct",
                               str(args.ct), "--threads", str(args.threads), "--slices", "1", "--out",
                               str(work / "prepare.npy"), "--bundle", str(work / f"{kind}-bundle")],
                              capture_output=True, text=True)
    if prepared.returncode != 0:
        raise SystemExit(f"the node's engine cannot be made:\n{prepared.stderr[-4000:]}")
    print(f"[{kind}] node engine: {json.loads(prepared.stdout.strip().splitlines()[-1])['engine']}", flush=True)
    node, ours = _run("node", args, work, bundle=work / f"{kind}-bundle")
    print(f"[{kind}] node ({node['engine']}): {node['seconds']:.1f} s, peak RSS {node['peak_rss_mb']:.0f} MB",
          flush=True)
    theirs_figures, theirs = _run("nnunet", args, work, model=model)
    print(f"[{kind}] nnUNetPredictor: {theirs_figures['seconds']:.1f} s, peak RSS "
          f"{theirs_figures['peak_rss_mb']:.0f} MB", flush=True)
    result = agreement(ours, theirs, [label.value for label in bundle.labels])
    voxels = {v: int(np.count_nonzero((ours == v) | (theirs == v))) for v in result.dice}
    patch = "x".join(map(str, bundle.window.patch))
    at = "x".join(f"{s:g}" for s in spacing)
    return Row(kind if kind != "own" else model.name, f"{'x'.join(map(str, grid))} @ {at} mm, patch {patch}",
               tiles, node, theirs_figures, result.voxel_agreement, result.dice, voxels)


def _table(rows: list[Row], args: argparse.Namespace, shape: tuple[int, ...]) -> str:
    classes = f", {args.classes} classes (3mm/1.5mm)" if {"3mm", "1.5mm"} & set(args.models) else ""
    lines = [f"CT {shape[0]}x{shape[1]}x{shape[2]} ({args.slices} slices at {args.slice_mm:g} mm from {args.ct}), "
             f"{args.threads} threads each{classes}; node engines.backend = {args.backend}: "
             + "; ".join(sorted({str(r.node.get("engine", "")) for r in rows})),
             f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
             f"{'model':<8}{'model grid':<46}{'tiles':>6}{'node s':>9}{'node MB':>9}{'nnU-Net s':>11}"
             f"{'nnU-Net MB':>12}{'speed-up':>10}{'memory':>8}{'agree':>8}{'min Dice':>10}"]
    for r in rows:
        lines.append(f"{r.model:<8}{r.grid:<46}{r.tiles:>6}{r.node['seconds']:>9.1f}{r.node['peak_rss_mb']:>9.0f}"
                     f"{r.nnunet['seconds']:>11.1f}{r.nnunet['peak_rss_mb']:>12.0f}"
                     f"{r.nnunet['seconds'] / r.node['seconds']:>9.2f}x"
                     f"{r.node['peak_rss_mb'] / r.nnunet['peak_rss_mb']:>8.2f}{r.voxel_agreement:>8.4f}"
                     f"{r.min_dice:>10.4f}")
    lines.append("speed-up: nnU-Net s / node s (goal >= 2); memory: node MB / nnU-Net MB (goal <= 0.5); agree: "
                 f"voxel agreement of the labels; min Dice: the lowest per-label Dice over the labels with at least "
                 f"{MIN_VOXELS} voxels in either")
    for r in rows:
        lines.append(f"{r.model} Dice per label (voxels): " + ", ".join(
            f"{v}: {d:.4f} ({r.voxels[v]})" for v, d in sorted(r.dice.items())))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", default=str(DEFAULT_CT), help="a CT series folder (DICOM)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the benchmark CT (mirrored real slices)")
    parser.add_argument("--slice-mm", type=float, default=1.5, help="their spacing (0: the series' own)")
    parser.add_argument("--models", nargs="+", default=["3mm", "1.5mm"], choices=["3mm", "1.5mm", "tiny"])
    parser.add_argument("--classes", type=int, default=25, help="output classes of the 3mm/1.5mm models")
    parser.add_argument("--model", help="an nnU-Net v2 trained-model folder of your own (replaces --models)")
    parser.add_argument("--labels-map", help="the model's labels map CSV (with --model)")
    parser.add_argument("--iterations", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="the node's engines.backend (auto: as the node picks; "
                        "on a CPU with openvino installed that is OpenVINO, BF16 where the CPU has BF16 units; cpu: "
                        "ONNX Runtime)")
    parser.add_argument("--worker", dest="side", choices=["node", "nnunet", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return _worker(args)
    if not DEFAULT_CT.exists() and args.ct == str(DEFAULT_CT):
        raise SystemExit(f"{DEFAULT_CT}: not found; give a CT series folder with --ct")
    work = Path(tempfile.mkdtemp(prefix="import-parity-"))
    try:
        rows = [_one(kind, args, work) for kind in (["own"] if args.model else args.models)]
        shape = mirrored_volume(Path(args.ct), args.slices, args.slice_mm).voxels.shape
        print(_table(rows, args, shape))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
