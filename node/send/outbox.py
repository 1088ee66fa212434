"""The outbox sender: delivers written results to each destination, with retries and backoff.

Rows come from the index (written there in the same transaction that finished the job), so a
crash between writing and sending loses nothing: at restart the pending rows are simply sent.
Each attempt's DIMSE status is recorded; after ``send_max_attempts`` a row becomes dead (a dead
letter that ``retry`` resends).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from node.config import Destination, NodeConfig
from node.dicom.scu import store_files
from node.errors import SendError
from node.model.records import OutboxItem
from node.spool.index import Index

log = logging.getLogger(__name__)


def backoff_s(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` failures: exponential, capped."""
    return min(maximum, initial * (2 ** max(0, attempts - 1)))


class Sender:
    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self.destinations = {d.name: d for d in cfg.destinations}

    def poll(self) -> int:
        """Send everything that is due; return how many objects were acknowledged."""
        due = self.index.due_outbox()
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_destination[item.destination].append(item)
        sent = 0
        for name, items in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                for item in items:
                    self.index.mark_attempt_failed(item.id, f"destination {name!r} is no longer configured", retry_at=None)
                continue
            sent += self._send(destination, items)
        return sent

    def _retry_at(self, item: OutboxItem) -> float | None:
        attempts = item.attempts + 1
        if attempts >= self.cfg.send_max_attempts:
            return None
        return time.time() + backoff_s(attempts, self.cfg.send_backoff_initial_s, self.cfg.send_backoff_max_s)

    def _send(self, destination: Destination, items: list[OutboxItem]) -> int:
        missing = [i for i in items if not i.path.is_file()]
        for item in missing:
            self.index.mark_attempt_failed(item.id, f"result file {item.path} is missing", retry_at=None)
        items = [i for i in items if i.path.is_file()]
        if not items:
            return 0
        try:
            results = store_files(
                destination, [i.path for i in items], calling_aet=self.cfg.ae_title,
                timeout_s=self.cfg.send_timeout_s, tls=self.cfg.tls,
            )
        except (SendError, OSError) as exc:
            for item in items:
                retry_at = self._retry_at(item)
                self.index.mark_attempt_failed(item.id, str(exc), retry_at=retry_at)
            delay = "giving up" if retry_at is None else f"next try in {retry_at - time.time():.0f} s"
            log.warning("sending %d object(s) to %s failed (attempt %d): %s; %s",
                        len(items), destination, items[0].attempts + 1, exc, delay)
            return 0
        sent = 0
        for item, result in zip(items, results):
            if result.ok:
                self.index.mark_sent(item.id, result.description)
                sent += 1
                log.info("sent %s to %s: %s", item.sop_instance_uid, destination, result.description)
            else:
                retry_at = self._retry_at(item)
                self.index.mark_attempt_failed(item.id, result.description, retry_at=retry_at)
                log.warning("%s refused %s: %s (%s)", destination, item.sop_instance_uid, result.description,
                            "giving up" if retry_at is None else "will retry")
        return sent
