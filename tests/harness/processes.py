"""Stopping the real peers the tests start (each in its own session, so a signal reaches only it and
its children)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL after ``timeout`` s; returns once the process has exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.wait(timeout=timeout)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something true, and return that; TimeoutError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached in {timeout} s")
        time.sleep(interval)
