"""Command line: ``dicom-seg-node`` / ``python -m node``.

serve    run the service (receive → assemble → infer → write → send)
segment  the same pipeline offline, on files and folders
echo     C-ECHO a DICOM peer
status   what the service's index holds: series, jobs, outbox, retention figures
retry    resend dead-lettered results; --job ID / --series UID: run failed jobs again
replay   send a finished series' results again (same files, same SOP Instance UIDs)
route    explain which rules and destinations match a received series
engines  doctor | build | bench: the GPU, TensorRT plans, engine speed (node/cli_engines.py)
bundles  import-nnunet: an nnU-Net v2 trained-model folder as a bundle (node/cli_bundles.py)
review   list | approve JOB | reject JOB --reason TEXT: the review gate (node/cli_review.py)
complete SERIES_UID: declare a series complete, segment it now (node/cli_series.py)
web      add-user NAME: a login for the web UI (node/cli_review.py)
qa       report | sets: edit QA of structure sets that came back edited (node/cli_qa.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node import __version__
from node.config import NodeConfig, load_config, parse_destination, with_overrides
from node.errors import Declined, NodeError, Retryable

if TYPE_CHECKING:
    from rich.table import Table

    from node.spool.index import Index
    from node.spool.retention import RetentionFigures

log = logging.getLogger("node")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _load(args: argparse.Namespace) -> NodeConfig:
    cfg = load_config(Path(args.config) if getattr(args, "config", None) else None)
    return with_overrides(
        cfg,
        port=getattr(args, "port", None),
        ae_title=getattr(args, "ae_title", None),
        state_dir=Path(args.state_dir) if getattr(args, "state_dir", None) else None,
        destinations=getattr(args, "destination", None),
        bind_address=getattr(args, "bind", None),
    )


# ---------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from node.service.daemon import serve

    cfg = _load(args)
    return serve(cfg)


# -------------------------------------------------------------------------------------- segment
@dataclass
class _SeriesFiles:
    series_uid: str
    description: str
    modality: str
    sop_class_uid: str
    paths: list[Path]


DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _scan(inputs: list[str]) -> tuple[list[_SeriesFiles], list[str]]:
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{item}: no such file or folder")
    groups: dict[str, _SeriesFiles] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM: READMEs, label maps and the like are skipped silently
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_CLASS:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        group = groups.setdefault(
            uid, _SeriesFiles(uid, str(ds.get("SeriesDescription", "")), str(ds.get("Modality", "")), sop_class, [])
        )
        group.paths.append(f)
    return list(groups.values()), problems


def cmd_segment(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from node.assemble.select import SeriesFacts, mr_facts, select_bundles
    from node.infer.backends.loader import EngineLoader
    from node.infer.manifest import discover_bundles
    from node.jobs.pipeline import run_job
    from node.model.bundle import Bundle
    from node.write.provenance import Provenance

    cfg = _load(args)
    console = Console(stderr=True)
    bundles = discover_bundles(cfg.bundles_dir, tuple(args.bundle) if args.bundle else cfg.bundles)
    series_list, problems = _scan(args.inputs)
    for problem in problems:
        console.print(f"[red]{problem}")
    if not series_list:
        console.print("[red]no DICOM series found in the input")
        return 2
    out_root = Path(args.output)
    rows: list[tuple[str, str, str, str, str]] = []
    failed = bool(problems)
    factory = EngineLoader.from_config(cfg)
    work: list[tuple[_SeriesFiles, Bundle]] = []
    for s in series_list:
        mr = mr_facts(s.paths) if s.modality == "MR" else None  # for [select.mr] rules (MR brain bundle)
        chosen, reasons = select_bundles(bundles, SeriesFacts(s.modality, s.sop_class_uid, len(s.paths), mr=mr))
        if not chosen:
            rows.append((_series_label(s), "-", "-", "-", "skipped: " + "; ".join(reasons)))
        work.extend((s, b) for b in chosen)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("segmenting", total=len(work))
        for s, bundle in work:
            progress.update(task, description=f"{bundle.name} on {_series_label(s)}")
            started = time.perf_counter()
            try:
                engine = factory.get(bundle).engine
                out_dir = out_root / _series_dir(s.series_uid) / bundle.name
                outcome = run_job(s.paths, bundle, engine, out_dir, provenance=Provenance.now(cfg.ae_title),
                                  write_seg=cfg.write_seg, write_rtstruct=cfg.write_rtstruct,
                                  preview_png=args.preview or cfg.preview_png, preview_sc=cfg.preview_sc,
                                  seg_type=cfg.seg_type, derive_missing_uids=True,
                                  mixed_frames=cfg.mixed_frames_of_reference, output=cfg.output_plan())
                result = "ok: " + ", ".join(str(o.path) for o in outcome.objects)
                if outcome.note:
                    result += f" (note: {outcome.note})"
                structures = ", ".join(outcome.structures)
            except Declined as exc:  # the model does not apply: said, not a failure
                result, structures = f"declined: {exc}", "-"
            except NodeError as exc:
                failed = True
                result, structures = f"failed: {exc}", "-"
            except Exception as exc:  # report, keep going with the other series
                failed = True
                log.exception("unexpected failure on series %s", s.series_uid)
                result, structures = f"failed: unexpected {type(exc).__name__}: {exc}", "-"
            rows.append((_series_label(s), bundle.id, structures, f"{time.perf_counter() - started:.1f} s", result))
            progress.advance(task)
    table = Table(title="segment summary")
    for column in ("series", "model", "structures", "time", "result"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a log or a pipe: no wrapping inside the cells
    out.print(table)
    return 1 if failed else 0


def _series_label(s: _SeriesFiles) -> str:
    uid = s.series_uid or "(empty SeriesInstanceUID)"
    return f"{s.description or s.modality} [{len(s.paths)}] {uid[-12:] if s.series_uid else uid}"


def _series_dir(series_uid: str) -> str:
    return "series-" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------- echo
def cmd_echo(args: argparse.Namespace) -> int:
    from node.dicom.scu import echo

    peer = parse_destination(args.peer, where="echo")
    tls = None
    if args.tls:  # the node's certificate and CA from the config's [tls] table
        tls = _load(args).tls
        peer = dataclasses.replace(peer, tls=True)
    print(echo(peer, calling_aet=args.calling_aet, timeout_s=args.timeout, tls=tls))
    return 0


# --------------------------------------------------------------------------------------- status
def _open_index(cfg: NodeConfig) -> Index | None:
    """The service's index, or None (said on stdout) when the service has not run with this state directory."""
    from node.spool.queries import open_index

    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
    return index


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from node.spool.queries import status_report

    cfg = _load(args)
    index = _open_index(cfg)
    if index is None:
        return 1
    report = status_report(cfg, index, args.limit)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    console = Console()
    t = Table(title=f"series ({report.instance_count} instances stored)")
    for c in ("series", "from", "modality", "instances", "state", "note"):
        t.add_column(c, overflow="fold")
    for s in report.recent_series:
        t.add_row(s.series_uid, s.calling_ae, s.modality, str(s.instance_count), s.state.value, s.note)
    console.print(t)
    t = Table(title="jobs")
    for c in ("id", "series", "bundle", "state", "attempts", "error / timings", "routing"):
        t.add_column(c, overflow="fold")
    for js in report.jobs:
        j = js.job
        t.add_row(str(j.id), j.series_uid[-16:], j.bundle, j.state.value, str(j.attempts), js.detail, j.note)
    console.print(t)
    t = Table(title="outbox")
    for c in ("id", "job", "destination", "object", "state", "attempts", "next try", "last status", "route"):
        t.add_column(c, overflow="fold")
    for o in report.outbox:
        nxt = time.strftime("%H:%M:%S", time.localtime(o.next_attempt_at)) if o.state.value == "pending" else ""
        state = o.state.value + (", verified" if o.verified_at else "") + (f", {o.resends} resent" if o.resends else "")
        t.add_row(str(o.id), str(o.job_id), o.destination, o.path.name, state, str(o.attempts), nxt,
                  o.last_status, o.route)
    console.print(t)
    console.print(_retention_table(report.retention))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from node.spool.commands import retry_dead_letters, retry_jobs
    from node.spool.index import Index

    cfg = _load(args)
    if args.job or args.series:
        index = _open_index(cfg)
        if index is None:
            return 1
        ids = retry_jobs(index, args.job or (), args.series)
        print(f"job(s) {', '.join(map(str, ids))} queued to run again (the running service takes them; "
              "`status` shows progress)")
        return 0
    n = retry_dead_letters(Index(cfg.index_path))
    print(f"{n} dead-lettered object(s) queued for sending again")
    return 0


