"""`dicom-seg-node bundles …`: bring trained models in as bundles.

import-nnunet   an nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_*/checkpoint_final.pth)
                → engines/NAME: the network rebuilt with nnU-Net's code, exported to ONNX (checked against
                PyTorch), and a manifest that reproduces nnU-Net's inference. Needs the [import] extra.
import-totalseg TotalSegmentator's weights folder (~/.totalsegmentator/nnunet/results, as
                totalseg_download_weights fills it) → engines/NAME: one bundle per task (--task total: its five
                1.5 mm networks as parts overlaid in TotalSegmentator's order; total_fast: the 3 mm network),
                TotalSegmentator's class names and values, its SNOMED CT codes and colours, TG-263 ROI names.
                Needs the [import] extra (torch, nnunetv2, TotalSegmentator).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig
from node.nnunet.totalseg_layout import task_names


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


def cmd_import_totalseg(args: argparse.Namespace) -> int:
    from node.nnunet.totalseg import import_totalseg

    output = Path(args.output) if args.output else Path("engines") / f"totalseg-{args.task.replace('_', '-')}"
    report = import_totalseg(Path(args.weights_dir), output, task_name=args.task, name=args.name,
                             labels_map=Path(args.labels_map) if args.labels_map else None)
    b, task = report.bundle, report.task
    for part in report.parts:
        print(f"  part {part.part}: {part.model_dir}, ONNX Runtime vs PyTorch max |Δ| = {part.max_difference:.2e}")
        for value, theirs, ours in part.name_mismatches:
            print(f"    class {value}: dataset.json says {theirs!r}, TotalSegmentator's class map {ours!r} (used)")
    print(f"wrote bundle {b.name} to {b.directory}: TotalSegmentator {task.name}, {len(b.parts)} network(s) at "
          f"{task.spacing_mm[0]:g} mm, {len(b.labels)} structures; RTSTRUCT names from TG-263 except "
          f"{len(report.without_tg263)} that keep TotalSegmentator's name: {', '.join(report.without_tg263)}")
    return 0


def add_bundles_parser(sub: argparse._SubParsersAction,
                       add_config: Callable[[argparse.ArgumentParser], None],
                       load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    del add_config, load  # importing needs no node configuration
    p = sub.add_parser("bundles", help="import trained models as bundles (nnU-Net v2, TotalSegmentator)",
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

    t = verbs.add_parser("import-totalseg", help="import TotalSegmentator's weights as one bundle per task",
                         description="Import TotalSegmentator's weights (as totalseg_download_weights lays them "
                                     "out) as a bundle (needs pip install '.[import]': torch, nnunetv2, "
                                     "TotalSegmentator).")
    t.add_argument("weights_dir", metavar="WEIGHTS_DIR",
                   help="TotalSegmentator's weights folder: ~/.totalsegmentator/nnunet/results (or "
                        "$TOTALSEG_WEIGHTS_PATH), holding Dataset291_…, Dataset297_…")
    t.add_argument("--task", default="total", choices=task_names(),
                   help="total: five networks at 1.5 mm (default); total_fast: one at 3 mm; total_fastest: 6 mm")
    t.add_argument("-o", "--output", metavar="engines/NAME",
                   help="the bundle folder to create (default: engines/totalseg-<task>)")
    t.add_argument("--name", help="the bundle's name (default: the output folder's name)")
    t.add_argument("--labels-map", metavar="CSV",
                   help="codes for classes TotalSegmentator's SNOMED CT mapping lacks, or overrides: columns "
                        "name,code,meaning,rt_roi_type,color")
    t.set_defaults(func=cmd_import_totalseg)
