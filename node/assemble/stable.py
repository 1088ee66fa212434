"""Decides when a series has finished arriving and turns it into jobs.

A series is stable after ``quiet_period_s`` without a new instance, or ``release_settle_s`` after
the association that sent it was released (whichever comes first). New instances of a series that
was already dispatched reopen it, and the next settle queues fresh jobs.

The node's ``[[rules]]`` decide first (node.model.routing, first match wins): an ``ignore`` rule leaves
the series alone with the rule named in its note; a ``segment`` rule may narrow the bundles and gives
the jobs its priority. Then the bundles that apply in kind (modality, SOP class, slices) are queued.
"""

from __future__ import annotations

import logging

from node.assemble.select import SeriesFacts, select_bundles
from node.model.bundle import Bundle
from node.model.records import SeriesRecord, SeriesState
from node.model.routing import Rule, SourceFacts, first_rule
from node.spool.index import Index

log = logging.getLogger(__name__)


class Assembler:
    def __init__(self, index: Index, bundles: list[Bundle], rules: tuple[Rule, ...] = ()) -> None:
        self.index = index
        self.bundles = bundles
        self.rules = rules

    def poll(self) -> int:
        """Dispatch every settled series; return how many series were settled."""
        settled = self.index.settled_series()
        for series in settled:
            self._settle(series)
        return len(settled)

    def _settle(self, series: SeriesRecord) -> None:
        decision = first_rule(self.rules, SourceFacts.of(series))
        if decision.ignored:
            self.index.set_series_state(series.series_uid, SeriesState.IGNORED, decision.reason)
            log.info("series %s (%s from %s, %d instances) left alone: %s", series.series_uid, series.modality,
                     series.calling_ae or "?", series.instance_count, decision.reason)
            return
        facts = SeriesFacts(series.modality, series.sop_class_uid, series.instance_count)
        chosen, reasons = select_bundles([b for b in self.bundles if decision.allows(b.name)], facts)
        reasons = [decision.reason, *reasons] if decision.rule is not None else reasons
        if not chosen:
            note = "no model applies: " + "; ".join(reasons)
            self.index.set_series_state(series.series_uid, SeriesState.IGNORED, note)
            log.info("series %s (%s, %d instances) left alone: %s",
                     series.series_uid, series.modality, series.instance_count, note)
            return
        ids = self.index.dispatch(series.series_uid, [b.id for b in chosen], note="; ".join(reasons),
                                  priority=decision.priority)
        log.info("series %s stable with %d instances: queued job(s) %s for %s%s",
                 series.series_uid, series.instance_count, ids, ", ".join(b.id for b in chosen),
                 f" ({decision.reason})" if decision.rule is not None else "")