def _retention_table(kept: RetentionFigures) -> Table:
    from rich.table import Table

    from node.spool.retention import format_age as _age

    limit = f"{kept.max_spool_gb:g} GB" if kept.max_spool_gb else "no limit"
    t = Table(title="retention", show_header=False)
    t.add_column("what")
    t.add_column("value", overflow="fold")
    t.add_row("spool", f"{kept.spool_bytes / 1e6:.1f} MB in {kept.instance_count} instance(s)")
    t.add_row("results", f"{kept.results_bytes / 1e6:.1f} MB")
    t.add_row("total / max_spool_gb", f"{kept.total_bytes / 1e9:.3f} GB / {limit}")
    t.add_row("series", str(kept.series_count))
    t.add_row("oldest series, last activity", _age(kept.oldest_activity_age_s))
    t.add_row("oldest series, first received", _age(kept.oldest_received_age_s))
    t.add_row(f"past keep_days = {kept.keep_days:g}, finished", f"{kept.deletable_now} (deleted at the next pass)")
    t.add_row("held: not finished or not delivered", f"{kept.held} (never deleted; {kept.held_dead_letters} with "
              "dead letters, which `retry` resends)")
    return t


# --------------------------------------------------------------------------------------- replay
def cmd_replay(args: argparse.Namespace) -> int:
    """Queue a finished series' results for sending again: the same files, so the same SOP Instance UIDs."""
    from node.spool.commands import replay_series

    cfg = _load(args)
    index = _open_index(cfg)
    if index is None:
        return 1
    outcome = replay_series(index, cfg, args.series, args.replay_destination)
    print(f"{outcome.queued} object(s) of series {outcome.series_uid} queued for sending again to "
          f"{', '.join(outcome.destinations)} (the running service sends them; `status` shows progress)")
    return 0


