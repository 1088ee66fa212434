"""An imported nnU-Net model, node vs nnUNetPredictor: infer time, peak RSS and label agreement.

Each pipeline runs in its own process (so each peak RSS is its own) on the same CT and the same weights:
the node's bundle through segment_volume on ONNX Runtime, nnU-Net's predictor on the same voxels and
spacing (fold 0, mirroring off, step 0.5, Gaussian). Without MODEL_DIR it makes the tests' tiny model
(tests/data/nnunet/tiny, trained a few hundred iterations on the CT's intensity bands).

    .venv/bin/python benchmarks/import_parity.py [--ct DIR] [--model MODEL_DIR --labels-map CSV]
        [--configuration 3d_fullres] [--threads 2]

Needs the [import] extra (torch, nnunetv2).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from node.model.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CT = ROOT.parent / "shared" / "data" / "ct" / "totalseg-abdomen-20-j2k"


def _volume(ct: Path) -> Volume:
    from node.assemble.volume import build_volume, read_series

    return build_volume(read_series(sorted(p for p in ct.iterdir() if p.name.startswith("CT") or p.suffix == ".dcm")))


def _worker(args: argparse.Namespace) -> int:
    """One pipeline in this process: labels to ``--out``, time and peak RSS to stdout (JSON)."""
    volume = _volume(Path(args.ct))
    from tests.harness.nnunet_parity import nnunet_labels, node_labels

    if args.side == "node":
        from node.infer.manifest import load_bundle

        labels, seconds = node_labels(volume, load_bundle(Path(args.bundle)), threads=args.threads)
    else:
        labels, seconds = nnunet_labels(volume, Path(args.model), ("0",), threads=args.threads)
    np.save(args.out, labels)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb}))
    return 0


def _run(side: str, args: argparse.Namespace, work: Path, **paths: Path) -> tuple[dict[str, float], np.ndarray]:
    out = work / f"{side}.npy"
    command = [sys.executable, __file__, "--worker", side, "--ct", str(args.ct), "--threads", str(args.threads),
               "--out", str(out)] + [item for k, v in paths.items() for item in (f"--{k}", str(v))]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures, np.load(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", default=str(DEFAULT_CT), help="a CT series folder (DICOM)")
    parser.add_argument("--model", help="an nnU-Net v2 trained-model folder (default: the tests' tiny model)")
    parser.add_argument("--labels-map", help="the model's labels map CSV (with --model)")
    parser.add_argument("--configuration", default="3d_fullres", help="the tiny model's configuration")
    parser.add_argument("--iterations", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", dest="side", choices=["node", "nnunet"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return _worker(args)

    from node.nnunet.bundle import import_nnunet
    from tests.harness.nnunet_parity import agreement
    from tests.harness.nnunet_tiny import LABELS_CSV, make_model_folder

    work = Path(tempfile.mkdtemp(prefix="import-parity-"))
    try:
        if args.model:
            model, labels_map = Path(args.model), Path(args.labels_map) if args.labels_map else None
        else:
            start = time.perf_counter()
            hu = _volume(Path(args.ct)).voxels.astype(np.float32)
            model = make_model_folder(work / "model", configuration=args.configuration, hu=hu,
                                      iterations=args.iterations, batch_norm=True)
            labels_map = LABELS_CSV
            seconds = time.perf_counter() - start
            print(f"tiny model ({args.configuration}, {args.iterations} steps) made in {seconds:.0f} s")
        report = import_nnunet(model, work / "bundle", labels_map=labels_map)
        node, ours = _run("node", args, work, bundle=work / "bundle")
        nnunet, theirs = _run("nnunet", args, work, model=model)
        result = agreement(ours, theirs, [label.value for label in report.bundle.labels])
        print(f"{'pipeline':<16}{'infer s':>10}{'peak RSS MB':>14}")
        print(f"{'node (ORT)':<16}{node['seconds']:>10.1f}{node['peak_rss_mb']:>14.0f}")
        print(f"{'nnUNetPredictor':<16}{nnunet['seconds']:>10.1f}{nnunet['peak_rss_mb']:>14.0f}")
        print(f"speed-up {nnunet['seconds'] / node['seconds']:.2f}x, memory ratio "
              f"{node['peak_rss_mb'] / nnunet['peak_rss_mb']:.2f}; voxel agreement {result.voxel_agreement:.4f}, "
              f"Dice {', '.join(f'{k}: {v:.4f}' for k, v in result.dice.items())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
