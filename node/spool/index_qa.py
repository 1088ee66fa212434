"""The index's edit-QA rows: qa jobs queued for edited structure sets, and what each set measured.

``qa_sets`` holds one row per edited structure set (an RTSTRUCT or SEG instance that came back), keyed
by its SOP Instance UID; ``qa_structures`` one row per structure compared. Retention deletes series, not
these rows: they are the history ``qa report`` computes its control limits from.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from node.model.enums import EditVerdict, JobKind, QaOutcome
from node.model.qa_records import QaSet, StructureQa
from node.model.records import JobState, SeriesState
from node.spool.index_db import IndexDb

#: The bundle column of a qa job (it runs no bundle): what ``status`` shows.
QA_BUNDLE = "edit-qa"
_METRICS = ("dice", "surface_dice_1mm", "surface_dice_2mm", "hd95_mm", "msd_mm", "ours_ml", "theirs_ml",
            "change_ml", "change_pct")


@dataclass(frozen=True)
class EditedInstance:
    """An instance of an edited structure set's series, as the receiver recorded it."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    calling_ae: str
    received_at: float


@dataclass(frozen=True)
class StructureRow:
    """A structure's result with when its set was compared (what ``qa report`` aggregates)."""

    compared_at: float
    ct_series_uid: str
    structure: StructureQa


