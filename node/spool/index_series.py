"""The index's series: settling, their state, and reading them back."""

from __future__ import annotations

import sqlite3
import time

from node.model.records import SeriesRecord, SeriesState
from node.spool.index_db import IndexDb


class SeriesRows(IndexDb):
    """Series: settle, change state, read."""

    def settle_sooner(self, series_uids: set[str], settle_s: float, now: float | None = None) -> None:
        """An association that sent these series was released: let them settle after ``settle_s``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for uid in series_uids:
                db.execute(
                    "UPDATE series SET settle_at = MIN(settle_at, ?) WHERE series_uid=? AND state=?",
                    (now + settle_s, uid, SeriesState.RECEIVING.value),
                )

    def settled_series(self, now: float | None = None) -> list[SeriesRecord]:
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM series WHERE state=? AND settle_at <= ? ORDER BY last_received",
            (SeriesState.RECEIVING.value, now),
        )
        return [_series(r) for r in rows]

    def set_series_state(self, series_uid: str, state: SeriesState, note: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, note=? WHERE series_uid=?", (state.value, note, series_uid))

    def series(self, series_uid: str) -> SeriesRecord | None:
        rows = self._query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return _series(rows[0]) if rows else None

    def all_series(self) -> list[SeriesRecord]:
        return [_series(r) for r in self._query("SELECT * FROM series ORDER BY last_received")]


def _series(r: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(
        series_uid=r["series_uid"],
        study_uid=r["study_uid"],
        modality=r["modality"],
        sop_class_uid=r["sop_class_uid"],
        instance_count=r["instance_count"],
        first_received=r["first_received"],
        last_received=r["last_received"],
        state=SeriesState(r["state"]),
        note=r["note"],
        calling_ae=r["calling_ae"],
        study_description=r["study_description"],
        series_description=r["series_description"],
    )
