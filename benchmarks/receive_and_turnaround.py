"""Benchmark: C-STORE receive throughput and end-to-end turnaround of the node, on this machine.

Run from the repository root::

    .venv/bin/python benchmarks/receive_and_turnaround.py [--slices 300] [--repeats 3] [--scrape] [--json OUT]
        [--backend onnxruntime|openvino-fp32|openvino-bf16|openvino|auto]

What it measures (everything on 127.0.0.1, DCMTK processes with ``TCP_NODELAY=1``):

1. **Receive throughput.** One synthetic CT series (``--slices`` slices of 512x512, written once
   into a temporary folder) is pushed by ``/usr/bin/storescu`` in one association
   (a) into ``/usr/bin/storescp`` (files written to a temporary folder) and
   (b) into the node (``python -m node serve``, fresh state folder per repeat, a quiet period of
   600 s so that no segmentation competes with the push, no destination).
   With ``--scrape`` (c) a third push goes into a node serving ``[metrics]`` while a real Prometheus
   (tests/harness/prometheus.py) scrapes it every second: a scrape must not slow receiving.
   Images/s = slices / wall time of the storescu process. After every push into the node the
   index must hold every instance (``SELECT COUNT(*) FROM instances``). Note that the node makes
   every instance durable before it answers (fsync of the file and its folder, then the index row
   committed: SQLite WAL, ``synchronous=NORMAL``), storescp does not fsync at all.
2. **Turnaround.** The node with ``quiet_period_s = 10``, ``release_settle_s = 1`` and a DCMTK
   storescp as destination receives the series; the time from the last instance's
   ``received_at`` to the moment both SEG and RTSTRUCT are acknowledged by the destination
   (``max(outbox.sent_at)`` once every outbox row is ``sent``) is reported, split into settle,
   job and send, together with the job's stage timings (``jobs.timings``) and the node's peak RSS
   (``VmHWM`` from ``/proc/<pid>/status`` of the service process and each of its descendants,
   sampled every 100 ms, summed; the peaks of the node's start, where a fresh state directory has it
   compile its OpenVINO models and check BF16 once, are reported apart and then reset). With
   ``--backend`` the node runs that engine variant (benchmarks/cpu_variants.py); its engines are first
   loaded once into the node's state directory by a separate process, so the node imports OpenVINO's
   compiled models (and a BF16 model's agreement verdict) from the cache as a restarted node does, and
   that first load's time and peak are reported.
   The default engines are loaded the same way (``--cold-start``: by the node at its start, as on a
   first install).

Every subprocess runs in its own process group and is killed on exit (normal, exception,
SIGINT/SIGTERM/SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cpu_variants import VARIANTS as CPU_VARIANTS  # noqa: E402
from benchmarks.cpu_variants import engines_toml  # noqa: E402
from tests.harness.dcmtk import LOOPBACK, STORESCP, STORESCU, free_port  # noqa: E402
from tests.harness.proctable import proc_table  # noqa: E402
from tests.harness.synthetic_ct import write_ct_series  # noqa: E402

NODE_AET = "SEGNODE"
SCU_AET = "BENCHSCU"
DEST_AET = "BENCHDEST"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------------------------ processes
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _spawn(cmd: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group, output to ``log_path``; remembered for cleanup."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], *, grace_s: float = 15.0) -> None:
    """SIGTERM the leader, SIGKILL its whole process group after ``grace_s``; reap the leader.

    Like systemd's ``KillMode=mixed``: only the leader gets SIGTERM. (SIGTERM to the whole group
    can deadlock the node's worker: its SIGTERM handler sets the multiprocessing Event it is
    waiting on, and the service then blocks setting that Event.)
    """
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and proc.poll() is None:
        for kill, wait_s in ((lambda: os.kill(proc.pid, signal.SIGTERM), grace_s),
                             (lambda: os.killpg(pgid, signal.SIGKILL), 5.0)):
            try:
                kill()
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    if pgid is not None:
        # stragglers of the group (workers, resource tracker) whose leader already exited
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def _kill_all() -> None:
    for proc in list(_CHILDREN):
        _stop(proc, grace_s=5.0)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _listening(port: int) -> bool:
    """Whether some socket LISTENs on TCP ``port`` (from /proc/net/tcp*, no connection made).

    A connect-and-close probe would leave the node an association thread that waits out its
    ACSE timeout (30 s) during the measurement.
    """
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}):\n{_tail(log_path)}")
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout_s} s:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------ /proc
_proc_table = proc_table  # tests/harness/proctable.py


def _tree(root: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """``root`` and all its descendants."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table or pid == root:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _status_kib(pid: int, *keys: str) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in keys:
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "multiprocessing.spawn" in text:
        return "mp spawn child (worker)"
    if "multiprocessing.resource_tracker" in text or "resource_tracker" in text:
        return "mp resource tracker"
    if "node" in text and "serve" in text:
        return "service (python -m node serve)"
    return text[:60]


