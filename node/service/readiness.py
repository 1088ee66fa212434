"""Readiness: the checks ``/readyz`` answers with, each a name, a verdict and a sentence saying why.

- ``engines``: every worker has reported its engines, and none failed to load one;
- ``index``: the index takes a write (a short transaction on the HTTP thread's own connection, rolled back);
- ``disk``: the state directory's file system has more than ``node.min_free_disk_mb`` free (the receiver
  answers 0xA700 below it);
- ``destination:NAME``, one per destination: it took an object at least once in the last
  ``metrics.destination_window_s`` seconds, or it was not tried in that window (a node with nothing to
  send is not unready). A destination tried and never reached in the window is named with its latest
  attempt's status.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from node.config import NodeConfig
from node.jobs.worker import EngineReport
from node.spool.index import Index

#: Per worker name, the engines it reported (the worker pool's ``reports``, copied).
EngineReports = Callable[[], Mapping[str, EngineReport]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


def engines_by_bundle(reports: Mapping[str, EngineReport]) -> dict[str, set[str]]:
    """Per bundle id, the engine descriptions the workers loaded (several when workers differ)."""
    found: dict[str, set[str]] = {}
    for report in reports.values():
        for bundle, description in report.engines.items():
            found.setdefault(bundle, set()).add(description)
    return found


def check_engines(cfg: NodeConfig, reports: Mapping[str, EngineReport]) -> Check:
    if len(reports) < cfg.workers:
        return Check("engines", False, f"{len(reports)} of {cfg.workers} worker(s) have loaded their engines; "
                                       "the others are still loading (or restarting)")
    failed = {bundle: why for r in reports.values() for bundle, why in r.failed.items()}
    if failed:
        why = "; ".join(f"bundle {bundle} has no engine: {reason}" for bundle, reason in sorted(failed.items()))
        return Check("engines", False, why)
    loaded = engines_by_bundle(reports)
    return Check("engines", True, "; ".join(f"{b}: {', '.join(sorted(d))}" for b, d in sorted(loaded.items())))


def check_index(cfg: NodeConfig, index: Index) -> Check:
    try:
        index.probe_write()
    except sqlite3.Error as exc:
        return Check("index", False, f"{cfg.index_path} cannot be written: {exc}")
    return Check("index", True, f"{cfg.index_path} takes writes")


def check_disk(cfg: NodeConfig) -> Check:
    free_mb = shutil.disk_usage(cfg.state_dir).free // 2**20
    detail = f"{free_mb} MB free in {cfg.state_dir}; node.min_free_disk_mb is {cfg.min_free_disk_mb}"
    if free_mb > cfg.min_free_disk_mb:
        return Check("disk", True, detail)
    return Check("disk", False, detail + " (C-STOREs are refused with 0xA700)")


def check_destinations(cfg: NodeConfig, index: Index, now: float) -> list[Check]:
    window = cfg.metrics.destination_window_s
    since = now - window
    reach = index.destination_reach()
    checks = []
    for destination in cfg.destinations:
        name = f"destination:{destination.name}"
        seen = reach.get(destination.name)
        tried = seen.last_attempt_at if seen is not None else None
        sent = seen.last_sent_at if seen is not None else None
        if tried is None or tried < since:
            checks.append(Check(name, True, f"{destination} was not tried in the last {window:.0f} s"))
        elif sent is not None and sent >= since:
            checks.append(Check(name, True, f"{destination} took an object {now - sent:.0f} s ago"))
        else:
            last = "never" if sent is None else f"{now - sent:.0f} s ago"
            status = seen.last_status if seen is not None else ""
            checks.append(Check(name, False, f"{destination} was tried {now - tried:.0f} s ago and not reached in the "
                                             f"last {window:.0f} s (last delivery: {last}; latest status: {status})"))
    return checks


def readiness(cfg: NodeConfig, index: Index, reports: EngineReports, now: float | None = None) -> list[Check]:
    """Every check; one that raises is failed with what it raised."""
    now = time.time() if now is None else now
    checks: list[Check] = []
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("engines", lambda: [check_engines(cfg, reports())]),
        ("index", lambda: [check_index(cfg, index)]),
        ("disk", lambda: [check_disk(cfg)]),
        ("destinations", lambda: check_destinations(cfg, index, now)),
    ]
    for name, step in steps:
        try:
            checks += step()
        except Exception as exc:
            checks.append(Check(name, False, f"the check failed: {type(exc).__name__}: {exc}"))
    return checks
