"""kill -9 the real service while it receives, segments and sends; check what survives a restart.

Two requirements from the issue are tested here, against ``python -m node serve`` on 127.0.0.1 and
DCMTK's ``/usr/bin/storescu`` / ``/usr/bin/storescp``:

* **Durability** (:func:`test_acknowledged_instances_survive_kill9_during_push`). Each round pushes
  a new synthetic CT series (a new seed, so new SOP Instance UIDs) with ``storescu -v -nh`` and
  kills the node's whole process group at a random moment of the push. The rng is seeded
  (``DURABILITY_SEED``). The moment is "just after storescu logs its k-th ``Sending file``", plus a
  random jitter of up to 1.5 store round trips. The node then starts again on the same state
  directory and port; that restarted node serves the next round. After each restart:

  - every instance that storescu saw answered with Success is in the index, and its spool file
    exists and reads with pydicom to the same SOPInstanceUID and byte-identical PixelData;
  - no ``*.part`` file is left in ``spool/tmp``;
  - the index agrees with the spool: every row's file exists, every spool file has a row, every
    file holds the SOP instance its row names, and each series' instance_count equals its rows;
  - the instances acknowledged in earlier rounds are all still there.

  The quiet period is one hour, so no series settles and no segmentation runs during these
  rounds: the test exercises receiving only. The default is 20 rounds of 60 instances of
  256×256, to keep CI short. ``DURABILITY_FULL=1`` runs 20 rounds of 300 instances of 512×512.
  ``DURABILITY_ROUNDS`` changes the number of rounds. Run with ``-s`` to see the per-round table.

* **Crash recovery** (:func:`test_jobs_recover_from_kill9_in_each_phase`). A node has a
  destination (storescp) and a one-second quiet period. A baseline run, with no kill, gives the
  job's stage timings and the SOP Instance UIDs of its SEG and RTSTRUCT. Each other scenario uses a
  fresh node and kills it in one stage of the job: assembly (read + assemble), inference or
  writing. Assembly and inference are aimed at by time: the middle of the stage in the baseline
  timings, counted from the job's claim time in the index. Writing is aimed at by the job's
  results folder appearing. A kill that misses its stage is tried again on a fresh node (at most 3
  times). After a restart the job must end 'done' on its second attempt,
  and storescp must get exactly the baseline's SEG and RTSTRUCT UIDs. In the "sending" scenario,
  storescp sleeps 3 s after each store (``--sleep-after``). The node is killed once the first
  result has arrived and before the second is sent, so the outbox is still pending. After the
  restart the results are delivered without a second segmentation. The resent object carries
  the same SOP Instance UID, so storescp holds more files than unique UIDs, and exactly 2 unique
  UIDs.

Every wait, loop and subprocess here has a time limit.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import STORESCU, StoreSCP, free_port, storescu, tool_missing_reason
from tests.harness.index_rows import read_index
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series

FULL = os.environ.get("DURABILITY_FULL", "") == "1"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(5400 if FULL else 600)]

ROUNDS = int(os.environ.get("DURABILITY_ROUNDS", "20"))
SLICES, MATRIX = (300, 512) if FULL else (60, 256)
SEED = int(os.environ.get("DURABILITY_SEED", "20240611"))

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: Pinned, so that another installed bundle neither adds jobs nor slows each start with its hash check.
ONE_BUNDLE = '[engines]\nbundles = ["body-threshold"]\n'

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------- helpers
def _start(node: NodeProcess, tag: str) -> None:
    """Start ``node`` logging to its own file.

    NodeProcess appends every start to one log and waits for "ready:" in it. After a restart it
    would find the previous start's line and return before the new process is ready, so each start
    gets a fresh log file.
    """
    node.log_path = node.workdir / f"node-{tag}.log"
    node.start()


def _wait(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something other than None/False; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached in {timeout} s")
        time.sleep(interval)


_db_rows = read_index  # tests/harness/index_rows.py


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.part")) if directory.is_dir() else []


# ------------------------------------------------------------------------------ push and kill -9
@dataclass
class Push:
    """What storescu saw during one push that the node's death interrupted."""

    acked: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> source file
    started: int = 0  # "Sending file" lines (with -nh storescu goes on through the list after the abort)
    requests: int = 0  # store requests sent before the first failed store: acknowledged + the one in flight
    failed: int = 0  # store responses other than Success
    kill_after_sending: int = 0  # k: killed after the k-th "Sending file" line ...
    jitter_ms: float = 0.0  # ... plus this delay
    finished_before_kill: bool = False
    returncode: int | None = None
    stderr: str = ""


