"""A full disk under the real service: jobs wait and retry instead of failing, and a series cut short by
0xA700 (out of resources) waits for the rest instead of being segmented in part.

The node's state directory is a small tmpfs that the test mounts (as root, or with ``sudo -n``) and fills
with a file of its own; the node's log stays outside it. Where neither works (an unprivileged CI runner, a
container without CAP_SYS_ADMIN) the tests skip and say why.

* :func:`test_enospc_while_writing_results_is_retried_once_space_returns`: the disk fills while the job
  runs (``node.min_free_disk_mb = 0``, so the write itself meets ENOSPC); the job must go back to the queue
  with a backoff (not fail), and end done once the file is removed. With not a byte left the index cannot
  record that either: the worker must wait until it can, not die. The log holds no storm of tracebacks.
* :func:`test_a_job_waits_while_free_space_is_below_the_watermark`: below ``node.min_free_disk_mb`` (the
  receiver's watermark) a job does not start writing; it waits, says why, and runs once space returns.
* :func:`test_series_cut_short_by_out_of_resources_waits_for_the_rest`: the disk reaches the watermark
  halfway through a push, so about half the instances are refused with 0xA700. No job may be queued for the
  incomplete series; once space returns and the sender pushes again, the series is segmented once, whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.dcmtk import storescu, tool_missing_reason
from tests.harness.index_rows import read_index
from tests.harness.node_process import NodeProcess
from tests.harness.processes import wait_until as _wait
from tests.harness.synthetic_ct import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MB = 2**20
ONE_BUNDLE = '[engines]\nbundles = ["body-threshold"]\n'


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu"):
        pytest.skip(reason)


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    """A ``size_mb`` MB tmpfs mounted at ``path`` for the block; skips the test where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    options = f"size={size_mb}m,mode=0755"
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            pytest.skip(f"mounting a {size_mb} MB tmpfs needs root or passwordless sudo; this runner has neither")
        prefix = ["sudo", "-n"]
        options += f",uid={os.getuid()},gid={os.getgid()}"
    mounted = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs at {path} to fill ({' '.join(prefix)} mount said: "
                    f"{(mounted.stderr or mounted.stdout).strip()}); this runner may not mount file systems")
    try:
        yield path
    finally:
        subprocess.run([*prefix, "umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(path: Path, leave_bytes: int = 0) -> int:
    """Write ``path`` until its file system has at most ``leave_bytes`` free; return the bytes written."""
    written = 0
    with path.open("ab") as fh:
        for chunk in (MB, 64 * 1024, 4096):
            block = b"\0" * chunk
            while shutil.disk_usage(path.parent).free - chunk >= leave_bytes:
                try:
                    fh.write(block)
                    fh.flush()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += chunk
    return written




def _node(tmp_path: Path, *, min_free_mb: int, quiet_period_s: float = 30.0,
          release_settle_s: float = 1.0) -> NodeProcess:
    return NodeProcess(tmp_path / "node", quiet_period_s=quiet_period_s, release_settle_s=release_settle_s,
                       extra_toml=f"{ONE_BUNDLE}[node]\nmin_free_disk_mb = {min_free_mb}\n")


def _jobs(node: NodeProcess) -> list[dict[str, Any]]:
    return [dict(r) for r in read_index(node.state_dir, "SELECT * FROM jobs ORDER BY id")]


def _tracebacks(node: NodeProcess) -> int:
    return node.log_text().count("Traceback (most recent call last)")


@pytest.mark.parametrize("left_kb", [0, 128], ids=["full", "nearly-full"])
def test_enospc_while_writing_results_is_retried_once_space_returns(tmp_path: Path, left_kb: int) -> None:
    """``full``: not a byte left, so the index cannot record the outcome either (the worker must wait for it,
    not die); ``nearly-full``: room for the index but not for the 330 kB SEG (the job goes back to the queue)."""
    series = write_ct_series(tmp_path / "ct", slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6), seed=31)
    node = _node(tmp_path, min_free_mb=0, release_settle_s=0.5)
    observed: list[dict[str, Any]] = []

    def met_the_full_disk() -> dict[str, Any] | None:
        (job,) = _jobs(node)
        observed.append(job)
        hit = job["state"] != "running" or "No space left" in node.log_text() or "cannot record" in node.log_text()
        return job if hit else None

    with small_filesystem(node.state_dir, 48):
        filler = node.state_dir / "filler.bin"
        try:
            node.start()
            storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
            _wait("the job running", lambda: any(j["state"] == "running" for j in _jobs(node)), 60, 0.005)
            fill(filler, leave_bytes=left_kb * 1024)  # the results being written meet ENOSPC
            seen = _wait("the job met the full disk", met_the_full_disk, 60, 0.05)
            full_for = time.monotonic()
            deadline = time.monotonic() + 3.0  # the disk stays full a while: still no permanent failure
            while time.monotonic() < deadline:
                observed.append(_jobs(node)[0])
                time.sleep(0.2)
            filler.unlink()
            job = _wait("the job ended", lambda: (js := _jobs(node)) and js[0]["state"] not in ("queued", "running")
                        and js[0], 90, 0.2)
            waited = time.monotonic() - full_for
        finally:
            node.stop()
            filler.unlink(missing_ok=True)
    log = node.log_text()
    ended = [(j["state"], j["error"]) for j in observed if j["state"] not in ("queued", "running")]
    assert not ended, f"the job ended {ended[0]} while the disk was full; a full disk is transient\n{log[-4000:]}"
    if left_kb:
        assert seen["state"] == "queued" and "No space left" in str(seen["error"]), seen
    step_failures = log.count("step failed")
    assert step_failures <= 3, f"{step_failures} 'step failed' lines: one per distinct cause is enough\n{log[-4000:]}"
    assert _tracebacks(node) <= 3, f"{_tracebacks(node)} tracebacks in the log\n{log[-4000:]}"
    assert "died (exit code" not in log, f"the worker died\n{log[-4000:]}"
    assert job["state"] == "done", f"ended {job['state']} ({job['error']!r}) once space returned\n{log[-4000:]}"
    assert job["crashes"] == 0
    print(f"\n{left_kb} kB left: the job met the full disk as {seen['state']} ({seen['error']!r}); done {waited:.1f} s "
          f"later, attempt {job['attempts']}")


def test_a_job_waits_while_free_space_is_below_the_watermark(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6), seed=32)
    node = _node(tmp_path, min_free_mb=20, release_settle_s=3.0)
    with small_filesystem(node.state_dir, 64):
        filler = node.state_dir / "filler.bin"
        try:
            node.start()
            storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
            fill(filler, leave_bytes=10 * MB)  # below the 20 MB watermark, far from full
            waiting = _wait("a job waiting or ended", lambda: (js := _jobs(node)) and (
                js[0]["error"] or js[0]["state"] not in ("queued", "running")) and js[0], 30, 0.1)
            time.sleep(3.0)
            still = _jobs(node)[0]
            filler.unlink()
            job = _wait("the job ended", lambda: (js := _jobs(node)) and js[0]["state"] not in ("queued", "running")
                        and js[0], 90, 0.2)
        finally:
            node.stop()
            filler.unlink(missing_ok=True)
    assert waiting["state"] in ("queued", "running") and "watermark" in str(waiting["error"]), waiting
    assert still["state"] == "queued" and "watermark" in str(still["error"]), still
    assert job["state"] == "done", f"{job['state']}: {job['error']!r}\n{node.log_text()[-4000:]}"
    assert job["attempts"] == 1, f"waiting for space counted as {job['attempts'] - 1} attempt(s)"


