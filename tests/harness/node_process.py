"""Run the real node (``python -m node serve``) as a subprocess on loopback, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.dcmtk import free_port

REPO = Path(__file__).resolve().parents[2]


class NodeProcess:
    """Context manager: a node listening on 127.0.0.1 with its own state directory and config."""

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "SEGNODE",
        destinations: list[str] | None = None,
        quiet_period_s: float = 5.0,
        release_settle_s: float = 1.0,
        extra_toml: str = "",  # appended after the [send] table: [send] keys, or further tables
        bundles: tuple[str, ...] = ("body-threshold",),  # the fast test model; () = the node's defaults
        port: int | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.ae_title = ae_title
        self.port = port or free_port()
        self.destinations = destinations or []
        self.config_path = workdir / "node.toml"
        self.log_path = workdir / "node.log"
        self.startup_timeout = startup_timeout
        workdir.mkdir(parents=True, exist_ok=True)
        engines = ""
        if bundles and "[engines]" not in extra_toml:
            engines = "[engines]\nbundles = [" + ", ".join(f'"{b}"' for b in bundles) + "]\n"
        self.config_path.write_text(
            f"{engines}[assemble]\nquiet_period_s = {quiet_period_s}\nrelease_settle_s = {release_settle_s}\n"
            f"[send]\nbackoff_initial_s = 1.0\n{extra_toml}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "node", "serve", "-c", str(self.config_path), "--state-dir", str(self.state_dir),
               "--port", str(self.port), "--bind", "127.0.0.1", "--ae-title", self.ae_title]
        for d in self.destinations:
            cmd += ["--destination", d]
        return cmd

    def start(self) -> NodeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size  # a restart appends: only this start's lines count
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode} at start:\n{self.log_text()}")
            if "ready:" in self.log_text()[offset:]:
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the node did not become ready in {self.startup_timeout} s:\n{self.log_text()}")

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        """Kill the service and its workers at once, as a power cut or OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "node", "status", "--state-dir", str(self.state_dir), "--json", "--limit", "1000"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )
        return json.loads(out.stdout)

    def route_explain(self, series_uid: str) -> str:
        """``route --explain`` for a received series, under this node's config and state."""
        out = subprocess.run(
            [sys.executable, "-m", "node", "route", "-c", str(self.config_path), "--state-dir", str(self.state_dir),
             "--explain", series_uid],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )
        return out.stdout

    def wait_status(self, predicate: Any, timeout: float, interval: float = 0.5) -> dict[str, Any]:
        """Poll ``status --json`` until ``predicate(status)`` is true; raise TimeoutError with the log."""
        deadline = time.time() + timeout
        status: dict[str, Any] = {}
        while time.time() < deadline:
            if self.state_dir.joinpath("index.sqlite3").exists():
                status = self.status()
                if predicate(status):
                    return status
            time.sleep(interval)
        raise TimeoutError(f"condition not met in {timeout} s; last status {json.dumps(status)[:2000]}\n"
                           f"node log:\n{self.log_text()[-6000:]}")
