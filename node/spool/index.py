"""The index: SQLite in WAL mode. It and its parts (``node.spool.index_*``) hold the only SQL in the node.

One ``Index`` object per process; its methods are thread-safe (one connection behind a lock), which
suits the receiver's association threads. Worker processes open their own ``Index`` on the same file.

``Index`` is composed of one part per table, each a subclass of :class:`~node.spool.index_db.IndexDb`
(the connection, its lock and transactions, and the schema): instances (``index_instances``), series
(``index_series``), jobs (``index_jobs``), the outbox (``index_outbox``) and what retention asks
(``index_retention``: series usage, deletion, pending file deletions), the review gate
(``index_reviews``), and what the service's metrics and readiness checks ask (``index_counts``: rows per
state, destination reach, a write probe).
"""

from __future__ import annotations

from node.spool.index_completeness import CompletenessRows
from node.spool.index_counts import CountRows, DestinationReach
from node.spool.index_db import SCHEMA, IndexDb
from node.spool.index_instances import InstanceRows
from node.spool.index_jobs import JobRows
from node.spool.index_outbox import OutboxRows
from node.spool.index_qa import QaRows
from node.spool.index_retention import DeletedSeries, RetentionRows, SeriesUsage
from node.spool.index_reviews import ReviewRows
from node.spool.index_series import SeriesRows

__all__ = ["SCHEMA", "DeletedSeries", "DestinationReach", "Index", "IndexDb", "SeriesUsage"]


class Index(InstanceRows, SeriesRows, JobRows, OutboxRows, RetentionRows, CountRows, ReviewRows, CompletenessRows,
            QaRows):
    """Instances, series, jobs and the outbox, in one SQLite file."""
