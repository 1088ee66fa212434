"""``qa``: edit QA from the command line — how much clinicians change the node's contours.

qa report [--since DATE] [--bundle NAME] [--json|--csv]   per structure: n, median Dice and surface Dice,
                                                         shares unchanged/minor/major, control-limit flags
qa sets [--series UID] [--limit N] [--json]               the edited structure sets, structure by structure
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime

from node.config import NodeConfig
from node.errors import NodeError
from node.model.qa_records import QaSet
from node.qa.report import build_report, render_csv, render_text
from node.spool.queries import open_index


def parse_date(text: str) -> float:
    """``2025-01-31`` or ``2025-01-31T08:00`` (local time) → epoch seconds."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise NodeError(f"--since {text!r} is not a date (write 2025-01-31 or 2025-01-31T08:00)") from None


def cmd_qa_report(cfg: NodeConfig, args: argparse.Namespace) -> int:
    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
        return 1
    since = parse_date(args.since) if args.since else None
    rows = index.qa_structure_rows(since=since, bundle=args.bundle)
    report = build_report(rows, cfg.qa, until=time.time(), since=since)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif args.csv:
        print(render_csv(report), end="")
    else:
        period = f"since {args.since}" if args.since else "all recorded"
        print(f"edit QA, {period}; recent = the last {cfg.qa.recent_days:g} days"
              + (f"; bundle {args.bundle}" if args.bundle else ""))
        print(render_text(report))
    return 0


def describe_set(qa: QaSet) -> list[str]:
    """A set and its structures as lines (``qa sets``)."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(qa.compared_at))
    head = (f"{when}  {qa.label or '(no label)'}  {qa.sop_instance_uid}  from {qa.calling_ae or '?'}: "
            f"{qa.outcome.value}" + (f" ({qa.reason})" if qa.reason else ""))
    lines = [head]
    if qa.ct_series_uid:
        jobs = ", ".join(map(str, qa.result_jobs)) or "-"
        lines.append(f"  CT series {qa.ct_series_uid}; compared with job(s) {jobs}")
    for s in qa.structures:
        figures = ""
        if s.dice is not None:
            figures = (f"  Dice {s.dice:.3f}  sDice 1mm {s.surface_dice_1mm:.3f} 2mm {s.surface_dice_2mm:.3f}  "
                       f"HD95 {s.hd95_mm:.1f} mm  MSD {s.msd_mm:.2f} mm  {s.ours_ml:.1f} → {s.theirs_ml:.1f} mL "
                       f"({s.change_pct:+.1f}%)  slices +{s.added_slices}/-{s.removed_slices}")
        elif s.ours_ml is not None or s.theirs_ml is not None:
            figures = f"  {s.ours_ml or 0:.1f} → {s.theirs_ml or 0:.1f} mL"
        theirs = f" (theirs: {s.their_name})" if s.their_name and s.their_name != s.name else ""
        lines.append(f"  {s.name}{theirs} [{s.bundle or '-'}]: {s.verdict.value}{figures}"
                     + (f"  note: {s.note}" if s.note else ""))
    return lines


def cmd_qa_sets(cfg: NodeConfig, args: argparse.Namespace) -> int:
    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
        return 1
    sets = index.qa_sets(ct_series_uid=args.series, limit=args.limit)
    if args.json:
        print(json.dumps([s.as_dict() for s in sets], indent=2))
        return 0
    if not sets:
        print("no edited structure set has come back" + (f" for series {args.series}" if args.series else ""))
    for qa in sets:
        print("\n".join(describe_set(qa)))
    return 0


def add_qa_parsers(sub: argparse._SubParsersAction,
                   add_config: Callable[[argparse.ArgumentParser], None],
                   load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    p = sub.add_parser("qa", help="edit QA: how much clinicians change the node's contours",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="qa_command", required=True, metavar="VERB")
    v = verbs.add_parser("report", help="per structure over a period: Dice, surface Dice, verdict shares, flags",
                         description="Per structure of the node's results that came back edited: n, median Dice and "
                                     "surface Dice (2 mm), the share unchanged / minor / major / deleted, and a flag "
                                     "when the recent median falls below the control limit.")
    add_config(v)
    v.add_argument("--since", metavar="DATE", help="only sets compared since this date (2025-01-31)")
    v.add_argument("--bundle", metavar="NAME", help="only this bundle's structures")
    how = v.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="machine-readable output")
    how.add_argument("--csv", action="store_true", help="one CSV row per structure")
    v.set_defaults(func=lambda args: cmd_qa_report(load(args), args))
    v = verbs.add_parser("sets", help="the edited structure sets, structure by structure",
                         description="Each edited structure set that came back, newest first, with every "
                                     "structure's verdict and figures.")
    add_config(v)
    v.add_argument("--series", metavar="UID", help="only sets referencing this image series")
    v.add_argument("--limit", type=int, default=20, help="sets shown (default 20)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=lambda args: cmd_qa_sets(load(args), args))
