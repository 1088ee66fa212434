"""Soak benchmark: the node receives, segments and sends series without a pause; is its memory flat?

Run from the repository root::

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--parallel 2] [--sample-s 2] [--json OUT]

It runs for ``--minutes`` (default 10; runnable for hours, e.g. ``--minutes 480``), bounded also by
``--max-state-gib`` (see "Disk" below). Everything is on 127.0.0.1:

* the node (``python -m node serve`` via ``tests/harness/node_process.py``, one worker, the
  body-threshold bundle only, quiet period 5 s, release settle 1 s) with DCMTK's ``storescp`` as
  its destination;
* a pusher that, round after round, writes ``--parallel`` new series (``--slices`` × ``--matrix``²
  synthetic CT, the same phantom with fresh Study/Series/SOP Instance/Frame of Reference UIDs, so
  each is a new series for the node) and sends them at once, one ``/usr/bin/storescu -v`` process
  each. Before each round it waits until at most ``--max-queue`` jobs are queued or running, so the
  arrivals keep the worker busy without building an ever longer backlog; ``--interval-s`` adds a
  pause between rounds;
* a sampler that every ``--sample-s`` seconds reads, from ``/proc``, VmRSS of the service process
  and the sum over its descendant processes (the spawned worker and multiprocessing's resource
  tracker), their open file descriptors (``/proc/<pid>/fd``) and the service's thread count, and
  from the index (read-only) the jobs done and failed and the results sent.

It prints one row per minute: series sent, instances acknowledged Success (``storescu -v``
"Received Store Response (Success)" lines), jobs done, results acknowledged by storescp, RSS of the
service and of the workers (minimum-maximum over the minute), file descriptors, threads and the
size of the spool; then a verdict on the second half of the run:

* service RSS: least-squares slope over every sample of the second half, in MiB per hour;
* worker RSS: slope of the per-minute minimum (the worker's RSS swings by hundreds of MiB within
  a job; the floor between jobs is what a leak raises), in MiB per hour;
* file descriptors and threads: slope per hour of the service's and workers' counts.

Memory is "flat" when both RSS slopes are below ``--flat-mib-per-hour`` (default 30) and the fd
slope is below 10 per hour. A 10-minute run only resolves slopes of roughly ±20 MiB/h on the
service: an hour or more gives a much sharper answer.

Disk: the node's retention (``[retention] keep_days``, default 7 days) deletes finished, delivered
series only after days, so during a soak the state directory grows by about
``slices × (matrix² × 2 + 1.7 KiB)`` per series (10 MiB at 300 × 128²). The run ends early, with a
note, when it exceeds ``--max-state-gib`` (default 20).
storescp's received files are counted and deleted as they arrive.

Exit status: 0 when memory is flat and nothing failed, 1 when memory is not flat, 2 when a push
failed, a job failed, a result was dead-lettered or the node exited.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository root must be importable before these imports

from tests.harness.dcmtk import STORESCU, StoreSCP, tool_missing_reason  # noqa: E402
from tests.harness.index_rows import read_index  # noqa: E402
from tests.harness.node_process import NodeProcess  # noqa: E402
from tests.harness.proctable import descendants  # noqa: E402
from tests.harness.synthetic_ct import write_ct_series  # noqa: E402

ONE_BUNDLE = '[engines]\nbundles = ["body-threshold"]\n'
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# ------------------------------------------------------------------------------------------ /proc
_descendants = descendants  # tests/harness/proctable.py


def _status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads of ``pid``; empty if it has gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "Threads"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------ index
_query = read_index  # tests/harness/index_rows.py


def _counts(index: Path) -> dict[str, int]:
    """Jobs by state and outbox rows by state, e.g. {'job_done': 12, 'outbox_sent': 24}."""
    out: dict[str, int] = {}
    for r in _query(index, "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        out[f"job_{r['state']}"] = int(r["n"])
    for r in _query(index, "SELECT state, COUNT(*) AS n FROM outbox GROUP BY state"):
        out[f"outbox_{r['state']}"] = int(r["n"])
    return out


# ------------------------------------------------------------------------------------------ state
@dataclass
class Sample:
    t: float  # seconds since the start of the run
    server_rss_mib: float
    worker_rss_mib: float  # sum over the service's descendants (worker, resource tracker)
    server_fds: int
    worker_fds: int
    threads: int  # the service's threads (association threads included)
    worker_pids: tuple[int, ...]
    series_sent: int
    instances_acked: int
    jobs_done: int
    jobs_failed: int
    jobs_pending: int  # queued + running
    results_sent: int  # outbox rows acknowledged by storescp
    dead: int
    dest_files: int  # files storescp received (counted, then deleted)
    spool_mib: float


@dataclass
class Counters:
    """What the pusher has done so far (written by the pusher thread, read by the sampler)."""

    series_sent: int = 0
    instances_acked: int = 0
    push_failures: list[str] = field(default_factory=list)
    push_seconds: float = 0.0
    rounds: int = 0


class SeriesFactory:
    """The same phantom again and again, under fresh UIDs: every series is new to the node."""

    def __init__(self, template_dir: Path, *, slices: int, matrix: int, thickness: float) -> None:
        series = write_ct_series(template_dir, slices=slices, rows=matrix, columns=matrix,
                                 pixel_spacing=(409.6 / matrix,) * 2, slice_thickness=thickness, seed=7,
                                 patient_id="SOAK0001", patient_name="Soak^Phantom")
        self.template: list[Dataset] = [dcmread(p) for p in series.files]
        self.bytes_per_series = sum(p.stat().st_size for p in series.files)
        shutil.rmtree(template_dir)

    def write(self, directory: Path) -> int:
        """Write one new series into ``directory``; return its instance count."""
        directory.mkdir(parents=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for n, ds in enumerate(self.template):
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.save_as(directory / f"CT{n:06d}.dcm", enforce_file_format=True)
        return len(self.template)


def _push(directory: Path, port: int, called_aet: str, calling_aet: str, timeout_s: float) -> tuple[int, int, str]:
    """storescu -v one folder; return (files, acknowledged Success, problem or '')."""
    t = str(int(timeout_s))
    cmd = [str(STORESCU), "-v", "-aet", calling_aet, "-aec", called_aet, "-to", t, "-ta", t, "-ts", t,
           "+sd", "127.0.0.1", str(port), str(directory)]
    try:
        proc = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout_s, env={**os.environ, "TCP_NODELAY": "1"})
    except subprocess.TimeoutExpired:
        return 0, 0, f"{calling_aet}: storescu did not finish in {timeout_s:.0f} s"
    lines = (proc.stdout + proc.stderr).splitlines()
    files = sum(1 for line in lines if line.startswith("I: Sending file: "))
    acked = sum(1 for line in lines if line.startswith("I: Received Store Response (Success)"))
    errors = [line for line in lines if line.startswith(("E: ", "F: "))]
    problem = ""
    if proc.returncode != 0 or errors or acked != files:
        problem = f"{calling_aet}: exit {proc.returncode}, {acked}/{files} acknowledged; {errors[:3]}"
    return files, acked, problem


# ------------------------------------------------------------------------------------------ run
class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.samples: list[Sample] = []
        self.counters = Counters()
        self.notes: list[str] = []
        self.stop = threading.Event()
        self.dest_files = 0
        self.started = 0.0
        self._results_walked = -1e9
        self.push_ended = 0.0  # seconds after the start when the last round ended
        self._results_bytes = 0

    # -------------------------------------------------------------- sampler
    def sample(self, node: NodeProcess, dest: Path) -> Sample | None:
        assert node.proc is not None
        root = node.proc.pid
        server = _status(root)
        if not server:
            return None
        kids = _descendants(root)
        kid_status = [(pid, _status(pid)) for pid in kids]
        for f in [p for p in dest.iterdir() if p.is_file() and not p.name.startswith(".")]:
            f.unlink(missing_ok=True)
            self.dest_files += 1
        index = node.state_dir / "index.sqlite3"
        counts = _counts(index)
        spool = _query(index, "SELECT COALESCE(SUM(size), 0) AS b FROM instances")
        c = self.counters
        return Sample(
            t=round(time.monotonic() - self.started, 2),
            server_rss_mib=round(server.get("VmRSS", 0) / 1024, 1),
            worker_rss_mib=round(sum(s.get("VmRSS", 0) for _, s in kid_status) / 1024, 1),
            server_fds=_fds(root),
            worker_fds=sum(_fds(pid) for pid in kids),
            threads=server.get("Threads", 0),
            worker_pids=tuple(sorted(pid for pid, s in kid_status if s)),
            series_sent=c.series_sent,
            instances_acked=c.instances_acked,
            jobs_done=counts.get("job_done", 0),
            jobs_failed=counts.get("job_failed", 0),
            jobs_pending=counts.get("job_queued", 0) + counts.get("job_running", 0),
            results_sent=counts.get("outbox_sent", 0),
            dead=counts.get("outbox_dead", 0),
            dest_files=self.dest_files,
            spool_mib=round(int(spool[0]["b"]) / 2**20, 1) if spool else 0.0,
        )

    def _sampler(self, node: NodeProcess, dest: Path) -> None:
        while not self.stop.is_set():
            try:
                s = self.sample(node, dest)
            except (OSError, sqlite3.Error, ValueError) as exc:  # a hiccup must not end the run; record it
                self.notes.append(f"sampling failed at {time.monotonic() - self.started:.0f} s: {exc!r}")
                s = None
            if s is not None:
                self.samples.append(s)
                if s.t // 60 != (self.samples[-2].t // 60 if len(self.samples) > 1 else -1):
                    print(f"  {s.t / 60:5.1f} min: {s.series_sent} series, {s.jobs_done} jobs done, "
                          f"service {s.server_rss_mib:.0f} MiB, workers {s.worker_rss_mib:.0f} MiB, "
                          f"fds {s.server_fds}+{s.worker_fds}", file=sys.stderr, flush=True)
            self.stop.wait(self.args.sample_s)

    # -------------------------------------------------------------- pusher
    def _pending_jobs(self, node: NodeProcess) -> int:
        """Jobs queued or running, plus series received but not yet settled (their jobs are to come)."""
        index = node.state_dir / "index.sqlite3"
        jobs = _query(index, "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')")
        series = _query(index, "SELECT COUNT(*) AS n FROM series WHERE state='receiving'")
        return (int(jobs[0]["n"]) if jobs else 0) + (int(series[0]["n"]) if series else 0)

    def _state_bytes(self, node: NodeProcess) -> int:
        """Spool (from the index) plus results (walked at most every 30 s) plus the index itself."""
        rows = _query(node.state_dir / "index.sqlite3", "SELECT COALESCE(SUM(size), 0) AS b FROM instances")
        spool = int(rows[0]["b"]) if rows else 0
        now = time.monotonic()
        if now - self._results_walked >= 30.0:
            self._results_walked = now
            self._results_bytes = sum(f.stat().st_size for f in (node.state_dir / "results").rglob("*")
                                      if f.is_file())
        index = sum(p.stat().st_size for p in node.state_dir.glob("index.sqlite3*"))
        return spool + self._results_bytes + index

    def push_loop(self, node: NodeProcess, factory: SeriesFactory, deadline: float) -> None:
        args, c = self.args, self.counters
        rounds_dir = self.work / "rounds"
        rounds_dir.mkdir()
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            while time.monotonic() < deadline:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    self.notes.append(f"the node exited ({node.proc.returncode}) at "
                                      f"{time.monotonic() - self.started:.0f} s")
                    return
                if self._state_bytes(node) > args.max_state_gib * 2**30:
                    self.notes.append(f"stopped pushing at {(time.monotonic() - self.started) / 60:.1f} min: the "
                                      f"state directory neared --max-state-gib {args.max_state_gib}")
                    return
                while self._pending_jobs(node) > args.max_queue and time.monotonic() < deadline:
                    time.sleep(0.2)
                if time.monotonic() >= deadline:
                    return
                dirs = [rounds_dir / f"r{c.rounds:06d}-{i}" for i in range(args.parallel)]
                for d in dirs:
                    factory.write(d)
                t0 = time.monotonic()
                results = list(pool.map(lambda ia: _push(ia[1], node.port, node.ae_title, f"SOAK{ia[0] + 1}",
                                                         args.push_timeout_s), enumerate(dirs)))
                c.push_seconds += time.monotonic() - t0
                for d in dirs:
                    shutil.rmtree(d)
                for _files, acked, problem in results:
                    c.series_sent += 1
                    c.instances_acked += acked
                    if problem:
                        c.push_failures.append(f"round {c.rounds}: {problem}")
                c.rounds += 1
                if args.interval_s:
                    self.stop.wait(args.interval_s)

    # -------------------------------------------------------------- main
    def run(self) -> None:
        args = self.args
        factory = SeriesFactory(self.work / "template", slices=args.slices, matrix=args.matrix,
                                thickness=args.thickness)
        print(f"series: {args.slices} × {args.matrix}² CT, {args.thickness} mm slices, "
              f"{factory.bytes_per_series / 2**20:.1f} MiB each; {args.parallel} per round", file=sys.stderr)
        dest_dir = self.work / "destination"
        with StoreSCP(dest_dir, ae_title="SOAKDEST") as dest, NodeProcess(
            self.work / "node", destinations=[f"SOAKDEST@127.0.0.1:{dest.port}"], quiet_period_s=5.0,
            release_settle_s=1.0, extra_toml="max_attempts = 50\nbackoff_max_s = 10.0\n" + ONE_BUNDLE,
        ) as node:
            self.node_log = node.log_path
            self.started = time.monotonic()
            sampler = threading.Thread(target=self._sampler, args=(node, dest_dir), name="sampler", daemon=True)
            sampler.start()
            try:
                self.push_loop(node, factory, self.started + 60 * args.minutes)
                self.push_ended = time.monotonic() - self.started
                # Let the last jobs finish (bounded), so that the counts add up.
                drain_until = time.monotonic() + args.drain_s
                while self._pending_jobs(node) and time.monotonic() < drain_until:
                    time.sleep(0.5)
                time.sleep(min(5.0, args.drain_s))  # the last results' sends
            finally:
                self.stop.set()
                sampler.join(30)
                final = self.sample(node, dest_dir) if node.proc is not None and node.proc.poll() is None else None
                if final is not None:
                    self.samples.append(final)
                if not dest.running:
                    self.notes.append("storescp (the destination) was not running at the end")


# ------------------------------------------------------------------------------------------ report
def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per hour (0 for < 2 points)."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return 3600.0 * sum((t - mt) * (v - mv) for t, v in points) / den


def minute_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    by_minute: dict[int, list[Sample]] = {}
    for s in samples:
        by_minute.setdefault(int(s.t // 60), []).append(s)
    rows = []
    for minute, group in sorted(by_minute.items()):
        last = group[-1]
        rows.append({
            "minute": minute + 1,
            "series_sent": last.series_sent,
            "instances_acked": last.instances_acked,
            "jobs_done": last.jobs_done,
            "jobs_pending": last.jobs_pending,
            "results_sent": last.results_sent,
            "dest_files": last.dest_files,
            "server_rss_min": min(s.server_rss_mib for s in group),
            "server_rss_max": max(s.server_rss_mib for s in group),
            "worker_rss_min": min(s.worker_rss_mib for s in group),
            "worker_rss_max": max(s.worker_rss_mib for s in group),
            "server_fds_max": max(s.server_fds for s in group),
            "worker_fds_max": max(s.worker_fds for s in group),
            "threads_max": max(s.threads for s in group),
            "spool_mib": last.spool_mib,
            "t_mid": statistics.fmean(s.t for s in group),
        })
    return rows


def verdict(samples: list[Sample], rows: list[dict[str, Any]], push_end: float,
            flat_mib_per_hour: float) -> dict[str, Any]:
    """Slopes over the second half of the pushing (the drain at the end is left out)."""
    end = push_end or (samples[-1].t if samples else 0.0)
    half = end / 2
    second = [s for s in samples if half <= s.t <= end]
    if len(second) < 2:
        return {"flat": False, "reason": "fewer than 2 samples in the second half"}
    # Whole minutes only: a partial minute's minimum is not a floor.
    floor_points = [(r["t_mid"], r["worker_rss_min"]) for r in rows
                    if r["t_mid"] >= half and 60 * r["minute"] <= end + 1]
    if len(floor_points) < 2:
        return {"flat": False, "reason": f"the run is too short: {len(floor_points)} whole minute(s) in the second "
                                         "half of the pushing, 2 needed (use --minutes 4 or more)"}
    out: dict[str, Any] = {
        "second_half_s": [round(half, 1), round(end, 1)],
        "samples": len(second),
        "floor_minutes": len(floor_points),
        "server_rss_slope_mib_per_h": round(slope_per_hour([(s.t, s.server_rss_mib) for s in second]), 1),
        "worker_rss_floor_slope_mib_per_h": round(slope_per_hour(floor_points), 1),
        "worker_rss_slope_all_samples_mib_per_h": round(slope_per_hour([(s.t, s.worker_rss_mib) for s in second]), 1),
        "fds_slope_per_h": round(slope_per_hour([(s.t, s.server_fds + s.worker_fds) for s in second]), 1),
        "threads_slope_per_h": round(slope_per_hour([(s.t, s.threads) for s in second]), 1),
        "server_rss_second_half_mib": [min(s.server_rss_mib for s in second), max(s.server_rss_mib for s in second)],
        "worker_pids_seen": sorted({p for s in samples for p in s.worker_pids}),
        "threshold_mib_per_h": flat_mib_per_hour,
    }
    out["flat"] = (abs(out["server_rss_slope_mib_per_h"]) < flat_mib_per_hour
                   and out["worker_rss_floor_slope_mib_per_h"] < flat_mib_per_hour
                   and out["fds_slope_per_h"] < 10)
    return out


def render(soak: Soak, rows: list[dict[str, Any]], v: dict[str, Any], command: str, total_s: float) -> str:
    header = ["min", "series", "acked", "jobs done", "pending", "results", "service RSS MiB", "workers RSS MiB",
              "fds svc+wrk", "threads", "spool MiB"]
    table = [[str(r["minute"]), str(r["series_sent"]), str(r["instances_acked"]), str(r["jobs_done"]),
              str(r["jobs_pending"]), str(r["results_sent"]),
              f"{r['server_rss_min']:.0f}-{r['server_rss_max']:.0f}",
              f"{r['worker_rss_min']:.0f}-{r['worker_rss_max']:.0f}",
              f"{r['server_fds_max']}+{r['worker_fds_max']}", str(r["threads_max"]), f"{r['spool_mib']:.0f}"]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    lines = [f"$ {command}",
             (f"host: {os.cpu_count()} CPUs; {soak.args.slices} × {soak.args.matrix}² CT series, "
              f"{soak.args.parallel} concurrent storescu per round, at most {soak.args.max_queue} jobs pending "
              f"before the next round; samples every {soak.args.sample_s:g} s"),
             "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    c = soak.counters
    last = soak.samples[-1] if soak.samples else None
    lines.append("")
    if last is not None:
        rate = c.instances_acked / c.push_seconds if c.push_seconds else 0.0
        lines.append(f"totals: {c.series_sent} series / {c.instances_acked} instances acknowledged in "
                     f"{c.rounds} rounds ({rate:.0f} instances/s while pushing); {last.jobs_done} jobs done, "
                     f"{last.jobs_failed} failed, {last.jobs_pending} pending at the end; {last.results_sent} "
                     f"results acknowledged by storescp ({last.dest_files} files), {last.dead} dead letters; "
                     f"spool {last.spool_mib:.0f} MiB")
    lines.append(f"push failures: {len(c.push_failures)}" + (f" (first: {c.push_failures[0]})" if c.push_failures
                                                              else ""))
    for note in soak.notes:
        lines.append(f"note: {note}")
    pids = v.get("worker_pids_seen", [])
    lines.append(f"worker/descendant pids seen: {pids}" + (" (a worker was restarted or a helper process came "
                                                           "and went)" if len(pids) > 2 else ""))
    if "reason" in v:
        lines.append(f"verdict: cannot tell: {v['reason']}")
    else:
        lines.append(
            f"verdict: memory {'FLAT' if v.get('flat') else 'NOT FLAT'} over the second half of the pushing "
            f"({'-'.join(f'{t / 60:.1f}' for t in v.get('second_half_s', [0, 0]))} min, "
            f"{v.get('samples', 0)} samples, "
            f"{v.get('floor_minutes', 0)} whole minutes): service RSS "
            f"{v.get('server_rss_slope_mib_per_h', 0):+.1f} MiB/h, worker RSS floor "
            f"{v.get('worker_rss_floor_slope_mib_per_h', 0):+.1f} MiB/h (all worker samples "
            f"{v.get('worker_rss_slope_all_samples_mib_per_h', 0):+.1f} MiB/h), "
            f"fds {v.get('fds_slope_per_h', 0):+.1f}/h, "
            f"threads {v.get('threads_slope_per_h', 0):+.1f}/h; threshold {v.get('threshold_mib_per_h')} MiB/h")
    lines.append(f"total time {total_s / 60:.1f} min")
    return "\n".join(lines)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to push (default 10; hours are fine)")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent storescu associations per round (2)")
    parser.add_argument("--slices", type=int, default=300, help="instances per series (300)")
    parser.add_argument("--matrix", type=int, default=128, help="rows = columns of each image (128)")
    parser.add_argument("--thickness", type=float, default=1.0, help="slice thickness in mm (1.0)")
    parser.add_argument("--max-queue", type=int, default=2, help="jobs queued or running before a round waits (2)")
    parser.add_argument("--interval-s", type=float, default=0.0, help="pause between rounds (0)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples (2)")
    parser.add_argument("--flat-mib-per-hour", type=float, default=30.0, help="RSS slope called flat (30)")
    parser.add_argument("--max-state-gib", type=float, default=20.0, help="stop pushing before the state "
                        "directory (spool + results) reaches this (20)")
    parser.add_argument("--push-timeout-s", type=float, default=600.0, help="limit for one storescu (600)")
    parser.add_argument("--drain-s", type=float, default=120.0, help="wait at most this for the last jobs (120)")
    parser.add_argument("--json", metavar="OUT", help="also write samples, table and verdict as JSON to OUT")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (node log, state)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.parallel < 1 or args.slices < 5 or args.matrix < 16 or args.sample_s <= 0:
        parser.error("--minutes and --sample-s must be > 0, --parallel >= 1, --slices >= 5, --matrix >= 16")
    if reason := tool_missing_reason("storescu", "storescp"):
        parser.error(reason)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    command = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                        *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    print(f"working in {work}", file=sys.stderr)
    soak = Soak(args, work)
    t0 = time.monotonic()
    try:
        soak.run()
    finally:
        rows = minute_rows(soak.samples)
        v = verdict(soak.samples, rows, soak.push_ended, args.flat_mib_per_hour)
        print(render(soak, rows, v, command, time.monotonic() - t0), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "command": command, "args": vars(args), "rows": rows, "verdict": v, "notes": soak.notes,
                "push_failures": soak.counters.push_failures, "samples": [asdict(s) for s in soak.samples],
            }, indent=1) + "\n")
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    last = soak.samples[-1] if soak.samples else None
    failed = bool(soak.counters.push_failures or last is None or last.jobs_failed or last.dead
                  or any("exited" in n for n in soak.notes))
    return 2 if failed else (0 if v.get("flat") else 1)


if __name__ == "__main__":
    raise SystemExit(main())
