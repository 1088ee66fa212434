"""Decides when a series has finished arriving and turns it into jobs.

A series is stable after ``quiet_period_s`` without a new instance, or ``release_settle_s`` after
the association that sent it was released (whichever comes first). New instances of a series that
was already dispatched reopen it, and the next settle queues fresh jobs.
"""

from __future__ import annotations

import logging

from node.assemble.select import SeriesFacts, select_bundles
from node.model.bundle import Bundle
from node.model.records import SeriesState
from node.spool.index import Index

log = logging.getLogger(__name__)


class Assembler:
    def __init__(self, index: Index, bundles: list[Bundle]) -> None:
        self.index = index
        self.bundles = bundles

    def poll(self) -> int:
        """Dispatch every settled series; return how many series were settled."""
        settled = self.index.settled_series()
        for series in settled:
            facts = SeriesFacts(series.modality, series.sop_class_uid, series.instance_count)
            chosen, reasons = select_bundles(self.bundles, facts)
            if not chosen:
                note = "no model applies: " + "; ".join(reasons)
                self.index.set_series_state(series.series_uid, SeriesState.IGNORED, note)
                log.info("series %s (%s, %d instances) left alone: %s",
                         series.series_uid, series.modality, series.instance_count, note)
                continue
            ids = self.index.dispatch(series.series_uid, [b.id for b in chosen], note="; ".join(reasons))
            log.info("series %s stable with %d instances: queued job(s) %s for %s",
                     series.series_uid, series.instance_count, ids, ", ".join(b.id for b in chosen))
        return len(settled)
