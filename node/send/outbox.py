"""The outbox sender: delivers written results to each destination, with retries and backoff.

Rows come from the index (written there in the same transaction that finished the job), so a
crash between writing and sending loses nothing: at restart the pending rows are simply sent.
Each attempt's status (DIMSE, or whatever the destination's transport reports) is recorded; after
``send_max_attempts``, or at once when the transport says retrying cannot help, a row becomes dead (a
dead letter that ``retry`` resends). Delivery itself is the transport's (node/send/transports), chosen
by the destination's ``type``: retries, backoff and dead letters are the same for every transport. A
destination with ``verify = "find"`` is asked afterwards whether it holds what it acknowledged
(node.send.verify).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from node import telemetry
from node.config import Destination, NodeConfig
from node.errors import SendError
from node.model.records import OutboxItem
from node.send.transports.base import Outcome, Transport
from node.send.transports.registry import make_transports
from node.send.verify import Verifier
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
        self.transports = make_transports(cfg)
        self.verifier = Verifier(cfg, index)

    def _transport(self, destination: Destination) -> Transport:
        transport = self.transports.get(destination.type)
        if transport is None:
            raise SendError(f"destination {destination.name!r} has type {str(destination.type)!r}, "
                            f"for which no transport is registered")
        return transport

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
                    self._failed(item, name, f"destination {name!r} is no longer configured", retry_at=None)
                continue
            sent += self._send(destination, items)
        self.verifier.poll()
        return sent

    def _failed(self, item: OutboxItem, destination: str, status: str, *, retry_at: float | None) -> None:
        """Record a failed attempt (``retry_at=None``: a dead letter) in the index and the metrics."""
        self.index.mark_attempt_failed(item.id, status, retry_at=retry_at)
        telemetry.result_failed(destination, dead=retry_at is None)

    def _retry_at(self, item: OutboxItem) -> float | None:
        attempts = item.attempts + 1
        if attempts >= self.cfg.send_max_attempts:
            return None
        return time.time() + backoff_s(attempts, self.cfg.send_backoff_initial_s, self.cfg.send_backoff_max_s)

    def _send(self, destination: Destination, items: list[OutboxItem]) -> int:
        missing = [i for i in items if not i.path.is_file()]
        for item in missing:
            self._failed(item, destination.name, f"result file {item.path} is missing", retry_at=None)
        items = [i for i in items if i.path.is_file()]
        if not items:
            return 0
        try:
            with telemetry.send_timer(destination.name):
                results = self._transport(destination).send(destination, [i.path for i in items])
        except (SendError, OSError) as exc:
            for item in items:
                retry_at = self._retry_at(item)
                self._failed(item, destination.name, str(exc), retry_at=retry_at)
            delay = "giving up" if retry_at is None else f"next try in {retry_at - time.time():.0f} s"
            log.warning("sending %d object(s) to %s failed (attempt %d): %s; %s",
                        len(items), destination, items[0].attempts + 1, exc, delay)
            return 0
        sent = 0
        for item, result in zip(items, results, strict=True):
            if result.outcome is Outcome.DELIVERED:
                self.index.mark_sent(item.id, result.description)
                telemetry.result_sent(destination.name)
                sent += 1
                log.info("sent %s to %s: %s", item.sop_instance_uid, destination, result.description)
            else:
                retry_at = self._retry_at(item) if result.outcome is Outcome.RETRYABLE else None
                self._failed(item, destination.name, result.description, retry_at=retry_at)
                log.warning("%s refused %s: %s (%s)", destination, item.sop_instance_uid, result.description,
                            "giving up" if retry_at is None else "will retry")
        return sent
