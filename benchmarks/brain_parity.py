"""Parity of the node's brain bundle (engines/brain-deepbet) with deepbet 1.0.2's own PyTorch pipeline.

Run::

    .venv/bin/python benchmarks/brain_parity.py [--series ../shared/data/mr/adi-brain-t2] [--threads 2]

Both pipelines get the same DICOM series, each read its own way, in a process of its own (so each peak RSS
is its own):

- deepbet: SimpleITK reads the series and writes a NIfTI (what a deepbet user feeds it); deepbet's
  ``BrainExtraction(no_gpu=True).run`` (nibabel, TorchScript on the CPU, cc3d, fill_voids) writes its mask;
- the node: ``node.assemble.volume`` builds the volume, the node's engine loader makes the parts' engines
  (``--backend``: ``cpu`` = ONNX Runtime, the default; ``openvino``; …), ``node.infer.brain.brain_labels`` runs
  the bundle's steps (without its selection rules).

The mask deepbet wrote is mapped onto the node's (slice, row, column) grid through the two images' patient
coordinates (the grids must coincide voxel for voxel) and compared: Dice, voxels that differ, times (the
segmentation only: models loaded, image in memory) and the time ratio, peak RSS of each process.

The shared series is a T2-weighted 2D FSE; deepbet is meant for T1-weighted MR and the bundle declines this
series in service. Both pipelines run on it anyway here: parity is about reproducing deepbet, not about
whether its brain mask on T2 is right (the output says so).
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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from node.model.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = ROOT.parent / "shared" / "data" / "mr" / "adi-brain-t2"
BUNDLE = ROOT / "engines" / "brain-deepbet"


def regular_copy(series: Path, out: Path) -> Path:
    """A copy of ``series`` in ``out`` with every missing slice put back (the mean of its two neighbours, a new
    SOP Instance UID derived from theirs): the shared T2 series lacks one slice (5 mm where the others are
    2.5 mm apart), which the node refuses as "slices are missing" and SimpleITK would silently close up."""
    import copy

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    datasets = [dcmread(p) for p in sorted(series.iterdir()) if p.is_file()]
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    where = [float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])) for d in datasets]
    step = float(np.median(np.diff(where)))
    out.mkdir(parents=True, exist_ok=True)
    filled = []
    for before, after, gap in zip(datasets, datasets[1:], np.diff(where), strict=False):
        filled.append(before)
        missing = int(round(gap / step)) - 1
        for m in range(1, missing + 1):
            t = m / (missing + 1)
            new = copy.deepcopy(before)
            pixels = (1 - t) * before.pixel_array.astype(np.float64) + t * after.pixel_array.astype(np.float64)
            new.PixelData = np.rint(pixels).astype(before.pixel_array.dtype).tobytes()
            ipp = (1 - t) * np.array([float(v) for v in before.ImagePositionPatient]) + \
                t * np.array([float(v) for v in after.ImagePositionPatient])
            new.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
            uid = generate_uid(entropy_srcs=[str(before.SOPInstanceUID), str(after.SOPInstanceUID), str(m)])
            new.SOPInstanceUID = uid
            new.file_meta.MediaStorageSOPInstanceUID = uid
            if "SliceLocation" in before and "SliceLocation" in after:
                new.SliceLocation = f"{(1 - t) * float(before.SliceLocation) + t * float(after.SliceLocation):.6f}"
            filled.append(new)
    filled.append(datasets[-1])
    for n, ds in enumerate(filled, start=1):
        ds.InstanceNumber = n
        ds.save_as(out / f"{n:04d}.dcm", enforce_file_format=True)
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_deepbet(series: Path, out: Path, threads: int) -> dict[str, float]:
    """deepbet's pipeline on a NIfTI that SimpleITK made of ``series``; its mask at ``out/deepbet.nii.gz``."""
    import nibabel as nib
    import SimpleITK as sitk
    import torch
    from deepbet import BrainExtraction

    torch.set_num_threads(threads)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    nifti = out / "input.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti))
    bet = BrainExtraction(no_gpu=True)
    image: Any = nib.load(str(nifti))
    image.get_fdata(dtype=np.float32)  # read before the clock starts, as the node's volume is
    started = time.perf_counter()
    _, mask, _ = bet.run(image)
    seconds = time.perf_counter() - started
    nib.save(mask, str(out / "deepbet.nii.gz"))
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def load_volume(series: Path) -> Volume:
    from node.assemble.volume import build_volume, read_series

    return build_volume(read_series(sorted(p for p in series.iterdir() if p.is_file())))