def push_and_kill(node: NodeProcess, files: list[Path], sop_by_file: dict[Path, str], rng: random.Random,
                  timeout: float) -> Push:
    """Push ``files`` with ``storescu -v -nh`` and kill -9 the node at a random moment of the push."""
    result = Push(kill_after_sending=rng.randint(1, len(files)))
    jitter_fraction = rng.uniform(0.0, 1.5)
    net = str(int(timeout))
    cmd = [str(STORESCU), "-v", "-nh", "-aet", "STORESCU", "-aec", node.ae_title,
           "-to", net, "-ta", net, "-ts", net, "127.0.0.1", str(node.port), *map(str, files)]
    lines: list[str] = []
    reached = threading.Event()
    first_send: list[float] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace", env={**os.environ, "TCP_NODELAY": "1"})

    def read() -> None:
        # DCMTK logs to stderr unbuffered. Count "Sending file" lines as they arrive, so the kill
        # lands during the push whatever the machine's speed.
        assert proc.stderr is not None
        current: Path | None = None
        broken: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("I: Sending file: "):
                current = Path(line[len("I: Sending file: "):].strip())
                result.started += 1
                if not first_send:
                    first_send.append(time.monotonic())
                if result.started == result.kill_after_sending:
                    reached.set()
            elif line.startswith("I: Sending Store Request") and not broken:
                result.requests += 1
            elif line.startswith("E: Store Failed"):
                broken.append(line)  # the association died: later files fail at once (-nh)
            elif "Received Store Response" in line:
                if "(Success)" in line and current is not None:
                    result.acked[sop_by_file[current]] = current
                else:
                    result.failed += 1
                current = None
        reached.set()  # storescu ended (or never got that far): kill now

    reader = threading.Thread(target=read, name="storescu-reader", daemon=True)
    reader.start()
    try:
        reached.wait(timeout)
        # Jitter: a fraction of the mean store round trip so far, so the kill lands anywhere in the
        # k-th store: while its bytes arrive, while they are written, fsynced, indexed or answered.
        k = result.started
        cycle = (time.monotonic() - first_send[0]) / (k - 1) if first_send and k > 1 else 0.01
        result.jitter_ms = round(1000 * jitter_fraction * cycle, 2)
        time.sleep(jitter_fraction * cycle)
        result.finished_before_kill = proc.poll() is not None
        node.kill9()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    result.returncode = proc.returncode
    result.stderr = "".join(lines)
    return result


# --------------------------------------------------------------------------------------- checks
@dataclass
class RoundReport:
    round: int
    kill: str
    pushed: int
    requests: int
    acked: int
    found: int = 0
    extra: int = 0  # stored (indexed) but never acknowledged: the instance in flight at the kill
    parts_at_kill: int = 0
    parts_after_start: int = 0
    reindexed: int = 0  # spool files whose index row was not committed at the kill, indexed again at start
    spool_files: int = 0
    index_rows: int = 0
    problems: list[str] = field(default_factory=list)


