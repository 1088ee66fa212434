"""Decides when a series has finished arriving and turns it into jobs.

A series is stable after ``quiet_period_s`` without a new instance, or ``release_settle_s`` after
the association that sent it was released (whichever comes first). New instances of a series that
was already dispatched reopen it, and the next settle queues fresh jobs. A series some of whose instances
were refused for lack of resources (0xA700) is incomplete: it waits until an association sends it without
refusals, or at most ``REFUSED_HOLD_S``, instead of failing as "slices are missing".

The node's ``[[rules]]`` decide first (node.model.routing, first match wins): an ``ignore`` rule leaves
the series alone with the rule named in its note; a ``segment`` rule may narrow the bundles and gives
the jobs its priority. Then the bundles that apply in kind (modality, SOP class, slices; for an MR series and
a bundle with ``[select.mr]`` rules, the MR header facts of one of its files) are queued.
"""

from __future__ import annotations

import logging
import time

from node.assemble.completeness import Completeness, Verdict
from node.assemble.select import MrFacts, SeriesFacts, mr_facts, select_bundles
from node.model.bundle import Bundle
from node.model.records import SeriesRecord, SeriesState
from node.model.routing import Rule, SourceFacts, first_rule
from node.spool.index import Index

log = logging.getLogger(__name__)

#: Series of these modalities are structure sets (RTSTRUCT) or segmentations (SEG) coming back: a qa job
#: compares them with the node's own result for the images they reference.
EDITED_SET_MODALITIES = frozenset({"RTSTRUCT", "SEG"})

#: How long a series with instances refused for resources waits for the sender to send them again; after
#: that it is segmented as it is (the sender gave up on them).
REFUSED_HOLD_S = 3600.0


class Assembler:
    def __init__(self, index: Index, bundles: list[Bundle], rules: tuple[Rule, ...] = (),
                 completeness: Completeness | None = None) -> None:
        self.index = index
        self.bundles = bundles
        self.rules = rules
        self.completeness = completeness

    def _mr_facts(self, series: SeriesRecord) -> MrFacts | None:
        """The MR header facts of an MR series when a bundle has ``[select.mr]`` rules (one file's header)."""
        if series.modality != "MR" or not any(b.select.mr is not None for b in self.bundles):
            return None
        return mr_facts(self.index.instance_paths(series.series_uid))

    def poll(self, now: float | None = None) -> int:
        """Dispatch every settled series (with ``[completeness]``: every series the source's count says is
        complete, and none it says is short); return how many series were settled."""
        now = time.time() if now is None else now
        settled = self.index.settled_series(now, refused_hold_s=REFUSED_HOLD_S)
        if self.completeness is None:
            for series in settled:
                self._settle(series)
            return len(settled)
        return self._poll_counted(self.completeness, {s.series_uid for s in settled}, now)

    def _poll_counted(self, completeness: Completeness, settled: set[str], now: float) -> int:
        quiet = self.index.quiet_series(completeness.settings.check_after_s, now)
        done = 0
        for series, forced in quiet:
            if forced:
                completeness.forget(series.series_uid)
                self._settle(series, "declared complete by an operator (dicom-seg-node complete)")
                done += 1
                continue
            decision = completeness.decide(series, now) if completeness.due(series, now) else \
                completeness.last(series.series_uid)
            if decision is None or decision.verdict is Verdict.QUIET:
                if series.series_uid in settled:
                    completeness.forget(series.series_uid)
                    self._settle(series, decision.note if decision is not None else "")
                    done += 1
            elif decision.verdict is Verdict.COMPLETE:
                self._settle(series, decision.note)
                done += 1
            elif decision.verdict is Verdict.IGNORE:
                self.index.set_series_state(series.series_uid, SeriesState.IGNORED, decision.note)
                log.warning("series %s left alone: %s", series.series_uid, decision.note)
                done += 1
            elif series.note != decision.note:  # WAIT: the count and how long it has waited, for status
                self.index.note_series(series.series_uid, decision.note)
                log.info("series %s %s", series.series_uid, decision.note)
        return done

    def _settle(self, series: SeriesRecord, completeness_note: str = "") -> None:
        decision = first_rule(self.rules, SourceFacts.of(series))
        if decision.ignored:
            self.index.set_series_state(series.series_uid, SeriesState.IGNORED, decision.reason)
            log.info("series %s (%s from %s, %d instances) left alone: %s", series.series_uid, series.modality,
                     series.calling_ae or "?", series.instance_count, decision.reason)
            return
        if series.modality in EDITED_SET_MODALITIES:  # a structure set back, maybe edited: edit QA (node/jobs/qa.py)
            job = self.index.dispatch_qa(series.series_uid, "structure set: compared with the node's result (edit QA)")
            log.info("series %s (%s from %s) stable: queued qa job %d", series.series_uid, series.modality,
                     series.calling_ae or "?", job)
            return
        facts = SeriesFacts(series.modality, series.sop_class_uid, series.instance_count, mr=self._mr_facts(series))
        chosen, reasons = select_bundles([b for b in self.bundles if decision.allows(b.name)], facts)
        reasons = [decision.reason, *reasons] if decision.rule is not None else reasons
        if not chosen:
            note = "no model applies: " + "; ".join(reasons)
            self.index.set_series_state(series.series_uid, SeriesState.IGNORED, note)
            log.info("series %s (%s, %d instances) left alone: %s",
                     series.series_uid, series.modality, series.instance_count, note)
            return
        ids = self.index.dispatch(series.series_uid, [b.id for b in chosen],
                                  note="; ".join(filter(None, [completeness_note, *reasons])),
                                  priority=decision.priority)
        log.info("series %s stable with %d instances: queued job(s) %s for %s%s",
                 series.series_uid, series.instance_count, ids, ", ".join(b.id for b in chosen),
                 f" ({decision.reason})" if decision.rule is not None else "")
