"""Load: 8 concurrent DCMTK ``storescu`` associations × 300 instances while a segmentation runs.

Against ``python -m node serve`` on 127.0.0.1, with DCMTK's ``/usr/bin/storescp`` as destination:

1. **Reference push, no inference.** A separate node whose series never settle (quiet period and
   release settle of one hour, so no job is ever queued) receives the eight load series from eight
   concurrent ``storescu`` processes. This gives the receive rate of an idle node on this machine.
2. **Push while a segmentation runs.** A fresh node with a storescp destination receives one
   "trigger" series (512×512×300 CT, 1 mm pixels, 3 mm slices, whose job takes about 25 s on a
   2-core machine). As soon
   as the worker has claimed that job, eight ``storescu`` processes (calling AEs LOAD1..LOAD8) push
   eight other synthetic CT series of 300 instances each at the same time.

Checked after step 2:

* every ``storescu`` exits 0, logs no ``E:`` line, and logs 300 ``Sending file`` lines and 300
  ``Received Store Response (Success)`` lines (``-v``): every instance was acknowledged Success;
* the index holds exactly the 2,700 SOP instances pushed (trigger + load), each series with its
  300 rows and ``instance_count`` 300; every row's file exists in the spool and holds the SOP
  instance its row names; every spool file has a row; no ``*.part`` file is left in ``spool/tmp``;
* every one of the nine series gets its job done and its SEG and RTSTRUCT acknowledged by the
  destination (bounded wait), and storescp holds a SEG and an RTSTRUCT referencing each series;
* receiving does not collapse while inference is busy: the aggregate receive rate is > 0 and every
  association finished within its time limit. The rates (idle vs during inference), the share of
  the push during which a job was running, and the worker's CPU time during the push are printed
  (``-s``), not asserted: timings on a shared 2-core machine are noise.

Sizes: the load series are 128×128 with 1.0 mm slices (300 mm of the phantom), so that
generating them takes about 2 s each and their eight jobs about 4 s each; the whole test takes about
two minutes on 2 cores. ``LOAD_FULL=1`` uses 512×512 at 2.5 mm for the load series instead
(realistic CT; about 10 minutes). Every wait, loop and subprocess here has a time limit.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.index_rows import read_index
from tests.harness.node_process import NodeProcess
from tests.harness.processes import wait_until as _wait
from tests.harness.proctable import descendants, proc_table
from tests.harness.synthetic_ct import SyntheticSeries, write_ct_series

FULL = os.environ.get("LOAD_FULL", "") == "1"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000 if FULL else 600)]

ASSOCIATIONS = 8
SLICES = 300
LOAD_MATRIX, LOAD_THICKNESS = (512, 2.5) if FULL else (128, 1.0)
TRIGGER_MATRIX = 512
PUSH_TIMEOUT = 1200.0 if FULL else 300.0
RESULTS_TIMEOUT = 1800.0 if FULL else 360.0
SEED = 20240612

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Pinned, so that another installed bundle neither adds jobs nor slows each start with its hash check.
ONE_BUNDLE = '[engines]\nbundles = ["body-threshold"]\n'


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------- helpers


_db_rows = read_index  # tests/harness/index_rows.py


def _tree_ticks(root: int) -> tuple[int, int]:
    """(CPU ticks of ``root`` itself, CPU ticks of all its descendants) from /proc."""
    table = proc_table()
    own = table.get(root, (0, 0))[1]
    return own, sum(table[pid][1] for pid in descendants(root, table))


def _wait_cpu_idle(root: int, timeout: float = 60.0) -> None:
    """Wait until the node's process tree is nearly idle (its spawned worker imports ONNX Runtime
    after the port is open; that would compete with a push measured as 'idle')."""
    deadline = time.monotonic() + timeout
    previous = sum(_tree_ticks(root))
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = sum(_tree_ticks(root))
        if current - previous < 5:  # < 10 % of one core over the last half second
            return
        previous = current


@dataclass
class Association:
    """One storescu process and what it reported."""

    calling_aet: str
    series: SyntheticSeries
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    sent: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def wall(self) -> float:
        return self.ended - self.started

    def problems(self) -> list[str]:
        out = []
        if self.returncode != 0:
            out.append(f"exit status {self.returncode}")
        if self.sent != SLICES or self.acked != SLICES:
            out.append(f"{self.sent} files sent, {self.acked} acknowledged Success, expected {SLICES} of each")
        out += self.errors
        return [f"{self.calling_aet}: {p}" for p in out]


def _push_one(node: NodeProcess, assoc: Association) -> Association:
    assoc.started = time.monotonic()
    try:
        proc = storescu("127.0.0.1", node.port, node.ae_title, assoc.series.directory, calling_aet=assoc.calling_aet,
                        timeout=PUSH_TIMEOUT, as_is=False, check=False, extra_args=["-v"])
    finally:
        assoc.ended = time.monotonic()
    assoc.returncode = proc.returncode
    assoc.stderr = proc.stdout + proc.stderr
    lines = assoc.stderr.splitlines()
    assoc.sent = sum(1 for line in lines if line.startswith("I: Sending file: "))
    assoc.acked = sum(1 for line in lines if line.startswith("I: Received Store Response (Success)"))
    assoc.errors = [line for line in lines if line.startswith(("E: ", "F: "))][:10]
    return assoc


@dataclass
class Push:
    """Eight concurrent storescu processes, and what the node was doing meanwhile."""

    associations: list[Association]
    wall: float = 0.0
    receive_span: float = 0.0  # first to last received_at of these instances, in the node's index
    running_share: float = 0.0  # share of index samples during the push with a job 'running'
    worker_cpu_s: float = 0.0  # CPU time of the node's child processes (the worker) during the push
    server_cpu_s: float = 0.0

    @property
    def instances(self) -> int:
        return sum(a.acked for a in self.associations)

    @property
    def rate(self) -> float:
        return self.instances / self.wall if self.wall > 0 else 0.0

    def problems(self) -> list[str]:
        return [p for a in self.associations for p in a.problems()]


def push_concurrently(node: NodeProcess, series: list[SyntheticSeries]) -> Push:
    """Push each series in its own storescu process, all at once; sample the job table meanwhile."""
    assert node.proc is not None
    push = Push([Association(f"LOAD{i + 1}", s) for i, s in enumerate(series)])
    samples: list[bool] = []
    done = threading.Event()

    def sample_jobs() -> None:
        while not done.wait(0.2):
            rows = _db_rows(node.state_dir, "SELECT COUNT(*) AS n FROM jobs WHERE state='running'")
            samples.append(bool(rows and rows[0]["n"]))

    sampler = threading.Thread(target=sample_jobs, name="job-sampler", daemon=True)
    tick = os.sysconf("SC_CLK_TCK")
    own0, below0 = _tree_ticks(node.proc.pid)
    started = time.monotonic()
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=len(series)) as pool:
            list(pool.map(lambda a: _push_one(node, a), push.associations))
    finally:
        push.wall = time.monotonic() - started
        done.set()
        sampler.join(10)
    own1, below1 = _tree_ticks(node.proc.pid)
    push.server_cpu_s = (own1 - own0) / tick
    push.worker_cpu_s = (below1 - below0) / tick
    push.running_share = sum(samples) / len(samples) if samples else 0.0
    uids = [s.series_uid for s in series]
    span = _db_rows(node.state_dir, f"SELECT MIN(received_at) AS a, MAX(received_at) AS b FROM instances "
                                    f"WHERE series_uid IN ({','.join('?' * len(uids))})", tuple(uids))
    if span and span[0]["a"] is not None:
        push.receive_span = float(span[0]["b"]) - float(span[0]["a"])
    return push


def _describe(push: Push, label: str) -> str:
    per = " ".join(f"{a.calling_aet}={SLICES / a.wall:.0f}" for a in push.associations if a.wall > 0)
    walls = [a.wall for a in push.associations]
    return (f"{label}: {push.instances} instances in {push.wall:.1f} s = {push.rate:.1f} instances/s "
            f"(index received_at span {push.receive_span:.1f} s); association walls "
            f"{min(walls):.1f}-{max(walls):.1f} s; per association instances/s: {per}; "
            f"job running in {100 * push.running_share:.0f} % of samples; CPU during the push: "
            f"service {push.server_cpu_s:.1f} s, worker {push.worker_cpu_s:.1f} s")


# ---------------------------------------------------------------------------------------- checks
def check_index_and_spool(state_dir: Path, expected: dict[str, set[str]]) -> list[str]:
    """The index holds exactly ``expected`` (series UID -> SOP UIDs) and agrees with the spool."""
    problems: list[str] = []
    rows = _db_rows(state_dir, "SELECT sop_instance_uid, series_uid, path FROM instances")
    by_sop = {r["sop_instance_uid"]: r for r in rows}
    want = {sop: series for series, sops in expected.items() for sop in sops}
    missing = sorted(set(want) - set(by_sop))
    extra = sorted(set(by_sop) - set(want))
    if missing:
        problems.append(f"{len(missing)} acknowledged instance(s) not in the index, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} index row(s) for instances never pushed, e.g. {extra[:3]}")
    for sop, series in want.items():
        row = by_sop.get(sop)
        if row is not None and row["series_uid"] != series:
            problems.append(f"instance {sop} is indexed under series {row['series_uid']}, pushed in {series}")
    counts = {r["series_uid"]: r for r in _db_rows(state_dir, "SELECT series_uid, instance_count FROM series")}
    for series, sops in expected.items():
        got = counts.get(series)
        if got is None or got["instance_count"] != len(sops):
            problems.append(f"series {series}: instance_count {got['instance_count'] if got else '(no row)'}, "
                            f"expected {len(sops)}")
    spool = state_dir / "spool"
    files = {str(p) for p in (spool / "instances").rglob("*.dcm")}
    paths = {str(r["path"]) for r in rows}
    if files - paths:
        problems.append(f"{len(files - paths)} spool file(s) without an index row, e.g. {sorted(files - paths)[:3]}")
    if paths - files:
        problems.append(f"{len(paths - files)} index row(s) whose spool file is missing, "
                        f"e.g. {sorted(paths - files)[:3]}")
    wrong = []
    for row in rows:
        path = Path(row["path"])
        if not path.is_file():
            continue
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        if str(ds.SOPInstanceUID) != row["sop_instance_uid"]:
            wrong.append(f"{path} holds {ds.SOPInstanceUID}, its row names {row['sop_instance_uid']}")
    if wrong:
        problems.append(f"{len(wrong)} spool file(s) hold another instance than their row: {wrong[:3]}")
    parts = sorted(spool.rglob("*.part"))
    if parts:
        problems.append(f"{len(parts)} partial file(s) left in the spool: {parts[:3]}")
    return problems


def _referenced_series(path: Path) -> tuple[str, str]:
    """(SOP Class UID, the source SeriesInstanceUID it references) of a SEG or RTSTRUCT."""
    ds = dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.SOPClassUID)
    if sop_class == SEG_CLASS:
        return sop_class, str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if sop_class == RTSTRUCT_CLASS:
        study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        return sop_class, str(study.RTReferencedSeriesSequence[0].SeriesInstanceUID)
    return sop_class, ""


def _all_delivered(state_dir: Path, series_uids: set[str]) -> bool | str:
    """True once every series has a done job whose results are all sent; raise on a failure."""
    jobs = _db_rows(state_dir, "SELECT id, series_uid, state, error FROM jobs")
    failed = [f"job {j['id']} ({j['series_uid']}) {j['state']}: {j['error']}" for j in jobs
              if j["state"] in ("failed", "declined")]
    outbox = _db_rows(state_dir, "SELECT job_id, state, last_status FROM outbox")
    dead = [f"job {o['job_id']}: {o['last_status']}" for o in outbox if o["state"] == "dead"]
    if failed or dead:
        raise AssertionError(f"failed jobs {failed}; dead letters {dead}")
    done = {j["series_uid"] for j in jobs if j["state"] == "done"}
    sent_jobs = {o["job_id"] for o in outbox if o["state"] == "sent"}
    pending = any(o["state"] != "sent" for o in outbox)
    done_and_sent = {j["series_uid"] for j in jobs if j["state"] == "done" and j["id"] in sent_jobs}
    return series_uids <= done and series_uids <= done_and_sent and not pending


# ------------------------------------------------------------------------------------------ test
def test_eight_concurrent_associations_while_segmenting(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # The trigger covers a larger field of view (512 mm) and length (900 mm) than the load series, so
    # that its job (about 25 s here) outlasts the push.
    trigger = write_ct_series(tmp_path / "trigger", slices=SLICES, rows=TRIGGER_MATRIX, columns=TRIGGER_MATRIX,
                              pixel_spacing=(1.0, 1.0), slice_thickness=3.0, origin=(-256.0, -256.0, -100.0),
                              seed=SEED, patient_id="LOAD000")
    spacing = 409.6 / LOAD_MATRIX
    load = [write_ct_series(tmp_path / f"load{i + 1}", slices=SLICES, rows=LOAD_MATRIX, columns=LOAD_MATRIX,
                            pixel_spacing=(spacing, spacing), slice_thickness=LOAD_THICKNESS,
                            seed=SEED + i + 1, patient_id=f"LOAD{i + 1:03d}")
            for i in range(ASSOCIATIONS)]
    assert len({s.series_uid for s in [trigger, *load]}) == ASSOCIATIONS + 1
    print(f"\ngenerated 1 trigger series ({SLICES} × {TRIGGER_MATRIX}²) and {ASSOCIATIONS} load series "
          f"({SLICES} × {LOAD_MATRIX}², {LOAD_THICKNESS} mm) in {time.monotonic() - t0:.1f} s")

    # 1. Reference: the same eight pushes into an idle node that never segments.
    with NodeProcess(tmp_path / "reference", quiet_period_s=3600, release_settle_s=3600,
                     extra_toml=ONE_BUNDLE) as ref:
        assert ref.proc is not None
        _wait_cpu_idle(ref.proc.pid)
        idle = push_concurrently(ref, load)
        ref_count = len(_db_rows(ref.state_dir, "SELECT sop_instance_uid FROM instances"))
        ref_jobs = len(_db_rows(ref.state_dir, "SELECT id FROM jobs"))
    assert not idle.problems(), "\n".join(idle.problems())
    assert ref_count == ASSOCIATIONS * SLICES and ref_jobs == 0, (ref_count, ref_jobs)
    print(_describe(idle, "idle node (no inference)"))

    # 2. The trigger series starts a segmentation; the eight pushes run while its job does.
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, NodeProcess(
        tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], quiet_period_s=5.0,
        release_settle_s=1.0, extra_toml="max_attempts = 50\nbackoff_max_s = 5.0\n" + ONE_BUNDLE,
    ) as node:
        assert node.proc is not None
        _wait_cpu_idle(node.proc.pid)
        storescu("127.0.0.1", node.port, node.ae_title, trigger.directory, timeout=PUSH_TIMEOUT, as_is=False)
        claim = _wait("trigger job claimed", lambda: _db_rows(
            node.state_dir, "SELECT id, state FROM jobs WHERE series_uid=? AND state!='queued'",
            (trigger.series_uid,)), 120.0, 0.05)
        state_at_start = claim[0]["state"]
        busy = push_concurrently(node, load)
        trigger_after = _db_rows(node.state_dir, "SELECT state FROM jobs WHERE series_uid=?", (trigger.series_uid,))
        print(_describe(busy, "during inference"))
        print(f"trigger job at the start of the push: {state_at_start}; at its end: "
              f"{trigger_after[0]['state'] if trigger_after else '?'}; receive rate during inference / idle: "
              f"{busy.rate / idle.rate if idle.rate else float('nan'):.2f}")
        push_problems = busy.problems()
        expected = {s.series_uid: set(s.sop_instance_uids) for s in [trigger, *load]}
        index_problems = check_index_and_spool(node.state_dir, expected)
        t1 = time.monotonic()
        try:
            _wait("every series segmented and its results acknowledged by storescp",
                  lambda: _all_delivered(node.state_dir, set(expected)), RESULTS_TIMEOUT, 0.5)
            pacs.wait_for_files(2 * len(expected), timeout=60)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\nnode log tail:\n{node.log_text()[-4000:]}") from None
        print(f"all {len(expected)} series delivered {time.monotonic() - t1:.1f} s after the push ended")
        jobs = _db_rows(node.state_dir, "SELECT series_uid, timings FROM jobs ORDER BY id")
    for job in jobs:
        print(f"  job {job['series_uid'][-12:]}: {job['timings']}")

    assert state_at_start == "running", f"the trigger job was {state_at_start!r} when the push began"
    assert not push_problems, "\n".join(push_problems) + f"\nnode log tail:\n{node.log_text()[-4000:]}"
    assert busy.rate > 0 and idle.rate > 0, (busy.rate, idle.rate)
    assert not index_problems, "\n".join(index_problems)

    received: dict[str, set[str]] = {}
    for f in pacs.files():
        sop_class, series_uid = _referenced_series(f)
        received.setdefault(series_uid, set()).add(sop_class)
    for series_uid in expected:
        assert received.get(series_uid) == {SEG_CLASS, RTSTRUCT_CLASS}, (
            f"series {series_uid}: storescp holds {received.get(series_uid)}, expected a SEG and an RTSTRUCT")
    assert set(received) == set(expected), f"results for unknown series {set(received) - set(expected)}"
    lines = re.findall(r"association accepted from LOAD\d", node.log_text())
    print(f"associations accepted from LOAD1..8: {len(lines)}; total test time {time.monotonic() - t0:.0f} s")