def check_after_restart(node: NodeProcess, push: Push, series_uid: str, all_acked: dict[str, Path],
                        report: RoundReport) -> None:
    """Compare storescu's view, the spool and the index after a restart; record any problems."""
    state = node.state_dir
    problems = report.problems
    rows = {r["sop_instance_uid"]: r for r in _db_rows(
        state, "SELECT sop_instance_uid, series_uid, path FROM instances")}
    report.index_rows = len(rows)

    # 1. Every acknowledged instance is indexed, its file exists and reads back identical.
    for sop, source in push.acked.items():
        row = rows.get(sop)
        if row is None:
            problems.append(f"acknowledged {sop} ({source.name}) has no index row")
            continue
        path = Path(row["path"])
        if not path.is_file():
            problems.append(f"acknowledged {sop}: index row points to missing file {path}")
            continue
        try:
            got = dcmread(path)
            want = dcmread(source)
        except Exception as exc:  # any read failure is the finding
            problems.append(f"acknowledged {sop}: {path} does not read: {type(exc).__name__}: {exc}")
            continue
        if str(got.SOPInstanceUID) != sop or str(got.file_meta.MediaStorageSOPInstanceUID) != sop:
            problems.append(f"acknowledged {sop}: {path} holds {got.SOPInstanceUID}")
        elif got.PixelData != want.PixelData:
            problems.append(f"acknowledged {sop}: {path} PixelData differs from {source}")
        else:
            report.found += 1
    this_series = {sop for sop, r in rows.items() if r["series_uid"] == series_uid}
    report.extra = len(this_series - set(push.acked))

    # 2. Partial files are gone once the node has started.
    report.parts_after_start = len(_parts(state / "spool" / "tmp"))
    if report.parts_after_start:
        problems.append(f"{report.parts_after_start} *.part file(s) left in {state / 'spool' / 'tmp'} after start-up")

    # 3. The index agrees with the spool, both ways.
    spool_files = {p for p in (state / "spool" / "instances").rglob("*") if p.is_file()}
    report.spool_files = len(spool_files)
    indexed = {Path(r["path"]) for r in rows.values()}
    for p in sorted(indexed - spool_files)[:20]:
        problems.append(f"index row's file is missing from the spool: {p}")
    for p in sorted(spool_files - indexed)[:20]:
        problems.append(f"spool file without an index row: {p}")
    # This round's rows hold what they claim. The other rows were checked in their own round.
    for sop in sorted(this_series):
        path = Path(rows[sop]["path"])
        if not path.is_file():
            continue
        try:
            held = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:
            problems.append(f"spool file {path} (row {sop}) does not read: {type(exc).__name__}: {exc}")
            continue
        if held != sop:
            problems.append(f"spool file {path} holds {held}, its index row says {sop}")
    counts = _db_rows(state, """SELECT s.series_uid, s.instance_count AS counted,
                                       (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS rows
                                FROM series s""")
    for c in counts:
        if c["counted"] != c["rows"]:
            problems.append(f"series {c['series_uid']}: instance_count {c['counted']} but {c['rows']} instance rows")

    # 4. Nothing acknowledged in an earlier round has gone missing since.
    lost = sorted(set(all_acked) - set(rows))
    for sop in lost[:20]:
        problems.append(f"{sop} (acknowledged in an earlier round) is no longer in the index")


