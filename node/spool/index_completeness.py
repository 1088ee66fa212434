"""What completeness-from-counts asks of the index: series gone quiet, the count decision in their note, and
``complete SERIES_UID`` (a series an operator declares complete)."""

from __future__ import annotations

import time

from node.model.records import SeriesRecord, SeriesState
from node.spool.index_db import IndexDb
from node.spool.index_series import _series


class CompletenessRows(IndexDb):
    def quiet_series(self, quiet_s: float, now: float | None = None) -> list[tuple[SeriesRecord, bool]]:
        """Series still receiving that have had no new instance for ``quiet_s`` seconds, each with whether an
        operator declared it complete (``complete SERIES_UID``)."""
        now = time.time() if now is None else now
        rows = self._query("SELECT * FROM series WHERE state=? AND last_received <= ? ORDER BY last_received",
                           (SeriesState.RECEIVING.value, now - quiet_s))
        return [(_series(r), bool(r["forced"])) for r in rows]

    def note_series(self, series_uid: str, note: str) -> None:
        """The note of a series still receiving (what the count said, what it waits for)."""
        with self._tx() as db:
            db.execute("UPDATE series SET note=? WHERE series_uid=? AND state=?",
                       (note, series_uid, SeriesState.RECEIVING.value))

    def force_complete(self, series_uid: str, now: float | None = None) -> SeriesRecord | None:
        """Mark a series complete now (it settles at the assembler's next turn, counts or not); None when the
        index does not hold it. A series no longer receiving is returned unchanged."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE series SET forced=1, settle_at=MIN(settle_at, ?), refused_at=0 "
                       "WHERE series_uid=? AND state=?", (now, series_uid, SeriesState.RECEIVING.value))
            row = db.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        return _series(row) if row is not None else None
