"""The shipped systemd unit: systemd itself accepts it, and it says what the service relies on.

``systemd-analyze verify`` works without systemd as PID 1 (it loads the unit into an offline
manager), but it exits 0 even for unknown keys and unparsable values: problems only show up as
lines naming the unit file. So the test reads its output, and first checks on a deliberately
broken copy that this systemd-analyze reports such lines at all. It also insists that ExecStart's
binary exists (and, depending on the version, that User= does), so it runs on a copy with those
two pointed at this machine.
"""

from __future__ import annotations

import configparser
import grp
import inspect
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import build_parser
from node.jobs.worker import WorkerPool
from node.service.daemon import LOOP_INTERVAL_S

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "dicom-seg-node.service"
UNIT_NAME = UNIT.name
INSTALLED_EXEC = "/opt/dicom-seg-node/.venv/bin/dicom-seg-node"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


def _seconds(value: str) -> float:
    """A systemd time span as used here ("90", "90s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 1e-3}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip()):
        total += float(number) * units[unit]
    return total


# ------------------------------------------------------------------------------- the unit's keys
def test_unit_has_the_keys_the_service_relies_on() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"  # daemon.py sends READY=1 once the listener is up
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"  # SIGTERM to the main process only: it stops the workers
    assert service["StateDirectory"] == "dicom-seg-node"
    assert service["User"] == "dicom-seg-node"
    assert service["Group"] == "dicom-seg-node"
    assert "DynamicUser" not in service or service["DynamicUser"] == "no"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_watchdog_and_stop_timeouts_fit_the_service() -> None:
    service = _unit()["Service"]
    watchdog = _seconds(service["WatchdogSec"])
    assert watchdog == 60
    # The service pings every WatchdogSec/2 from a loop that turns every LOOP_INTERVAL_S.
    assert watchdog / 2 > 10 * LOOP_INTERVAL_S
    # Workers get WorkerPool.stop's timeout to finish their job, then 5 s after SIGTERM, then SIGKILL;
    # systemd must wait longer than that before it kills everything itself.
    worker_grace = inspect.signature(WorkerPool.stop).parameters["timeout"].default
    assert worker_grace == 30
    assert _seconds(service["TimeoutStopSec"]) >= worker_grace + 5 + 30
    assert _seconds(service["RestartSec"]) == 5


def test_configuration_errors_are_not_restarted(tmp_path: Path) -> None:
    """RestartPreventExitStatus=2 relies on the CLI exiting 2 on a configuration error."""
    assert _unit()["Service"]["RestartPreventExitStatus"].split() == ["2"]
    out = subprocess.run(
        [sys.executable, "-m", "node", "serve", "-c", str(tmp_path / "missing.toml"),
         "--state-dir", str(tmp_path / "state"), "--port", "11112", "--bind", "127.0.0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr


def test_execstart_is_a_serve_command_the_cli_accepts() -> None:
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED_EXEC
    assert Path(argv[0]).name == "dicom-seg-node"  # the console script in pyproject.toml
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == "/etc/dicom-seg-node/node.toml"
    # --state-dir is the directory systemd creates and owns for us (StateDirectory=).
    assert args.state_dir == f"/var/lib/{service['StateDirectory']}"
    assert service["WorkingDirectory"] == args.state_dir


def test_unit_sandboxing() -> None:
    service = _unit()["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",  # port 11112 needs no CAP_NET_BIND_SERVICE
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(service["LimitNOFILE"]) >= 4096
    # The GPU recipe is documented (commented out) next to PrivateDevices=.
    text = UNIT.read_text(encoding="utf-8")
    assert re.search(r"^#DeviceAllow=.*nvidia", text, re.M)


# ------------------------------------------------------------------------ systemd-analyze verify
def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    return exe


def _local_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart and User/Group pointed at things that exist on this machine."""
    console_script = Path(sys.executable).with_name("dicom-seg-node")
    exec_prefix = str(console_script) if console_script.is_file() else f"{sys.executable} -m node"
    assert INSTALLED_EXEC in text
    text = text.replace(INSTALLED_EXEC, exec_prefix)
    # Not "nobody": systemd warns that the special user nobody "is not safe".
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    if "nobody" in (user, group) or "nogroup" in (user, group):
        user, group = "root", "root"
    text = re.sub(r"^User=.*$", f"User={user}", text, flags=re.M)
    text = re.sub(r"^Group=.*$", f"Group={group}", text, flags=re.M)
    path = tmp_path / UNIT_NAME
    path.write_text(text, encoding="utf-8")
    return path


def _verify(exe: str, unit: Path) -> tuple[int, list[str]]:
    env = dict(os.environ, SYSTEMD_PAGER="cat", SYSTEMD_COLORS="0", SYSTEMD_LOG_COLOR="0")
    out = subprocess.run(
        [exe, "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=120, env=env, cwd=unit.parent,
    )
    return out.returncode, (out.stdout + out.stderr).splitlines()


def _about(unit: Path, lines: list[str]) -> list[str]:
    return [line for line in lines if str(unit) in line or unit.name in line]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    exe = _systemd_analyze()

    # Control: a copy with an unknown key, a bad value and a missing binary must be reported.
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken = _local_copy(broken_dir, UNIT.read_text(encoding="utf-8"))
    broken.write_text(
        broken.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\nRestartSec=banana\n", 1)
        .replace(str(Path(sys.executable).with_name("dicom-seg-node")), str(tmp_path / "missing-binary"))
    )
    rc, lines = _verify(exe, broken)
    flagged = _about(broken, lines)
    if not any("NoSuchKey" in line for line in flagged):
        pytest.skip(f"systemd-analyze verify does not report unit problems here (exit {rc}): {lines[:10]}")
    assert any("banana" in line or "RestartSec" in line for line in flagged), lines

    good_dir = tmp_path / "good"
    good_dir.mkdir()
    unit = _local_copy(good_dir, UNIT.read_text(encoding="utf-8"))
    rc, lines = _verify(exe, unit)
    assert _about(unit, lines) == [], "\n".join(lines)
    assert rc == 0, "\n".join(lines)


def test_verify_insists_on_an_existing_exec_start(tmp_path: Path) -> None:
    """Why the verify test rewrites ExecStart: the installed path does not exist on a dev machine."""
    exe = _systemd_analyze()
    if Path(INSTALLED_EXEC).exists():
        pytest.skip(f"{INSTALLED_EXEC} exists on this machine")
    unit = tmp_path / UNIT_NAME
    shutil.copy(UNIT, unit)
    rc, lines = _verify(exe, unit)
    about = _about(unit, lines)
    if not about:
        pytest.skip(f"systemd-analyze verify does not check ExecStart here (exit {rc}): {lines[:10]}")
    assert any(INSTALLED_EXEC in line for line in about), lines
