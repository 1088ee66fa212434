"""Processes from /proc, for tests and benchmarks that watch the node's process tree (CPU, RSS)."""

from __future__ import annotations

import os


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime clock ticks) for every process visible in /proc."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def descendants(root: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every live descendant of ``root`` (ppid links)."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found
