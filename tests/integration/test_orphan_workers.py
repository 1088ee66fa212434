"""kill -9 of the real service: its workers must not outlive it, and its crashes must not use up a job's attempts.

* :func:`test_workers_die_with_a_killed_service_and_no_job_runs_twice` kills only the main PID (``kill -9 PID``,
  not the process group, as a supervisor other than systemd, a container runtime or ``make run`` under a
  terminal's kill may do) while its worker runs a slow job, restarts the node on the same state directory and
  pushes a second series. No worker of the killed service may survive 5 s; the job in flight at the kill runs
  to completion exactly once (one "done" line in all logs, storescp receives every result UID once), and the
  second series' job is claimed by the restarted service's worker.
* :func:`test_service_crashes_do_not_use_up_a_jobs_attempts` kills the whole service (process group) three
  times while the same job runs; after the fourth start the job must end done, not "failed: gave up after 3
  attempts": only attempts that the job itself ended (a crash of its worker) count against the limit.

Real processes throughout: ``python -m node serve``, DCMTK's storescu and storescp, real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.index_rows import read_index
from tests.harness.node_process import NodeProcess
from tests.harness.processes import wait_until as _wait
from tests.harness.proctable import descendants
from tests.harness.synthetic_ct import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: How long a worker of a killed service may live on (the issue's bound).
ORPHAN_GRACE_S = 5.0
ONE_BUNDLE = '[engines]\nbundles = ["body-threshold"]\n'


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)




def _start(node: NodeProcess, tag: str) -> None:
    """Each start logs to its own file (NodeProcess waits for "ready:" in the log it writes)."""
    node.log_path = node.workdir / f"node-{tag}.log"
    node.start()


def _jobs(node: NodeProcess) -> list[sqlite3.Row]:
    return read_index(node.state_dir, "SELECT * FROM jobs ORDER BY id")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever inherited it, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _logs(node: NodeProcess) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(node.workdir.glob("node-*.log")))


def test_workers_die_with_a_killed_service_and_no_job_runs_twice(tmp_path: Path) -> None:
    slow = write_ct_series(tmp_path / "slow", slices=120, rows=512, columns=512, pixel_spacing=(1.6, 1.6), seed=21)
    quick = write_ct_series(tmp_path / "quick", slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6), seed=22)
    orphans: list[int] = []
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], quiet_period_s=1.0,
                           release_settle_s=0.3, extra_toml="backoff_max_s = 2.0\n" + ONE_BUNDLE)
        try:
            _start(node, "first")
            assert node.proc is not None
            old_pid = node.proc.pid
            storescu("127.0.0.1", node.port, node.ae_title, slow.directory, timeout=120)
            _wait("the slow job running", lambda: any(j["state"] == "running" for j in _jobs(node)), 60, 0.01)
            workers = descendants(old_pid)
            assert workers, "the service has no worker process"
            os.kill(old_pid, signal.SIGKILL)  # the main PID only, not its process group
            node.proc.wait(10)
            killed_at = time.monotonic()
            _start(node, "restart")  # at once, as a supervisor would: the slow job is still in flight
            new_pid = node.proc.pid
            while time.monotonic() - killed_at < ORPHAN_GRACE_S and any(_alive(p) for p in workers):
                time.sleep(0.05)
            orphans = [p for p in workers if _alive(p)]
            storescu("127.0.0.1", node.port, node.ae_title, quick.directory, timeout=120)
            _wait("both jobs ended", lambda: len(js := _jobs(node)) == 2
                  and all(j["state"] not in ("queued", "running") for j in js), 120, 0.2)
            _wait("results delivered", lambda: len(rows := read_index(node.state_dir, "SELECT state FROM outbox")) == 4
                  and all(r["state"] == "sent" for r in rows), 60, 0.2)
            pacs.wait_for_files(4, timeout=60)
            time.sleep(2.0)  # a second run of the first job, if any, would deliver its copies now
            jobs = _jobs(node)
            received = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()]
        finally:
            node.stop()
            for pid in orphans:  # left by a node that lets its workers outlive it: end them, not the next test
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    logs = _logs(node)
    problems = []
    if orphans:
        problems.append(f"worker process(es) {orphans} of the killed service (pid {old_pid}) were still alive "
                        f"{ORPHAN_GRACE_S:g} s after the kill")
    for job in jobs:
        done_lines = logs.count(f"job {job['id']} done:")
        if job["state"] != "done" or done_lines != 1:
            problems.append(f"job {job['id']} ended {job['state']} ({job['error']!r}) with {done_lines} 'done' log "
                            "line(s); expected done, once")
    if len(received) != len(set(received)) or len(set(received)) != 4:
        problems.append(f"storescp received {len(received)} file(s) with {len(set(received))} distinct UIDs; "
                        "expected 4 distinct, each once")
    second = jobs[1]["worker"] if len(jobs) > 1 else ""
    if not second.endswith(f"-{new_pid}"):
        problems.append(f"the second series' job was claimed by worker {second!r}, not by a worker of the restarted "
                        f"service (pid {new_pid})")
    assert not problems, "\n".join(problems) + f"\nlogs:\n{logs[-6000:]}"


def test_service_crashes_do_not_use_up_a_jobs_attempts(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=60, rows=512, columns=512, pixel_spacing=(1.6, 1.6), seed=23)
    node = NodeProcess(tmp_path / "node", quiet_period_s=1.0, release_settle_s=0.3, extra_toml=ONE_BUNDLE)
    states_at_kill: list[str] = []
    try:
        _start(node, "first")
        storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
        for crash in range(1, 4):
            _wait(f"the job running before crash {crash}",
                  lambda: any(j["state"] == "running" for j in _jobs(node)), 60, 0.005)
            node.kill9()  # the whole service: main process and workers, as a power cut would
            states_at_kill.append(_jobs(node)[0]["state"])
            _start(node, f"restart{crash}")
        job = _wait("the job ended", lambda: (js := _jobs(node)) and js[0]["state"] not in ("queued", "running")
                    and js[0], 120, 0.2)
    finally:
        node.stop()
    assert states_at_kill == ["running"] * 3, f"a kill missed the running job: states at the kills {states_at_kill}"
    assert job["state"] == "done", (f"after 3 crashes of the service the job ended {job['state']} ({job['error']!r}); "
                                    f"a crash of the service is not the job's fault\n{_logs(node)[-4000:]}")
    assert job["attempts"] == 4
