"""The node's error hierarchy.

Every error carries a sentence that names the bad value. ``Retryable`` errors may succeed when
tried again later (a destination that is down); ``Permanent`` ones will not (a series that cannot
form a volume), so a job that hits one ends failed with that sentence as its reason.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class Retryable(NodeError):
    """An error that may go away when the same step is tried again later."""


class Permanent(NodeError):
    """An error that trying again will not fix."""


class ConfigError(Permanent):
    """The configuration file or a command-line override is invalid."""


class BundleError(Permanent):
    """A model bundle's manifest or model file is invalid."""


class VolumeError(Permanent):
    """A series cannot be assembled into a volume (geometry, pixel data, transfer syntax)."""


class InferenceError(Permanent):
    """The engine failed on a volume."""


class WriteError(Permanent):
    """A DICOM-SEG or RTSTRUCT could not be built from a result."""


class SendError(Retryable):
    """A destination could not be reached or refused an object."""


class ListenError(Retryable):
    """The listening port cannot be bound (often still held by a previous instance)."""


class Declined(Permanent):
    """A bundle does not apply to this series (coverage, slice thickness, orientation, anatomy):
    the job ends declined with the reason, which is not a failure of the node."""


class NotFound(Permanent):
    """An operator named something the index does not hold (a job, a series)."""


class Conflict(Permanent):
    """An operator's request contradicts the state of what it names (approving a job already decided)."""


class Superseded(NodeError):
    """A worker of an earlier start of the service (an orphan of a killed one) tried to claim or end a job:
    a newer start owns the index and its jobs, so the worker writes nothing and exits."""