class QaRows(IndexDb):
    """Edit QA: queue a qa job for a settled structure-set series, record and read what it measured."""

    def dispatch_qa(self, series_uid: str, note: str, now: float | None = None) -> int:
        """Mark a settled series of edited structure sets dispatched and queue its qa job, atomically."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, note=? WHERE series_uid=?",
                       (SeriesState.DISPATCHED.value, note, series_uid))
            sender = db.execute("SELECT calling_ae FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            cur = db.execute(
                "INSERT INTO jobs (series_uid, bundle, state, created, updated, calling_ae, kind) "
                "VALUES (?,?,?,?,?,?,?)",
                (series_uid, QA_BUNDLE, JobState.QUEUED.value, now, now,
                 sender["calling_ae"] if sender is not None else "", JobKind.QA.value),
            )
        return int(cur.lastrowid or 0)

    def edited_instances(self, series_uid: str) -> list[EditedInstance]:
        rows = self._query("SELECT sop_instance_uid, sop_class_uid, path, calling_ae, received_at FROM instances "
                           "WHERE series_uid=? ORDER BY received_at, sop_instance_uid", (series_uid,))
        return [EditedInstance(r["sop_instance_uid"], r["sop_class_uid"], Path(r["path"]), r["calling_ae"],
                               float(r["received_at"])) for r in rows]

    def series_of_instances(self, sop_instance_uids: Collection[str]) -> dict[str, int]:
        """Series holding any of these SOP instances, with how many of them each holds."""
        found: dict[str, int] = {}
        uids = list(sop_instance_uids)
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            rows = self._query("SELECT series_uid, COUNT(*) AS n FROM instances WHERE sop_instance_uid IN "
                               f"({','.join('?' * len(chunk))}) GROUP BY series_uid", tuple(chunk))
            for r in rows:
                found[r["series_uid"]] = found.get(r["series_uid"], 0) + int(r["n"])
        return found

    def own_result_job(self, sop_instance_uid: str) -> int | None:
        """The job whose result this SOP instance is (queued for a destination), else None."""
        rows = self._query("SELECT job_id FROM outbox WHERE sop_instance_uid=? LIMIT 1", (sop_instance_uid,))
        return int(rows[0]["job_id"]) if rows else None

    def qa_recorded(self, sop_instance_uids: Collection[str]) -> set[str]:
        """Which of these edited sets already have a qa record."""
        uids = list(sop_instance_uids)
        if not uids:
            return set()
        rows = self._query(f"SELECT sop_instance_uid FROM qa_sets WHERE sop_instance_uid IN "
                           f"({','.join('?' * len(uids))})", tuple(uids))
        return {r["sop_instance_uid"] for r in rows}

    def record_qa(self, job_id: int, qa: QaSet) -> int:
        """Store what one edited set measured (replacing an earlier record of the same instance); its row id."""
        with self._tx() as db:
            old = db.execute("SELECT id FROM qa_sets WHERE sop_instance_uid=?", (qa.sop_instance_uid,)).fetchone()
            if old is not None:
                db.execute("DELETE FROM qa_structures WHERE set_id=?", (old["id"],))
                db.execute("DELETE FROM qa_sets WHERE id=?", (old["id"],))
            cur = db.execute(
                "INSERT INTO qa_sets (job_id, sop_instance_uid, series_uid, path, label, ct_series_uid, result_jobs, "
                "outcome, reason, calling_ae, received_at, compared_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, qa.sop_instance_uid, qa.series_uid, qa.path, qa.label, qa.ct_series_uid,
                 ",".join(map(str, qa.result_jobs)), qa.outcome.value, qa.reason, qa.calling_ae, qa.received_at,
                 qa.compared_at),
            )
            set_id = int(cur.lastrowid or 0)
            db.executemany(
                f"INSERT INTO qa_structures (set_id, name, their_name, bundle, verdict, {', '.join(_METRICS)}, "
                f"added_slices, removed_slices, note) VALUES ({','.join('?' * (len(_METRICS) + 8))})",
                [(set_id, s.name, s.their_name, s.bundle, s.verdict.value, *(getattr(s, m) for m in _METRICS),
                  s.added_slices, s.removed_slices, s.note) for s in qa.structures],
            )
        return set_id

    def qa_sets(self, *, ct_series_uid: str | None = None, series_uid: str | None = None,
                since: float | None = None, limit: int = 200) -> list[QaSet]:
        """Edited sets with their structures, newest first: those of one CT series, one series of edits, or all."""
        where: list[str] = ["1=1"]
        args: list[object] = []
        if ct_series_uid is not None:
            where.append("ct_series_uid=?")
            args.append(ct_series_uid)
        if series_uid is not None:
            where.append("series_uid=?")
            args.append(series_uid)
        if since is not None:
            where.append("compared_at>=?")
            args.append(since)
        rows = self._query(f"SELECT * FROM qa_sets WHERE {' AND '.join(where)} ORDER BY compared_at DESC, id DESC "
                           "LIMIT ?", (*args, limit))
        sets = []
        for r in rows:
            structures = [_structure(s) for s in self._query("SELECT * FROM qa_structures WHERE set_id=? "
                                                             "ORDER BY rowid", (r["id"],))]
            sets.append(_set(r, structures))
        return sets

    def qa_structure_rows(self, *, since: float | None = None, bundle: str | None = None) -> list[StructureRow]:
        """Every structure compared (oldest first), with when: what ``qa report`` aggregates."""
        sql = ("SELECT s.*, q.compared_at, q.ct_series_uid FROM qa_structures s JOIN qa_sets q ON q.id = s.set_id "
               "WHERE q.outcome=?")
        args: list[object] = [QaOutcome.COMPARED.value]
        if since is not None:
            sql += " AND q.compared_at>=?"
            args.append(since)
        if bundle is not None:  # a bundle's name (every version) or its id (name@version)
            sql += " AND (s.bundle=? OR s.bundle LIKE ? ESCAPE '\\')"
            args += [bundle, bundle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "@%"]
        rows = self._query(sql + " ORDER BY q.compared_at, s.rowid", tuple(args))
        return [StructureRow(float(r["compared_at"]), r["ct_series_uid"], _structure(r)) for r in rows]


def _structure(r: sqlite3.Row) -> StructureQa:
    return StructureQa(
        name=r["name"], their_name=r["their_name"], bundle=r["bundle"], verdict=EditVerdict(r["verdict"]),
        added_slices=int(r["added_slices"]), removed_slices=int(r["removed_slices"]), note=r["note"],
        **{m: (None if r[m] is None else float(r[m])) for m in _METRICS},
    )


def _set(r: sqlite3.Row, structures: list[StructureQa]) -> QaSet:
    return QaSet(
        sop_instance_uid=r["sop_instance_uid"], series_uid=r["series_uid"], path=r["path"],
        outcome=QaOutcome(r["outcome"]), reason=r["reason"], label=r["label"], ct_series_uid=r["ct_series_uid"],
        result_jobs=tuple(int(j) for j in r["result_jobs"].split(",") if j), calling_ae=r["calling_ae"],
        received_at=float(r["received_at"]), compared_at=float(r["compared_at"]), structures=structures,
        job_id=int(r["job_id"]), id=int(r["id"]),
    )
