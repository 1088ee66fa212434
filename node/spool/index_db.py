"""The index's SQLite file: the connection (WAL mode, one lock), its transactions and the schema.

``IndexDb`` is the base of the per-table parts that ``node.spool.index.Index`` is composed of
(``index_instances``, ``index_series``, ``index_jobs``, ``index_outbox``, ``index_retention``); these
modules hold the only SQL in the node. One ``Index`` object per process; its methods are thread-safe
(one connection behind a lock), which suits the receiver's association threads. Worker processes open
their own ``Index`` on the same file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    settle_at REAL NOT NULL,
    open_associations INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    bundle TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    result_dir TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    UNIQUE(destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);
-- Files and result folders whose index rows retention has deleted (node.spool.retention): written in
-- the transaction that deletes the rows, cleared once the files are gone, finished at start.
CREATE TABLE IF NOT EXISTS pending_deletions (
    path TEXT PRIMARY KEY,
    is_dir INTEGER NOT NULL,
    queued_at REAL NOT NULL
);
-- The review gate's audit: one decision per job held for review (node.spool.index_reviews).
CREATE TABLE IF NOT EXISTS reviews (
    job_id INTEGER PRIMARY KEY,
    decision TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    decided_at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    released INTEGER NOT NULL DEFAULT 0
);
-- Edit QA (node.spool.index_qa): one row per edited structure set that came back, one per structure compared.
-- Retention keeps these rows when it deletes series: they are the history the `qa report` is computed from.
CREATE TABLE IF NOT EXISTS qa_sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    ct_series_uid TEXT NOT NULL DEFAULT '',
    result_jobs TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    compared_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS qa_sets_ct ON qa_sets(ct_series_uid);
CREATE INDEX IF NOT EXISTS qa_sets_at ON qa_sets(compared_at);
CREATE TABLE IF NOT EXISTS qa_structures (
    set_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    their_name TEXT NOT NULL DEFAULT '',
    bundle TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL,
    dice REAL, surface_dice_1mm REAL, surface_dice_2mm REAL, hd95_mm REAL, msd_mm REAL,
    ours_ml REAL, theirs_ml REAL, change_ml REAL, change_pct REAL,
    added_slices INTEGER NOT NULL DEFAULT 0,
    removed_slices INTEGER NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS qa_structures_set ON qa_structures(set_id);
"""

#: Columns added after the first release: an index written by an older node gains them at start
#: (ALTER TABLE … ADD COLUMN, each with a default, so old rows read as before).
ADDED_COLUMNS = (
    ("series", "calling_ae", "TEXT NOT NULL DEFAULT ''"),
    ("series", "study_description", "TEXT NOT NULL DEFAULT ''"),
    ("series", "series_description", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "calling_ae", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "claimed_at", "REAL"),
    ("jobs", "note", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "route", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "last_attempt_at", "REAL"),
    ("jobs", "structures", "TEXT NOT NULL DEFAULT ''"),  # JSON: [[name, volume in mL], ...]
    ("outbox", "verified_at", "REAL"),  # verify = "find": when the destination was seen to hold it
    ("outbox", "resends", "INTEGER NOT NULL DEFAULT 0"),  # sent again because it was not found in time
    ("series", "forced", "INTEGER NOT NULL DEFAULT 0"),  # `complete SERIES_UID`: settle it, counts or not
    ("outbox", "commit_txn", "TEXT NOT NULL DEFAULT ''"),  # verify = "commitment": the transaction that asked
    ("jobs", "generation", "INTEGER NOT NULL DEFAULT 0"),  # the service start whose worker claimed it (service_runs)
    ("jobs", "crashes", "INTEGER NOT NULL DEFAULT 0"),  # attempts that ended in a crash of their worker
    ("jobs", "not_before", "REAL NOT NULL DEFAULT 0"),  # a job put back for lack of resources waits until then
    ("jobs", "deferrals", "INTEGER NOT NULL DEFAULT 0"),  # runs ended by resource exhaustion (the backoff's step)
    ("jobs", "retryable", "INTEGER NOT NULL DEFAULT 0"),  # 1: a failure that `retry --job` could fix
    ("series", "refused_at", "REAL NOT NULL DEFAULT 0"),  # last instance refused for resources (0xA700); 0: none
    ("jobs", "kind", "TEXT NOT NULL DEFAULT 'segment'"),  # node.model.enums.JobKind: segment, or qa (edit QA)
)


class IndexDb:
    """The connection to the index file and its lock; the tables' queries are in the subclasses."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of this process (kill -9) but the last few
        # may roll back on power loss. The spool file itself is fsynced (file and directory) before
        # Success is answered, and the service reconciles the index with the spool at start
        # (``node.spool.recover``), so an acknowledged instance is never lost; it saves one fsync
        # (about 4 ms here) on every received instance.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        with self._tx() as db:
            for table, column, declaration in ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, priority)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this object's lock: no other thread of this process writes the index meanwhile.

        Retention removes a spool file only while holding it, after checking that no instance row
        refers to the path, so that the receiver (same process, same ``Index``) cannot record an
        instance between the check and the removal.
        """
        with self._lock:
            yield
