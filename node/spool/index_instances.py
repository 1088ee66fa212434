"""The index's instances: one row per received SOP instance, and the series it touches."""

from __future__ import annotations

import time
from pathlib import Path

from node.model.records import InstanceMeta, SeriesState
from node.spool.index_db import IndexDb


class InstanceRows(IndexDb):
    """Received instances: recorded (with their series), looked up, counted."""

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def add_instance(
        self,
        meta: InstanceMeta,
        *,
        path: Path,
        size: int,
        calling_ae: str,
        quiet_period_s: float,
        now: float | None = None,
    ) -> bool:
        """Record a stored instance and touch its series. Returns False for a duplicate SOP UID."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.sop_instance_uid,
                    meta.sop_class_uid,
                    meta.study_uid,
                    meta.series_uid,
                    meta.modality,
                    meta.transfer_syntax,
                    str(path),
                    size,
                    calling_ae,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                """INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, instance_count,
                       first_received, last_received, settle_at, state, calling_ae, study_description,
                       series_description)
                   VALUES (?,?,?,?,1,?,?,?,?,?,?,?)
                   ON CONFLICT(series_uid) DO UPDATE SET
                       instance_count = instance_count + 1,
                       last_received = excluded.last_received,
                       settle_at = excluded.settle_at,
                       state = excluded.state,
                       note = '',
                       calling_ae = CASE WHEN calling_ae = '' THEN excluded.calling_ae ELSE calling_ae END,
                       study_description = CASE WHEN study_description = '' THEN excluded.study_description
                                                ELSE study_description END,
                       series_description = CASE WHEN series_description = '' THEN excluded.series_description
                                                 ELSE series_description END""",
                (
                    meta.series_uid,
                    meta.study_uid,
                    meta.modality,
                    meta.sop_class_uid,
                    now,
                    now,
                    now + quiet_period_s,
                    SeriesState.RECEIVING.value,
                    calling_ae,
                    meta.study_description,
                    meta.series_description,
                ),
            )
        return True

    def all_instance_paths(self) -> set[str]:
        return {r["path"] for r in self._query("SELECT path FROM instances")}

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self._query("SELECT path FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))
        return [Path(r["path"]) for r in rows]

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