def test_series_cut_short_by_out_of_resources_waits_for_the_rest(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=40, rows=256, columns=256, pixel_spacing=(1.6, 1.6), seed=33)
    size = sum(f.stat().st_size for f in series.files)
    node = _node(tmp_path, min_free_mb=20, quiet_period_s=4.0, release_settle_s=0.5)
    with small_filesystem(node.state_dir, 64):
        filler = node.state_dir / "filler.bin"
        try:
            node.start()
            fill(filler, leave_bytes=20 * MB + size // 2)  # the watermark is reached halfway through the push
            first = storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120, no_halt=True,
                             check=False)
            refused = first.stderr.lower().count("0xa700")
            stored = len(read_index(node.state_dir, "SELECT 1 FROM instances"))
            time.sleep(8.0)  # past the release settle time and the quiet period
            early_jobs = _jobs(node)
            (waiting,) = read_index(node.state_dir, "SELECT state, note FROM series")
            filler.unlink()
            storescu("127.0.0.1", node.port, node.ae_title, series.directory, timeout=120)
            job = _wait("the job ended", lambda: (js := _jobs(node)) and js[-1]["state"] not in ("queued", "running")
                        and js[-1], 90, 0.2)
            jobs = _jobs(node)
        finally:
            node.stop()
            filler.unlink(missing_ok=True)
    assert 0 < stored < len(series.files), f"{stored} of {len(series.files)} stored: the fill missed the middle"
    print(f"\nfirst push: {stored} of {len(series.files)} stored, {refused} refusal line(s) from storescu")
    assert not early_jobs, (f"the incomplete series ({stored} of {len(series.files)} instances) was dispatched: "
                            f"{[(j['id'], j['state'], j['error']) for j in early_jobs]}")
    assert waiting["state"] == "receiving" and "refused" in waiting["note"], dict(waiting)
    assert [j["state"] for j in jobs] == ["done"], [(j["id"], j["state"], j["error"]) for j in jobs]
    assert job["state"] == "done"
