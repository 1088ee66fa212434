"""`dicom-seg-node bundles …`: bring trained models in as bundles.

import-nnunet   an nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_*/checkpoint_final.pth)
                → engines/NAME: the network rebuilt with nnU-Net's code, exported to ONNX (checked against
                PyTorch), and a manifest that reproduces nnU-Net's inference. Needs the [import] extra.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig


def cmd_import_nnunet(args: argparse.Namespace) -> int:
    from node.nnunet.bundle import import_nnunet

    folds: tuple[str, ...] = tuple(args.fold or ())
    report = import_nnunet(Path(args.model_dir), Path(args.output), folds=folds, name=args.name,
                           labels_map=Path(args.labels_map) if args.labels_map else None, mirror=args.mirror)
    b = report.bundle
    print(f"wrote bundle {b.name} to {b.directory}: configuration {report.configuration}, folds "
          f"{', '.join(report.folds)}{' (ensemble: mean of logits)' if len(report.folds) > 1 else ''}, "
          f"mirroring {'on' if report.mirrored else 'off'}, patch {'x'.join(map(str, b.window.patch))}, "
          f"spacing {b.preprocess.spacing_mm} mm, {len(b.labels)} labels; "
          f"ONNX Runtime vs PyTorch max |Δ| = {report.max_difference:.2e}")
    return 0


def add_bundles_parser(sub: argparse._SubParsersAction,
                       add_config: Callable[[argparse.ArgumentParser], None],
                       load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    del add_config, load  # importing needs no node configuration
    p = sub.add_parser("bundles", help="import trained models as bundles (nnU-Net v2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="bundles_command", required=True, metavar="VERB")
    v = verbs.add_parser("import-nnunet", help="import an nnU-Net v2 trained-model folder as a bundle",
                         description="Import an nnU-Net v2 trained-model folder as a bundle (needs "
                                     "pip install '.[import]': torch and nnunetv2).")
    v.add_argument("model_dir", metavar="MODEL_DIR",
                   help="the trained-model folder: dataset.json, plans.json, fold_*/checkpoint_final.pth")
    v.add_argument("-o", "--output", required=True, metavar="engines/NAME", help="the bundle folder to create")
    v.add_argument("--fold", action="append", metavar="N|all",
                   help="a fold to use (repeatable; 'all' is fold_all); default: every fold with a final "
                        "checkpoint, ensembled (mean of logits) as nnUNetPredictor does")
    v.add_argument("--name", help="the bundle's name (default: the output folder's name)")
    v.add_argument("--labels-map", metavar="CSV",
                   help="SNOMED CT code per label: columns name,code,meaning,rt_roi_type,color")
    v.add_argument("--mirror", action="store_true",
                   help="test-time mirroring along the checkpoint's allowed axes (nnU-Net's default; "
                        "up to 8x the inference time)")
    v.set_defaults(func=cmd_import_nnunet)