def _wait_idle(root: int, *, timeout_s: float = 60.0, window_s: float = 0.5, max_ticks: int = 3) -> float:
    """Wait until the process tree of ``root`` uses < ``max_ticks`` CPU ticks per ``window_s``.

    The node's worker is a spawned interpreter that imports ONNX Runtime and friends after the
    port is already open; on a small machine that would compete with the first push.
    Returns how long the wait took.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    previous: int | None = None
    while time.monotonic() < deadline:
        table = _proc_table()
        ticks = sum(table[p][1] for p in _tree(root, table) if p in table)
        if previous is not None and ticks - previous < max_ticks:
            break
        previous = ticks
        time.sleep(window_s)
    return time.monotonic() - started


def reset_peaks(root: int) -> dict[str, float]:
    """Record each process's peak RSS so far (VmHWM, MiB, by name and pid) under ``root``, then reset it
    (``/proc/PID/clear_refs`` 5), so that later peaks are the turnaround's and not the start's (where a fresh
    state directory has the node compile its OpenVINO models and check BF16 against ONNX Runtime, once per
    model and CPU)."""
    before: dict[str, float] = {}
    for pid in _tree(root):
        hwm = _status_kib(pid, "VmHWM").get("VmHWM")
        if hwm is None:
            continue
        before[f"{_cmdline(pid)} [{pid}]"] = round(hwm / 1024, 1)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    return before


class RssSampler:
    """Samples VmHWM / VmRSS of a process tree every ``interval_s`` in a thread."""

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        self.root = root
        self.interval_s = interval_s
        self.hwm_kib: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.max_rss_sum_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss_sum = 0
        for pid in _tree(self.root):
            values = _status_kib(pid, "VmHWM", "VmRSS")
            if not values:
                continue
            if pid not in self.names:
                self.names[pid] = _cmdline(pid)
            self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), values.get("VmHWM", 0))
            rss_sum += values.get("VmRSS", 0)
        self.max_rss_sum_kib = max(self.max_rss_sum_kib, rss_sum)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.sample()


# ------------------------------------------------------------------------------------ peers
class Node:
    """``python -m node serve`` on a loopback port with its own state folder and TOML config."""

    def __init__(self, workdir: Path, *, quiet_period_s: float, release_settle_s: float,
                 destination: str | None = None, metrics_port: int = 0, engines: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.config = workdir / "node.toml"
        self.log = workdir / "node.log"
        self.metrics_port = metrics_port
        self.config.write_text(
            "[node]\nworkers = 1\n\n"
            f"[assemble]\nquiet_period_s = {quiet_period_s!r}\nrelease_settle_s = {release_settle_s!r}\n"
            + (f"[metrics]\nport = {metrics_port}\nbind_address = \"{LOOPBACK}\"\n" if metrics_port else "")
            + (f"[engines]\n{engines}" if engines else "")
        )
        self.destination = destination
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def index_path(self) -> Path:
        return self.state_dir / "index.sqlite3"

    def start(self, timeout_s: float = 60.0) -> Node:
        for attempt in range(3):  # free_port() can race with another process
            self.port = free_port()
            cmd = [sys.executable, "-m", "node", "serve", "-c", str(self.config), "--state-dir", str(self.state_dir),
                   "--port", str(self.port), "--bind", LOOPBACK, "--ae-title", NODE_AET]
            if self.destination:
                cmd += ["--destination", self.destination]
            self.proc = _spawn(cmd, log_path=self.log, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                _wait_port(self.proc, self.port, timeout_s, self.log)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        assert self.proc is not None
        self.idle_wait_s = _wait_idle(self.proc.pid)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, grace_s=40.0)  # workers get 30 s to finish a job
            self.proc = None

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = sqlite3.connect(self.index_path, timeout=10.0)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class DcmtkStoreSCP:
    """``/usr/bin/storescp`` writing into ``directory`` (same flags as tests/harness/dcmtk.StoreSCP)."""

    def __init__(self, directory: Path, log: Path, ae_title: str = "STORESCP") -> None:
        self.directory = directory
        self.log = log
        self.ae_title = ae_title
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DcmtkStoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            self.proc = _spawn([str(STORESCP), "-aet", self.ae_title, "-od", str(self.directory), "+xa", "+uf", "-dhl",
                                str(self.port)], log_path=self.log, env=_dcmtk_env())
            try:
                _wait_port(self.proc, self.port, 10.0, self.log)
                break
            except RuntimeError:
                self.__exit__()
                if attempt == 2:
                    raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            _stop(self.proc, grace_s=5.0)
            self.proc = None

    def count(self) -> int:
        return sum(1 for p in self.directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def push(files: Sequence[Path], port: int, called_aet: str, *, timeout_s: float = 300.0) -> float:
    """storescu all ``files`` in one association; return the process's wall time in seconds."""
    t = str(int(timeout_s))
    cmd = [str(STORESCU), "-aet", SCU_AET, "-aec", called_aet, "-to", t, "-ta", t, "-ts", t,
           LOOPBACK, str(port), *map(str, files)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_dcmtk_env(), start_new_session=True)
    _CHILDREN.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        wall = time.perf_counter() - started
        if proc.poll() is None:
            _stop(proc, grace_s=1.0)
        elif proc in _CHILDREN:
            _CHILDREN.remove(proc)
    text = (out + err).decode(errors="replace")
    if proc.returncode != 0 or any(line.startswith("E:") for line in text.splitlines()):
        raise RuntimeError(f"storescu failed (exit {proc.returncode}):\n{text[-3000:]}")
    return wall


