"""The registry of transports: a destination's ``type`` names the one that delivers to it.

Adding a transport is one module (a class with the :class:`~node.send.transports.base.Transport`
shape, made from the node's configuration) plus one entry in :data:`TRANSPORTS`.
"""

from __future__ import annotations

from collections.abc import Callable

from node.config import NodeConfig
from node.model.enums import DestinationType
from node.send.transports.base import Transport
from node.send.transports.dicom import CStoreTransport
from node.send.transports.dicomweb import StowTransport

TRANSPORTS: dict[DestinationType, Callable[[NodeConfig], Transport]] = {
    DestinationType.DICOM: CStoreTransport,
    DestinationType.DICOMWEB: StowTransport,
}


def make_transports(cfg: NodeConfig) -> dict[DestinationType, Transport]:
    """One transport of each registered type, configured from ``cfg``."""
    return {kind: make(cfg) for kind, make in TRANSPORTS.items()}