def run_node(series: Path, out: Path, threads: int, backend: str = "cpu") -> dict[str, object]:
    """The node's bundle on the volume it builds of ``series``, its engines from the node's loader (``backend``
    as ``[engines] backend``); labels at ``out/node.npy`` (its array order)."""
    from node.config import NodeConfig
    from node.infer.backends.loader import EngineLoader
    from node.infer.brain import brain_labels
    from node.infer.manifest import load_bundle
    from node.infer.parts import part_engines
    from node.model.enums import EngineBackend

    volume = load_volume(series)
    bundle = load_bundle(BUNDLE)
    loader = EngineLoader.from_config(NodeConfig(bundles_dir=BUNDLE.parent, engine_backend=EngineBackend(backend),
                                                 engine_threads=threads, state_dir=out / "state"))
    loaded = loader.get(bundle)
    engines = part_engines(bundle, loaded.engine)
    started = time.perf_counter()
    labels = brain_labels(volume, bundle, engines)
    seconds = time.perf_counter() - started
    loader.close()
    np.save(out / "node.npy", labels)
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "engine": loaded.description}


def deepbet_on_node_grid(series: Path, mask_path: Path) -> np.ndarray:
    """deepbet's mask (NIfTI, RAS world) sampled at the centres of the node's voxels (LPS world)."""
    import nibabel as nib

    geometry = load_volume(series).geometry
    mask: Any = nib.load(str(mask_path))
    k, i, j = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    lps = (geometry.origin[:, None] + np.outer(geometry.slice_step, k.ravel())
           + np.outer(geometry.col_dir * geometry.spacing[1], i.ravel())
           + np.outer(geometry.row_dir * geometry.spacing[2], j.ravel()))
    ras = np.diag([-1.0, -1.0, 1.0]) @ lps
    index = np.linalg.inv(mask.affine) @ np.vstack([ras, np.ones(ras.shape[1])])
    nearest = np.rint(index[:3])
    off = float(np.abs(index[:3] - nearest).max())
    if off > 0.05:
        raise ValueError(f"the NIfTI's grid does not coincide with the node's: voxel centres {off:.2f} voxels apart")
    data = np.asarray(mask.dataobj) > 0
    inside = np.all((nearest >= 0) & (nearest < np.array(data.shape)[:, None]), axis=0)
    sampled = np.zeros(nearest.shape[1], dtype=bool)
    idx = nearest[:, inside].astype(int)
    sampled[inside] = data[idx[0], idx[1], idx[2]]
    return sampled.reshape(geometry.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def compare(series: Path, threads: int, work: Path, backend: str = "cpu") -> dict[str, object]:
    """Run both sides in their own processes; the figures as a dict."""
    figures: dict[str, object] = {}
    for side in ("deepbet", "node"):
        cmd = [sys.executable, __file__, "--side", side, "--series", str(series), "--threads", str(threads),
               "--work", str(work), "--backend", backend]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{side} side failed ({done.returncode}): {done.stderr[-3000:]}")
        figures[side] = json.loads(done.stdout.strip().splitlines()[-1])
    node = np.load(work / "node.npy") > 0
    theirs = deepbet_on_node_grid(series, work / "deepbet.nii.gz")
    figures["dice"] = dice(node, theirs)
    figures["differing_voxels"] = int((node != theirs).sum())
    figures["brain_voxels"] = {"node": int(node.sum()), "deepbet": int(theirs.sum())}
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=Path, default=DEFAULT_SERIES)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "openvino", "auto", "tensorrt", "cuda"],
                    help="the node's engine backend, as [engines] backend (default: cpu = ONNX Runtime)")
    ap.add_argument("--side", choices=["deepbet", "node"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        sys.path.insert(0, str(ROOT))
        if args.side == "deepbet":
            print(json.dumps(run_deepbet(args.series, args.work, args.threads)))
        else:
            print(json.dumps(run_node(args.series, args.work, args.threads, args.backend)))
        return 0
    with tempfile.TemporaryDirectory(prefix="brain-parity-") as tmp:
        series = regular_copy(args.series, Path(tmp) / "series")
        f = compare(series, args.threads, Path(tmp), args.backend)
    ours, theirs = f["node"], f["deepbet"]
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    print(f"series {args.series} ({args.threads} threads; its missing slice put back, see regular_copy)")
    print("NOTE: deepbet is meant for T1-weighted MR; the shared series is T2-weighted (2D FSE), which the bundle "
          "declines in service. Both pipelines run on it here for parity only.")
    print(f"Dice node vs deepbet {f['dice']:.5f} (goal >= 0.99); voxels that differ {f['differing_voxels']}; "
          f"brain voxels node {f['brain_voxels']['node']} deepbet {f['brain_voxels']['deepbet']}")  # type: ignore[index]
    print(f"node engines: {ours['engine']}")
    print(f"time deepbet (PyTorch CPU) {theirs['seconds']:.2f} s, node {ours['seconds']:.2f} s, "
          f"ratio deepbet/node {theirs['seconds'] / ours['seconds']:.2f}")
    print(f"peak RSS deepbet {theirs['peak_rss_mb']:.0f} MB, node {ours['peak_rss_mb']:.0f} MB")
    return 0 if float(f["dice"]) >= 0.99 else 1  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