def _print_table(reports: list[RoundReport], header: str) -> None:
    cols = ["round", "kill at", "pushed", "requests", "acked", "found", "extra", ".part@kill",
            ".part@start", "reindexed", "spool", "index", "ok"]
    rows = [[str(r.round), r.kill, str(r.pushed), str(r.requests), str(r.acked), str(r.found), str(r.extra),
             str(r.parts_at_kill), str(r.parts_after_start), str(r.reindexed), str(r.spool_files),
             str(r.index_rows),
             "yes" if not r.problems else f"NO ({len(r.problems)})"] for r in reports]
    rows.append(["total", "", str(sum(r.pushed for r in reports)), str(sum(r.requests for r in reports)),
                 str(sum(r.acked for r in reports)), str(sum(r.found for r in reports)),
                 str(sum(r.extra for r in reports)), str(sum(r.parts_at_kill for r in reports)),
                 str(sum(r.parts_after_start for r in reports)), str(sum(r.reindexed for r in reports)), "", "",
                 "yes" if all(not r.problems for r in reports) else "NO"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print(f"\n{header}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    print("kill at #k+j: kill -9 j ms after storescu logged its k-th 'Sending file'. requests: store requests\n"
          "sent before the association died. acked: Success responses storescu saw. found: acknowledged\n"
          "instances indexed, spooled and identical after the restart. extra: instances of the round stored\n"
          "without an acknowledgement (in flight at the kill). .part@kill / .part@start: partial files in\n"
          "spool/tmp just after the kill / after the restart. reindexed: spool files indexed again at start.\n"
          "spool / index: files in the spool / rows in the index, all rounds so far.")


# ------------------------------------------------------------------------------------ durability
def test_acknowledged_instances_survive_kill9_during_push(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    pixel_spacing = 409.6 / MATRIX
    node = NodeProcess(tmp_path / "node", quiet_period_s=3600, release_settle_s=3600, port=free_port(),
                       extra_toml=ONE_BUNDLE)
    push_timeout = 120.0 if not FULL else 600.0
    reports: list[RoundReport] = []
    all_acked: dict[str, Path] = {}
    try:
        _start(node, "r00-start")
        for rnd in range(1, ROUNDS + 1):
            series = write_ct_series(tmp_path / f"ct{rnd:02d}", slices=SLICES, rows=MATRIX, columns=MATRIX,
                                     pixel_spacing=(pixel_spacing, pixel_spacing), seed=SEED + rnd,
                                     patient_id=f"DUR{rnd:03d}")
            sop_by_file = dict(zip(series.files_in_slice_order, series.sop_instance_uids, strict=True))
            push = push_and_kill(node, series.files, sop_by_file, rng, push_timeout)
            kill = (f"#{push.kill_after_sending}+{push.jitter_ms:.1f}ms"
                    + (" (after end)" if push.finished_before_kill else ""))
            report = RoundReport(rnd, kill, len(series.files), push.requests, len(push.acked))
            report.parts_at_kill = len(_parts(node.state_dir / "spool" / "tmp"))
            _start(node, f"r{rnd:02d}-restart")
            if m := re.search(r"re-indexed (\d+) spooled instance", node.log_text()):
                report.reindexed = int(m.group(1))
            check_after_restart(node, push, series.series_uid, all_acked, report)
            if push.failed:
                report.problems.append(f"storescu saw {push.failed} non-Success store response(s) before the kill")
            if report.problems:
                report.problems.append(f"node log: {node.log_path}; storescu tail:\n{push.stderr[-1500:]}")
            reports.append(report)
            all_acked.update(push.acked)
            if FULL:  # 150 MB a round: keep only what later rounds still compare against (nothing)
                for f in series.files:
                    f.unlink()
    finally:
        node.stop()
        shape = f"{SLICES} × {MATRIX}×{MATRIX}"
        _print_table(reports, f"kill -9 during push: {len(reports)} round(s) of {shape}, seed {SEED}"
                              f"{' (DURABILITY_FULL)' if FULL else ''}; state {node.state_dir}")
    recovered = [p for p in node.workdir.glob("node-r*-restart.log")
                 if "recovered after an unclean stop" in p.read_text(errors="replace")]
    print(f"restarts that logged a recovery (partial files removed or jobs requeued): {len(recovered)}")
    reindexed = sorted(p.name for p in node.workdir.glob("node-*.log") if "re-indexed" in p.read_text(errors="replace"))
    print(f"restarts that re-indexed lost index rows: {reindexed or 'none'}")
    failed = [r for r in reports if r.problems]
    assert len(reports) == ROUNDS
    assert not failed, "\n\n".join(f"round {r.round} (kill {r.kill}):\n  " + "\n  ".join(r.problems)
                                   for r in failed)
    assert sum(r.acked for r in reports) > 0, "no round got any instance acknowledged: the kill came too early"


# -------------------------------------------------------------------------------- crash recovery
CR_SLICES, CR_MATRIX = 40, 256
JOB_TIMEOUT = 180.0


def _job(state_dir: Path) -> sqlite3.Row | None:
    rows = _db_rows(state_dir, "SELECT * FROM jobs ORDER BY id")
    return rows[0] if rows else None


def _outbox(state_dir: Path) -> list[sqlite3.Row]:
    return _db_rows(state_dir, "SELECT * FROM outbox ORDER BY id")


def _received(pacs_dir: Path) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of every file storescp wrote."""
    out = []
    for f in sorted(p for p in pacs_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = dcmread(f, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _make_node(workdir: Path, pacs_port: int) -> NodeProcess:
    return NodeProcess(workdir, destinations=[f"PACS@127.0.0.1:{pacs_port}"], quiet_period_s=1.0,
                       release_settle_s=0.3, extra_toml="max_attempts = 50\nbackoff_max_s = 2.0\n" + ONE_BUNDLE)


def _delivered(node: NodeProcess) -> list[sqlite3.Row] | None:
    items = _outbox(node.state_dir)
    return items if len(items) == 2 and all(o["state"] == "sent" for o in items) else None


@dataclass
class Scenario:
    name: str
    target_s: float | None = None  # planned kill time after the job's claim
    actual_s: float | None = None
    job_state_at_kill: str = ""
    results_at_kill: list[str] = field(default_factory=list)
    outbox_at_kill: list[str] = field(default_factory=list)
    job_state: str = ""
    attempts: int = 0
    error: str = ""
    files: int = 0
    unique: int = 0
    leftover_parts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _finish(node: NodeProcess, pacs: StoreSCP, sc: Scenario, baseline: set[str] | None, *,
            expect_attempts: int | None) -> None:
    """After the restart: wait for the outcome and compare with the baseline."""
    try:
        _wait("job ended", lambda: (j := _job(node.state_dir)) is not None and j["state"] in ("done", "failed"),
              JOB_TIMEOUT, 0.1)
        job = _job(node.state_dir)
        assert job is not None
        sc.job_state, sc.attempts, sc.error = job["state"], job["attempts"], job["error"]
        if job["state"] == "done":
            _wait("outbox delivered", lambda: _delivered(node), JOB_TIMEOUT, 0.1)
            pacs.wait_for_files(2, timeout=60)
    except TimeoutError as exc:
        sc.problems.append(f"{exc}; node log {node.log_path}:\n{node.log_text()[-3000:]}")
    got = _received(pacs.directory)
    sc.files = len(got)
    uids = {uid for _, uid in got}
    sc.unique = len(uids)
    sc.leftover_parts = [str(p.relative_to(node.state_dir)) for p in _parts(node.state_dir)]
    if sc.job_state != "done":
        sc.problems.append(f"job ended {sc.job_state or '(unknown)'} ({sc.error!r}), expected done after a retry")
    if expect_attempts is not None and sc.attempts != expect_attempts:
        sc.problems.append(f"job attempts {sc.attempts}, expected {expect_attempts}")
    if {c for c, _ in got} != {SEG_CLASS, RTSTRUCT_CLASS}:
        sc.problems.append(f"storescp received classes {sorted({c for c, _ in got})}, expected SEG and RTSTRUCT")
    if sc.unique != 2:
        sc.problems.append(f"storescp received {sc.unique} distinct SOP Instance UIDs in {sc.files} file(s), "
                           "expected 2")
    if baseline is not None and uids != baseline:
        sc.problems.append(f"result UIDs {sorted(uids)} differ from the baseline run's {sorted(baseline)}")
    jobs = _db_rows(node.state_dir, "SELECT id FROM jobs")
    if len(jobs) != 1:
        sc.problems.append(f"{len(jobs)} jobs in the index, expected 1")


def _print_scenarios(scenarios: list[Scenario]) -> None:
    print("\nkill -9 during a job (one fresh node each; storescp is the destination)")
    cols = ["scenario", "kill planned", "kill at", "job@kill", "results@kill", "outbox@kill", "job", "attempts",
            "files", "unique UIDs", "ok"]
    rows = []
    for s in scenarios:
        rows.append([s.name, "" if s.target_s is None else f"{s.target_s:.3f}s",
                     "" if s.actual_s is None else f"{s.actual_s:.3f}s", s.job_state_at_kill,
                     ",".join(s.results_at_kill) or "-", ",".join(s.outbox_at_kill) or "-", s.job_state,
                     str(s.attempts), str(s.files), str(s.unique), "yes" if not s.problems else "NO"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for s in scenarios:
        if s.leftover_parts:
            print(f"  note: {s.name}: *.part files left in the state directory after recovery: {s.leftover_parts}")


def _phase_windows(timings: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Start and end of each stage, in seconds after the job's claim, from a baseline run."""
    stages = [timings.get(k, 0.0) for k in ("read", "assemble", "infer", "write")]
    before = max(0.0, timings["total"] - sum(stages))  # logging, model load: before the stopwatch starts
    t_read = before + stages[0] + stages[1]
    t_infer = t_read + stages[2]
    t_write = t_infer + stages[3]
    return {"assembly": (before, t_read), "inference": (t_read, t_infer), "writing": (t_infer, t_write)}


def _kill_during_job(tmp_path: Path, series_dir: Path, name: str, window: tuple[float, float],
                     baseline: set[str], tries: int = 3) -> Scenario:
    """Kill the node in one stage of the job; restart it; check the job's outcome and the delivery.

    Assembly and inference are aimed at by time: the middle of the stage in the baseline's timings,
    counted from the job's claim time in the index. Writing is aimed at by an event: the job's
    results folder appears just before the SEG and RTSTRUCT are written, and the kill comes 40 % of
    the baseline's writing time later. The worker's speed varies from run to run. A kill that lands
    outside its stage (the job already done, or for assembly and inference the results folder
    already there) is reported and tried again on a fresh node, up to ``tries`` times.
    """
    sc = Scenario(name)
    for attempt in range(1, tries + 1):
        sc = Scenario(name if attempt == 1 else f"{name} (try {attempt})")
        with StoreSCP(tmp_path / f"pacs-{name}-{attempt}", ae_title="PACS") as pacs:
            node = _make_node(tmp_path / f"node-{name}-{attempt}", pacs.port)
            results = node.state_dir / "results"
            try:
                _start(node, "first")
                storescu("127.0.0.1", node.port, node.ae_title, series_dir, timeout=120)
                # B023: these probes use this iteration's node and results; _wait polls them before it returns
                claimed = _wait("job claimed", lambda: (j := _job(node.state_dir)) is not None  # noqa: B023
                                and j["state"] != "queued" and j, JOB_TIMEOUT, 0.005)
                claim_t = float(claimed["updated"])  # the claim's time.time()
                if name == "writing":
                    _wait("results folder", lambda: any(results.glob("job-*")) or  # noqa: B023
                          ((j := _job(node.state_dir)) is not None and j["state"] != "running"),  # noqa: B023
                          JOB_TIMEOUT, 0.002)
                    sc.target_s = time.time() - claim_t + 0.4 * (window[1] - window[0])
                else:
                    sc.target_s = (window[0] + window[1]) / 2
                time.sleep(max(0.0, claim_t + sc.target_s - time.time()))
                sc.actual_s = time.time() - claim_t
                node.kill9()
                job = _job(node.state_dir)
                assert job is not None
                sc.job_state_at_kill = job["state"]
                started_writing = any(results.glob("job-*"))
                sc.results_at_kill = sorted(p.name.split("_")[0] if "_" in p.name else p.name
                                            for p in results.rglob("*") if p.is_file()) if results.is_dir() else []
                missed = sc.job_state_at_kill != "running" or (name != "writing" and started_writing)
                if missed and attempt < tries:
                    print(f"\n{name}: try {attempt} missed the stage (job {sc.job_state_at_kill!r}, results "
                          f"{sc.results_at_kill or 'none'} at {sc.actual_s:.3f} s after the claim); trying again")
                    continue
                _start(node, "restart")
                _finish(node, pacs, sc, baseline,
                        expect_attempts=2 if sc.job_state_at_kill == "running" else None)
            finally:
                node.stop()
        if missed:
            # Aiming a kill at a ~60 ms stage depends on the machine's load. A miss is a limit of the
            # test, not a failure of the node: the outcome after the restart was still checked above.
            print(f"\nnote: the kill missed the {name} stage {tries} times; last: job {sc.job_state_at_kill!r}, "
                  f"results {sc.results_at_kill or 'none'}, {sc.actual_s:.3f} s after the claim")
        return sc
    return sc


def test_jobs_recover_from_kill9_in_each_phase(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=CR_SLICES, rows=CR_MATRIX, columns=CR_MATRIX,
                             pixel_spacing=(1.6, 1.6), seed=SEED)
    scenarios: list[Scenario] = []
    try:
        # Baseline, with no kill: stage timings and the SOP Instance UIDs every later scenario must reproduce.
        base = Scenario("baseline (no kill)")
        with StoreSCP(tmp_path / "pacs-baseline", ae_title="PACS") as pacs:
            node = _make_node(tmp_path / "node-baseline", pacs.port)
            try:
                _start(node, "first")
                storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
                _finish(node, pacs, base, None, expect_attempts=1)
                job = _job(node.state_dir)
                timings = json.loads(job["timings"]) if job is not None and job["timings"] else {}
            finally:
                node.stop()
        scenarios.append(base)
        assert not base.problems, base.problems
        baseline = {uid for _, uid in _received(pacs.directory)}
        windows = _phase_windows(timings)
        print(f"\nbaseline job timings {timings}; stage windows after the claim "
              f"{ {k: (round(a, 3), round(b, 3)) for k, (a, b) in windows.items()} }")

        for name, window in windows.items():
            scenarios.append(_kill_during_job(tmp_path, series.directory, name, window, baseline))

        # Sending: storescp sleeps 3 s after each store. Kill once the first result has arrived; the
        # second is not sent yet and the outbox rows are still pending.
        sc = Scenario("sending")
        pacs_dir = tmp_path / "pacs-sending"
        slow = StoreSCP(pacs_dir, ae_title="PACS", extra_args=["--sleep-after", "3"]).start()
        node = _make_node(tmp_path / "node-sending", slow.port)
        try:
            _start(node, "first")
            storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
            _wait("first result at storescp", lambda: len(slow.files()) >= 1, JOB_TIMEOUT, 0.01)
            node.kill9()
            job = _job(node.state_dir)
            sc.job_state_at_kill = job["state"] if job is not None else "(none)"
            sc.outbox_at_kill = [o["state"] for o in _outbox(node.state_dir)]
            slow.stop()
            with StoreSCP(pacs_dir, ae_title="PACS", port=slow.port) as pacs:
                _start(node, "restart")
                _finish(node, pacs, sc, baseline, expect_attempts=1)  # delivered without segmenting again
        finally:
            node.stop()
            slow.stop()
        if "pending" not in sc.outbox_at_kill:  # a limit of the test's aim, not a node failure (see above)
            print(f"\nnote: the kill missed the sending stage: outbox at the kill {sc.outbox_at_kill}")
        scenarios.append(sc)
    finally:
        _print_scenarios(scenarios)
    failed = [s for s in scenarios if s.problems]
    assert not failed, "\n\n".join(f"{s.name}:\n  " + "\n  ".join(s.problems) for s in failed)
