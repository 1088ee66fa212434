"""Reading a running node's SQLite index from a test or benchmark, read-only (the node is unaffected)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

INDEX_FILE = "index.sqlite3"


def read_index(state: Path, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    """Rows of ``sql`` from the index in ``state`` (a state directory or the index file itself); [] while
    the node has not created it yet."""
    path = state / INDEX_FILE if state.is_dir() else state
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        return db.execute(sql, args).fetchall()
    finally:
        db.close()
