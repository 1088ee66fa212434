"""The metrics computed at each scrape: what the index holds, the state directory's free space, the
engine of each bundle and the node itself.

:class:`IndexCollector` is registered next to prometheus_client's ``MultiProcessCollector`` in the
registry ``/metrics`` is served from (``node.service.http``). It reads the index on the HTTP thread's
own ``Index`` (never the receiver's, whose lock is taken for every instance received).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from node import __version__
from node.config import NodeConfig
from node.model.records import JobState, OutboxState, SeriesState
from node.service.readiness import EngineReports, engines_by_bundle
from node.spool.index import Index
from node.spool.queries import review_queue

log = logging.getLogger(__name__)


class IndexCollector:
    """A prometheus_client collector (``collect()``) over the index and the service's facts."""

    def __init__(self, cfg: NodeConfig, index: Index, bundles: Sequence[str], reports: EngineReports) -> None:
        self.cfg = cfg
        self.index = index
        self.bundles = list(bundles)
        self.reports = reports

    def collect(self) -> list[Metric]:
        metrics = [*self._index_metrics(), self._free_disk(), *self._info()]
        return metrics

    def _index_metrics(self) -> list[Metric]:
        up = GaugeMetricFamily("dicomseg_index_up", "1 when the index could be read for this scrape, else 0")
        try:
            metrics = self._read_index(time.time())
        except sqlite3.Error as exc:
            log.warning("metrics: the index could not be read: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *metrics]

    def _read_index(self, now: float) -> list[Metric]:
        series = GaugeMetricFamily("dicomseg_series", "Series in the index, per state", labels=["state"])
        for series_state, n in ({s: 0 for s in SeriesState} | self.index.series_counts()).items():
            series.add_metric([series_state.value], n)
        jobs = GaugeMetricFamily("dicomseg_jobs", "Jobs in the index, per bundle and state", labels=["bundle", "state"])
        job_counts = {(b, s): 0 for b in self.bundles for s in JobState} | self.index.job_counts()
        for (bundle, job_state), n in sorted(job_counts.items()):
            jobs.add_metric([bundle, job_state.value], n)
        depth = GaugeMetricFamily("dicomseg_job_queue_depth", "Jobs queued, waiting for a worker")
        depth.add_metric([], sum(n for (_, s), n in job_counts.items() if s is JobState.QUEUED))
        oldest = self.index.oldest_queued_job_created()
        age = GaugeMetricFamily("dicomseg_job_queue_oldest_age_seconds",
                                "Seconds the longest-waiting queued job has waited (0 when none is queued)")
        age.add_metric([], max(0.0, now - oldest) if oldest is not None else 0.0)
        outbox = GaugeMetricFamily("dicomseg_outbox_items", "Result objects in the outbox, per destination and state",
                                   labels=["destination", "state"])
        outbox_counts = {(d.name, s): 0 for d in self.cfg.destinations for s in OutboxState}
        for (destination, outbox_state), n in sorted((outbox_counts | self.index.outbox_counts()).items()):
            outbox.add_metric([destination, outbox_state.value], n)
        spool = GaugeMetricFamily("dicomseg_spool_bytes", "Bytes of the received instances in the spool (as indexed)")
        spool.add_metric([], self.index.spool_bytes())
        return [series, jobs, depth, age, outbox, spool, *self._review_metrics(now)]

    def _review_metrics(self, now: float) -> list[Metric]:
        queue = review_queue(self.index, now)
        awaiting = GaugeMetricFamily("dicomseg_review_awaiting", "Jobs whose results are held for a reviewer")
        awaiting.add_metric([], len(queue.jobs))
        oldest = GaugeMetricFamily("dicomseg_review_oldest_age_seconds",
                                   "Seconds the longest-waiting result held for review has waited (0 when none)")
        oldest.add_metric([], queue.oldest_age_s or 0.0)
        decisions = CounterMetricFamily("dicomseg_review_decisions", "Review decisions recorded, per decision",
                                        labels=["decision"])
        for decision, n in self.index.review_counts().items():
            decisions.add_metric([decision.value], n)
        return [awaiting, oldest, decisions]

    def _free_disk(self) -> Metric:
        free = GaugeMetricFamily("dicomseg_state_dir_free_bytes", "Bytes free on the state directory's file system")
        free.add_metric([], shutil.disk_usage(self.cfg.state_dir).free)
        return free

    def _info(self) -> list[Metric]:
        engines = InfoMetricFamily("dicomseg_engine", "The engine each bundle runs on ('failed': none could be "
                                   "loaded), as the workers reported", labels=["bundle"])
        reports = self.reports()
        failed = {b for r in reports.values() for b in r.failed}
        loaded = engines_by_bundle(reports)
        for bundle in sorted(set(loaded) | failed):
            for engine in sorted(loaded.get(bundle, set()) | ({"failed"} if bundle in failed else set())):
                engines.add_metric([bundle], {"engine": engine})
        node = InfoMetricFamily("dicomseg_node", "The node's version and AE title")
        node.add_metric([], {"version": __version__, "ae_title": self.cfg.ae_title})
        return [engines, node]
