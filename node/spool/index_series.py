"""The index's series: settling, their state, and reading them back.

A series some of whose instances were refused for lack of resources (0xA700: the disk at the watermark)
is incomplete: ``refused_at`` records the last refusal, and :meth:`SeriesRows.settled_series` holds such a
series back until an association sends it without refusals (the sender sent the rest again) or the hold
the assembler gives has passed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection

from node.model.records import SeriesRecord, SeriesState
from node.spool.index_db import IndexDb


class SeriesRows(IndexDb):
    """Series: settle, change state, read."""

    def settle_sooner(self, series_uids: set[str], settle_s: float, now: float | None = None, *,
                      refused: Collection[str] = ()) -> None:
        """An association that sent these series ended: let them settle after ``settle_s``, except those in
        ``refused`` (it ended with some of their instances refused for resources), which wait for the rest.

        An association that sent a series without refusals (the sender sent the refused instances again)
        lifts the wait.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            for uid in set(series_uids) - set(refused):
                db.execute(
                    "UPDATE series SET settle_at = MIN(settle_at, ?), refused_at = 0 WHERE series_uid=? AND state=?",
                    (now + settle_s, uid, SeriesState.RECEIVING.value),
                )
        if refused:
            self.note_refused(refused, now)

    def note_refused(self, series_uids: Collection[str], now: float | None = None) -> None:
        """Instances of these series were refused for lack of resources (0xA700): they wait for the sender to
        send them again (the note of a series still receiving says so)."""
        now = time.time() if now is None else now
        at = time.strftime("%H:%M:%S", time.localtime(now))
        note = f"instance(s) refused for lack of resources (0xA700) at {at}: waiting for the sender to send them again"
        with self._tx() as db:
            for uid in series_uids:
                db.execute("UPDATE series SET refused_at=?, note=CASE WHEN state=? THEN ? ELSE note END "
                           "WHERE series_uid=?", (now, SeriesState.RECEIVING.value, note, uid))

    def settled_series(self, now: float | None = None, *, refused_hold_s: float = 0.0) -> list[SeriesRecord]:
        """Series quiet long enough to dispatch; one with refused instances only ``refused_hold_s`` after the
        last refusal (unless an association has since sent it without refusals)."""
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT * FROM series WHERE state=? AND settle_at <= ? AND refused_at <= ? ORDER BY last_received",
            (SeriesState.RECEIVING.value, now, now - refused_hold_s),
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