# ------------------------------------------------------------------------------------------ main
def cmd_route(args: argparse.Namespace) -> int:
    from node.assemble.explain import explain_series
    from node.config import check_bundle_names
    from node.config_output import check_output_names
    from node.infer.manifest import discover_bundles

    cfg = _load(args)
    index = _open_index(cfg)
    if index is None:
        return 1
    series = index.series(args.explain)
    if series is None:
        print(f"error: series {args.explain} is not in the index at {cfg.index_path}", file=sys.stderr)
        return 2
    bundles = discover_bundles(cfg.bundles_dir, cfg.bundles)
    check_bundle_names(cfg, [b.name for b in bundles])
    check_output_names(cfg.source, cfg.output, [(d.name, d.structures) for d in cfg.destinations], bundles)
    paths = index.instance_paths(series.series_uid) if series.modality == "MR" else []
    print("\n".join(explain_series(cfg, bundles, series, paths).lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-seg-node",
        description="A DICOM node that segments studies it receives and sends back DICOM-SEG and RTSTRUCT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="TOML", help="config file (default: the embedded defaults)")
        p.add_argument("--state-dir", metavar="DIR", help="override node.state_dir")

    p = sub.add_parser("serve", help="run the service", description="Receive, segment and send, until stopped.")
    add_config(p)
    p.add_argument("--port", type=int, help="override node.port (default 11112)")
    p.add_argument("--ae-title", help="override node.ae_title (default SEGNODE)")
    p.add_argument("--bind", help="override node.bind_address (default 0.0.0.0)")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="add a destination for results (repeatable)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("segment", help="segment files/folders offline",
                       description="Run the service's pipeline on DICOM files and folders; write SEG and RTSTRUCT.")
    add_config(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="where results are written")
    p.add_argument("--bundle", action="append", metavar="NAME", help="only this bundle (repeatable)")
    p.add_argument("--preview", action="store_true",
                   help="also write preview.png: axial, coronal and sagittal slices with the contours and a legend")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer", description="Verify a peer with C-ECHO.")
    p.add_argument("peer", metavar="AET@HOST:PORT")
    p.add_argument("--calling-aet", default="SEGNODE", help="our AE title in the association (default SEGNODE)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--tls", action="store_true", help="over TLS, with the certificates of the config's [tls] table")
    add_config(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("status", help="show series, jobs and the outbox",
                       description="Read the service's index: series, jobs, outbox with retry state.")
    add_config(p)
    p.add_argument("--limit", type=int, default=50, help="rows per table (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="resend dead-lettered results, or run failed jobs again",
                       description="Queue dead letters again; with --job or --series, run failed jobs again from "
                                   "the start instead (`status` marks the failures a retry could fix).")
    add_config(p)
    p.add_argument("--job", action="append", type=int, metavar="ID", help="a failed job's id (repeatable)")
    p.add_argument("--series", metavar="UID", help="Series Instance UID: the failed jobs of this series "
                   "(the newest job of each bundle, when it failed)")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("replay", help="send a finished series' results again",
                       description="Queue the results of a finished series for sending again (for example after "
                                   "a PACS lost them): the same files with the same SOP Instance UIDs, so a "
                                   "destination that still has them de-duplicates.")
    add_config(p)
    p.add_argument("--series", required=True, metavar="UID", help="Series Instance UID of the source series")
    p.add_argument("--destination", dest="replay_destination", action="append", metavar="NAME",
                   help="destination name (repeatable); default: every destination the series was sent to")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("route", help="explain the routing of a received series",
                       description="Which rules and destinations match a series already received, and why.")
    add_config(p)
    p.add_argument("--explain", required=True, metavar="SERIES_UID", help="Series Instance UID of a received series")
    p.set_defaults(func=cmd_route)

    from node.cli_engines import add_engines_parser

    add_engines_parser(sub, add_config, _load)
    from node.cli_bundles import add_bundles_parser

    add_bundles_parser(sub, add_config, _load)
    from node.cli_review import add_review_parsers

    add_review_parsers(sub, add_config, _load)
    from node.cli_series import add_series_parsers

    add_series_parsers(sub, add_config, _load)
    from node.cli_qa import add_qa_parsers

    add_qa_parsers(sub, add_config, _load)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except Retryable as exc:  # may clear by itself (a port still held): let systemd restart us
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except NodeError as exc:  # configuration or bundle errors: restarting will not help
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
