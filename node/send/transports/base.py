"""What a transport is: the seam every way of delivering results plugs into.

The sender (:mod:`node.send.outbox`) owns retries, backoff and dead letters; a transport only delivers
a batch of files to one destination and says, per object, whether it was stored, whether trying again
later may help (a peer out of resources, no answer) or whether it will not (the peer refuses the object
for what it is), in which case the object is dead-lettered at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.config import Destination
from node.model.enums import DestinationType


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"  # the peer says it stored the object
    RETRYABLE = "retryable"  # not stored; the same object may be stored later (backoff, then retry)
    PERMANENT = "permanent"  # not stored, and retrying the same object cannot help: dead letter now


@dataclass(frozen=True)
class ObjectOutcome:
    path: Path
    outcome: Outcome
    description: str  # what the peer answered, recorded as the outbox row's last status

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED


class Transport(Protocol):
    """Delivers files to destinations of one :class:`~node.model.enums.DestinationType`."""

    type: DestinationType

    def send(self, destination: Destination, paths: list[Path]) -> list[ObjectOutcome]:
        """One outcome per path, in order. Raises :class:`~node.errors.SendError` when the destination
        cannot be reached at all (every object is then retried later)."""
        ...