# ------------------------------------------------------------------------------------ stages
def _push_into_node(files: list[Path], workdir: Path, scraped: bool) -> tuple[float, float]:
    """One push into a fresh node; with ``scraped`` the node serves [metrics] and a real Prometheus scrapes
    it every second during the push. Returns (storescu wall s, node start idle wait s)."""
    n = len(files)
    node = Node(workdir, quiet_period_s=600.0, release_settle_s=600.0, metrics_port=free_port() if scraped else 0)
    with contextlib.ExitStack() as stack:
        node.start()
        stack.callback(node.stop)
        scrapes = 0.0
        if scraped:
            from tests.harness.prometheus import Prometheus

            prom = stack.enter_context(Prometheus([f"{LOOPBACK}:{node.metrics_port}"], scrape_interval=1.0))
            prom.wait_for_targets(timeout=30)
        wall = push(files, node.port, NODE_AET)
        if scraped:
            window = max(2, int(wall) + 2)
            result = prom.query(f'count_over_time(up{{instance="{LOOPBACK}:{node.metrics_port}"}}[{window}s])')
            scrapes = result[0][1] if result else 0.0
            if scrapes < 1:
                raise RuntimeError(f"Prometheus did not scrape the node during the push:\n{prom.describe_targets()}")
        count = int(node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
        jobs = int(node.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"])
    if count != n:
        raise RuntimeError(f"the node's index holds {count} of {n} instances; log:\n{_tail(node.log)}")
    if jobs:
        raise RuntimeError("a job was created during the receive benchmark; the quiet period did not hold")
    return wall, node.idle_wait_s


def bench_receive(files: list[Path], work: Path, repeats: int, say: Callable[[str], None],
                  scrape: bool = False) -> dict[str, Any]:
    n = len(files)
    targets = ["storescp", "node"] + (["node_scraped"] if scrape else [])
    rates: dict[str, list[float]] = {t: [] for t in targets}
    walls: dict[str, list[float]] = {t: [] for t in targets}
    idle_waits: list[float] = []
    for r in range(repeats):
        scp_dir = work / f"recv-storescp-{r}"
        with DcmtkStoreSCP(scp_dir / "in", scp_dir / "storescp.log") as scp:
            wall = push(files, scp.port, scp.ae_title)
            received = scp.count()
        if received != n:
            raise RuntimeError(f"storescp stored {received} of {n} files (repeat {r + 1})")
        rates["storescp"].append(n / wall)
        walls["storescp"].append(wall)
        say(f"  repeat {r + 1}/{repeats}: storescp {n / wall:7.1f} images/s ({wall:.2f} s)")
        for target in targets[1:]:
            wall, idle = _push_into_node(files, work / f"recv-{target}-{r}", scraped=target == "node_scraped")
            idle_waits.append(idle)
            rates[target].append(n / wall)
            walls[target].append(wall)
            say(f"  repeat {r + 1}/{repeats}: {target:12s} {n / wall:7.1f} images/s ({wall:.2f} s), "
                f"{n} instances indexed")
    return {
        target: {
            "images_per_s": [round(v, 1) for v in rates[target]],
            "wall_s": [round(v, 3) for v in walls[target]],
            "median_images_per_s": round(statistics.median(rates[target]), 1),
            "best_images_per_s": round(max(rates[target]), 1),
            "median_wall_s": round(statistics.median(walls[target]), 3),
        }
        for target in rates
    } | {"node_idle_wait_s": [round(v, 2) for v in idle_waits]}


_PREPARE = """
import dataclasses, json, resource, sys, time
from pathlib import Path
from node.config import load_config
from node.infer.backends.loader import EngineLoader
from node.infer.manifest import discover_bundles
cfg = dataclasses.replace(load_config(Path(sys.argv[1])), state_dir=Path(sys.argv[2]))
started = time.perf_counter()
loader = EngineLoader.from_config(cfg)
loaded = {b.id: loader.get(b).description for b in discover_bundles(cfg.bundles_dir, cfg.bundles)}
print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "engines": loaded,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def prepare_engines(node: Node) -> dict[str, Any]:
    """Load the node's engines once into its state directory (compiling OpenVINO models and checking BF16)."""
    proc = subprocess.run([sys.executable, "-c", _PREPARE, str(node.config), str(node.state_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"loading the engines failed:\n{proc.stdout}{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_turnaround(files: list[Path], work: Path, say: Callable[[str], None],
                     timeout_s: float = 240.0, engines: str = "", cold_start: bool = False) -> dict[str, Any]:
    n = len(files)
    base = work / "turnaround"
    with DcmtkStoreSCP(base / "dest", base / "dest.log", ae_title=DEST_AET) as dest:
        node = Node(base / "node", quiet_period_s=10.0, release_settle_s=1.0,
                    destination=f"{DEST_AET}@{LOOPBACK}:{dest.port}", engines=engines)
        # As a restarted node: the engines are compiled (and BF16 checked) once, before, by another process, and
        # the node imports them; --cold-start has the node do it at its own start (a first install).
        prepared = None if cold_start else prepare_engines(node)
        if prepared is not None:
            say(f"  engines loaded once in {prepared['seconds']:.1f} s: {prepared['engines']}")
        try:
            node.start()
            assert node.proc is not None
            at_start = reset_peaks(node.proc.pid)
            with RssSampler(node.proc.pid) as rss:
                push_wall = push(files, node.port, NODE_AET)
                say(f"  pushed {n} instances in {push_wall:.2f} s; waiting for SEG + RTSTRUCT at the destination")
                deadline = time.monotonic() + timeout_s
                while True:
                    jobs = node.query("SELECT * FROM jobs")
                    failed = [j for j in jobs if j["state"] == "failed"]
                    if failed:
                        raise RuntimeError(f"job failed: {failed[0]['error']}\n{_tail(node.log)}")
                    rows = node.query("SELECT state, sop_class_uid, sent_at, last_status FROM outbox")
                    if any(r["state"] == "dead" for r in rows):
                        raise RuntimeError(f"outbox dead letter: {[dict(r) for r in rows]}\n{_tail(node.log)}")
                    ended = jobs and all(j["state"] in ("done", "declined") for j in jobs)
                    done = sum(j["state"] == "done" for j in jobs)
                    # every bundle's job ended, and each done job's SEG and RTSTRUCT acknowledged
                    if ended and done and len(rows) >= 2 * done and all(r["state"] == "sent" for r in rows):
                        break
                    if node.proc.poll() is not None:
                        raise RuntimeError(f"the node exited ({node.proc.returncode}):\n{_tail(node.log)}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no acknowledged results after {timeout_s} s: jobs "
                                           f"{[dict(j) for j in jobs]}, outbox {[dict(r) for r in rows]}\n"
                                           f"{_tail(node.log)}")
                    time.sleep(0.1)
            count = int(node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
            first_rx, last_rx = node.query("SELECT MIN(received_at) AS a, MAX(received_at) AS b FROM instances")[0]
            job = node.query("SELECT * FROM jobs ORDER BY id")
            last_sent = float(node.query("SELECT MAX(sent_at) AS t FROM outbox")[0]["t"])
        finally:
            node.stop()
        dest_files = dest.count()
    if count != n:
        raise RuntimeError(f"the node's index holds {count} of {n} instances")
    if not job:
        raise RuntimeError("no job was created")
    first_created = min(j["created"] for j in job)
    last_updated = max(j["updated"] for j in job)
    per_job = [{"bundle": j["bundle"], "state": j["state"], "s": round(j["updated"] - j["created"], 3),
                "timings": json.loads(j["timings"] or "{}"), "note": j["error"]} for j in job]
    per_process = {
        f"{rss.names.get(pid, '?')} [{pid}]": round(kib / 1024, 1) for pid, kib in sorted(rss.hwm_kib.items())
    }
    return {
        "slices": n,
        "quiet_period_s": 10.0,
        "release_settle_s": 1.0,
        "storescu_wall_s": round(push_wall, 3),
        "storescu_images_per_s": round(n / push_wall, 1),
        "receive_span_s": round(last_rx - first_rx, 3),
        "turnaround_s": round(last_sent - last_rx, 3),
        "settle_s": round(first_created - last_rx, 3),
        "jobs_s": round(last_updated - first_created, 3),
        "send_s": round(last_sent - last_updated, 3),
        "jobs": per_job,
        "destination_files": dest_files,
        "peak_rss_sum_vmhwm_mib": round(sum(rss.hwm_kib.values()) / 1024, 1),
        "peak_rss_sampled_sum_mib": round(rss.max_rss_sum_kib / 1024, 1),
        "peak_rss_per_process_mib": per_process,
        "peak_rss_at_start_mib": at_start,
        "engines_first_load": prepared,
    }


# ------------------------------------------------------------------------------------ report
def _fmt_table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render(result: dict[str, Any]) -> str:
    out: list[str] = [f"$ {result['command']}"]
    env = result["environment"]
    out.append(f"host: {env['cpus']} CPUs, {env['mem_gib']} GiB RAM, Linux {env['kernel']}, Python {env['python']}, "
               f"{env['dcmtk']}")
    s = result["series"]
    out.append(f"series: {s['slices']} slices {s['rows']}x{s['columns']} CT, {s['mib']} MiB, "
               f"generated in {s['generate_s']} s")
    out.append("")
    if result.get("receive"):
        out += _render_receive(result["receive"], s["slices"])
    if result.get("turnaround"):
        out += _render_turnaround(result)
    out.append(f"total benchmark time: {result['total_s']:.0f} s")
    return "\n".join(out)


def _render_receive(rcv: dict[str, Any], slices: int) -> list[str]:
    out: list[str] = []
    reps = len(rcv["node"]["images_per_s"])
    out.append(f"1. Receive throughput: storescu -> SCP, one association, {slices} instances, "
               f"{reps} repeat(s) each (images/s = slices / storescu wall time)")
    header = ["target", "median img/s", "best img/s", "median wall s", "runs img/s"]
    rows = []
    for key, label in (("storescp", "DCMTK storescp (no fsync)"), ("node", "node (fsync file+dir, WAL)"),
                       ("node_scraped", "node, Prometheus scraping every 1 s")):
        if key not in rcv:
            continue
        r = rcv[key]
        rows.append([label, f"{r['median_images_per_s']:.1f}", f"{r['best_images_per_s']:.1f}",
                     f"{r['median_wall_s']:.2f}", " ".join(f"{v:.1f}" for v in r["images_per_s"])])
    out += _fmt_table(rows, header)
    ratio = rcv["node"]["median_images_per_s"] / rcv["storescp"]["median_images_per_s"]
    out.append(f"node / storescp (median): {ratio:.2f}; every node push verified: "
               f"{slices} rows in instances, no job created")
    if "node_scraped" in rcv:
        scraped = rcv["node_scraped"]["median_images_per_s"] / rcv["node"]["median_images_per_s"]
        out.append(f"node scraped / node unscraped (median): {scraped:.3f} (goal: within 5 %)")
    out.append("")
    return out


def _render_turnaround(result: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = result["turnaround"]
    out.append(f"2. Turnaround: quiet_period_s = {t['quiet_period_s']:g}, release_settle_s = "
               f"{t['release_settle_s']:g}, destination = DCMTK storescp")
    rows = [
        ["storescu push wall", f"{t['storescu_wall_s']:.2f} s", f"({t['storescu_images_per_s']:.1f} images/s)"],
        ["last received_at -> every SEG+RTSTRUCT acked", f"{t['turnaround_s']:.2f} s", ""],
        ["  settle (last received -> job queued)", f"{t['settle_s']:.2f} s", ""],
        ["  jobs (first queued -> last ended; one worker, the series' jobs on one volume)", f"{t['jobs_s']:.2f} s",
         ""],
    ]
    for j in t["jobs"]:
        rows.append([f"    {j['bundle']}: {j['state']}", f"{j['s']:.2f} s", j["note"][:60]])
        for stage, secs in j["timings"].items():
            rows.append([f"      {stage}", f"{secs:.2f} s", ""])
    rows.append(["  send (last job ended -> last ack)", f"{t['send_s']:.2f} s", ""])
    rows.append(["files at destination", str(t["destination_files"]), ""])
    if t.get("peak_rss_at_start_mib"):
        start = t["peak_rss_at_start_mib"]
        rows.append(["peak RSS while starting (engines loaded), sum of VmHWM", f"{sum(start.values()):.0f} MiB",
                     "(then reset)"])
        for name, mib in start.items():
            rows.append([f"  {name}", f"{mib:.0f} MiB", ""])
    rows.append(["peak RSS from the push on, sum of VmHWM", f"{t['peak_rss_sum_vmhwm_mib']:.0f} MiB", ""])
    for name, mib in t["peak_rss_per_process_mib"].items():
        rows.append([f"  {name}", f"{mib:.0f} MiB", ""])
    rows.append(["peak of sampled sum of VmRSS", f"{t['peak_rss_sampled_sum_mib']:.0f} MiB", "(100 ms samples)"])
    if t.get("engines_first_load"):
        first = t["engines_first_load"]
        rows.append([f"engines ({result.get('backend', 'auto')}): first load, before the node started",
                     f"{first['seconds']:.2f} s", f"peak {first['peak_rss_mib']:.0f} MiB"])
        for bundle_id, description in first["engines"].items():
            rows.append([f"  {bundle_id}", "", description[:90]])
    out += _fmt_table(rows, ["metric", "value", ""])
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic CT (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="pushes per receive target (default 3)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--scrape", action="store_true",
                        help="also push into a node whose metrics a real Prometheus scrapes every second")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, state) for a look")
    parser.add_argument("--only", choices=("receive", "turnaround"), default=None,
                        help="run one of the two parts (default: both)")
    parser.add_argument("--cold-start", action="store_true",
                        help="the turnaround node compiles its engines at its own start (a first install) instead of "
                             "importing them as a restarted node does; its start's peaks are reported apart either way")
    parser.add_argument("--backend", choices=list(CPU_VARIANTS), default=None,
                        help="the turnaround node's engine variant (benchmarks/cpu_variants.py; default: the node's "
                             "own choice, engines loaded at its start)")
    args = parser.parse_args(argv)
    if args.slices < 5 or args.repeats < 1:
        parser.error("--slices must be >= 5 (the bundle's minimum) and --repeats >= 1")
    for tool in (STORESCP, STORESCU):
        if not tool.is_file():
            parser.error(f"{tool} is missing (apt-get install dcmtk)")
    if args.scrape:
        from tests.harness.prometheus import prometheus_missing_reason

        if reason := prometheus_missing_reason():
            parser.error(f"--scrape needs a Prometheus server: {reason}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, Path.cwd()),
                                                 os.path.relpath(__file__, Path.cwd()),
                                                 *(sys.argv[1:] if argv is None else argv)])
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        say(f"working in {work}")
        t0 = time.perf_counter()
        series = write_ct_series(work / "series", slices=args.slices)
        gen_s = time.perf_counter() - t0
        files = sorted(series.files)
        size = sum(f.stat().st_size for f in files)
        say(f"generated {len(files)} slices ({size / 2**20:.1f} MiB) in {gen_s:.1f} s")
        receive: dict[str, Any] | None = None
        turnaround: dict[str, Any] | None = None
        if args.only in (None, "receive"):
            say("receive throughput:")
            receive = bench_receive(files, work, args.repeats, say, scrape=args.scrape)
        if args.only in (None, "turnaround"):
            say("turnaround:")
            engines = engines_toml(args.backend, REPO / "engines", work) if args.backend else ""
            turnaround = bench_turnaround(files, work, say, engines=engines, cold_start=args.cold_start)
        dcmtk = subprocess.run([str(STORESCU), "--version"], capture_output=True, text=True, timeout=10)
        result: dict[str, Any] = {
            "command": command,
            "environment": {
                "cpus": os.cpu_count(),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "dcmtk": (dcmtk.stdout.splitlines() or ["dcmtk ?"])[0].strip("$ ").replace("dcmtk: ", "DCMTK "),
            },
            "series": {"slices": len(files), "rows": 512, "columns": 512, "mib": round(size / 2**20, 1),
                       "generate_s": round(gen_s, 1)},
            "receive": receive,
            "turnaround": turnaround,
            "backend": args.backend or "auto",
        }
        result["total_s"] = round(time.monotonic() - started, 1)
        print(render(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        _kill_all()
        if args.keep:
            say(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
