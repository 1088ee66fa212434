"""Completeness from the source's own counts (``[completeness]``): is every instance of a series here?

A quiet period alone routes half-sent series when a modality pauses. With ``completeness.source`` naming a
destination that holds the full series (a PACS), a series that has had no new instance for
``check_after_s`` is counted there (C-FIND at SERIES level, ``NumberOfSeriesRelatedInstances``; QIDO-RS for
a DICOMweb source):

- as many here as there (or more) → complete now, without waiting out the rest of the quiet period;
- fewer → it waits, counted again every ``recheck_s``, even past the quiet period, up to ``max_wait_s``;
  then ``on_timeout`` segments what arrived ("proceed") or leaves the series alone ("ignore");
- the source does not know the series, or cannot be asked → the quiet period decides, as without a source.

Each decision and its counts go into the series' note (``status``, the web UI). ``dicom-seg-node complete
SERIES_UID`` declares a series complete, counts or not.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from node.config import CompletenessConfig, Destination, NodeConfig
from node.dicom.find import find_series_count
from node.dicom.qido import qido_series_count
from node.errors import SendError
from node.model.enums import DestinationType, TimeoutAction
from node.model.records import SeriesRecord

log = logging.getLogger(__name__)

#: (study UID, series UID) → the source's instance count (None: it does not hold the series).
Counter = Callable[[str, str], "int | None"]


class Verdict(enum.StrEnum):
    COMPLETE = "complete"  # dispatch now
    WAIT = "wait"  # not yet: fewer here than at the source
    QUIET = "quiet"  # the counts cannot say: the quiet period decides
    IGNORE = "ignore"  # waited max_wait_s; on_timeout = "ignore"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    note: str


def counter_for(cfg: NodeConfig) -> Counter | None:
    """How to count a series at ``completeness.source`` (None when no source is configured)."""
    source = next((d for d in cfg.destinations if d.name == cfg.completeness.source), None)
    if source is None:
        return None
    return _qido_counter(source, cfg.send_timeout_s) if source.type is DestinationType.DICOMWEB else \
        _find_counter(source, cfg)


def _find_counter(source: Destination, cfg: NodeConfig) -> Counter:
    def count(study_uid: str, series_uid: str) -> int | None:
        return find_series_count(source, study_uid, series_uid, calling_aet=cfg.ae_title,
                                 timeout_s=cfg.send_timeout_s, tls=cfg.tls)
    return count


def _qido_counter(source: Destination, timeout_s: float) -> Counter:
    def count(study_uid: str, series_uid: str) -> int | None:
        assert source.web is not None
        with source.web.client(timeout_s) as client:
            return qido_series_count(client, source.web.url, study_uid, series_uid)
    return count


class Completeness:
    """Counts series against the source and remembers, per series, since when it waits and when it was asked."""

    def __init__(self, settings: CompletenessConfig, count: Counter) -> None:
        self.settings = settings
        self.count = count
        self._waiting_since: dict[str, float] = {}
        self._asked_at: dict[str, float] = {}
        self._last: dict[str, Decision] = {}

    def last(self, series_uid: str) -> Decision | None:
        """The decision of the last count of this series (None: never counted, or since forgotten)."""
        return self._last.get(series_uid)

    def due(self, series: SeriesRecord, now: float) -> bool:
        """Whether to count ``series`` now (not more often than every ``recheck_s``)."""
        return now - self._asked_at.get(series.series_uid, 0.0) >= self.settings.recheck_s

    def decide(self, series: SeriesRecord, now: float | None = None) -> Decision:
        """Count ``series`` at the source now and say what to do with it."""
        decision = self._decide(series, time.time() if now is None else now)
        if decision.verdict in (Verdict.WAIT, Verdict.QUIET):
            self._last[series.series_uid] = decision
        return decision

    def _decide(self, series: SeriesRecord, now: float) -> Decision:
        uid, source = series.series_uid, self.settings.source
        self._asked_at[uid] = now
        try:
            expected = self.count(series.study_uid, uid)
        except (SendError, OSError, ValueError) as exc:
            log.warning("could not count series %s at %s: %s", uid, source, exc)
            return Decision(Verdict.QUIET, f"{source} could not be asked for the count ({exc}); the quiet period "
                                           "decides")
        received = series.instance_count
        if expected is None:
            return Decision(Verdict.QUIET, f"{source} does not hold this series; the quiet period decides")
        if received >= expected:
            self.forget(uid)
            return Decision(Verdict.COMPLETE, f"complete: {received} of {expected} instances per {source}")
        since = self._waiting_since.setdefault(uid, now)
        waited = now - since
        if waited < self.settings.max_wait_s:
            return Decision(Verdict.WAIT, f"waiting: {received} of {expected} instances per {source}, for "
                                          f"{waited:.0f} of at most {self.settings.max_wait_s:.0f} s")
        self.forget(uid)
        if self.settings.on_timeout is TimeoutAction.IGNORE:
            return Decision(Verdict.IGNORE, f"incomplete: {received} of {expected} instances per {source} after "
                                            f"{self.settings.max_wait_s:.0f} s; left alone (on_timeout = ignore)")
        return Decision(Verdict.COMPLETE, f"incomplete: {received} of {expected} instances per {source} after "
                                          f"{self.settings.max_wait_s:.0f} s; segmented as it is (on_timeout = "
                                          "proceed)")

    def forget(self, series_uid: str) -> None:
        self._waiting_since.pop(series_uid, None)
        self._asked_at.pop(series_uid, None)
        self._last.pop(series_uid, None)
