"""Which destinations receive which result objects of a finished job, and the sentence saying so.

Each destination's ``route`` (objects, bundles, conditions on the source series; node.model.routing)
is asked for each object; the outbox rows record the route that took them, and the job's note says
where its results went and why any destination took nothing ("sent nowhere: …" when none did).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.config import Destination, NodeConfig
from node.model.enums import ObjectKind
from node.model.routing import SourceFacts
from node.write.files import WrittenObject


@dataclass(frozen=True)
class RoutedResults:
    #: (destination name, file, SOP Instance UID, SOP Class UID, the route that took it) per outbox row
    outbox: list[tuple[str, Path, str, str, str]]
    note: str


def held_destinations(cfg: NodeConfig, bundle_name: str, outbox: list[tuple[str, Path, str, str, str]]) -> set[str]:
    """The destinations among ``outbox``'s whose copies wait for a reviewer: the destination has ``review = true``,
    or the bundle has (``[bundles.NAME] review = true``)."""
    by_name = {d.name: d for d in cfg.destinations}
    return {name for name, *_ in outbox if name in by_name and cfg.held_for_review(by_name[name], bundle_name)}


def object_kind(obj: WrittenObject) -> ObjectKind:
    return ObjectKind.SC if obj.kind == "PREVIEW" else ObjectKind(obj.kind)


def route_results(destinations: tuple[Destination, ...], bundle_name: str, objects: list[WrittenObject],
                  facts: SourceFacts) -> RoutedResults:
    outbox: list[tuple[str, Path, str, str, str]] = []
    sent: list[str] = []
    refused: list[str] = []
    kinds = [object_kind(obj) for obj in objects]
    for dest in destinations:
        taken, why_not = dest.route.split(kinds, bundle_name, facts)
        outbox += [(dest.name, obj.path, obj.sop_instance_uid, obj.sop_class_uid, dest.route.describe())
                   for obj, kind in zip(objects, kinds, strict=True) if kind in taken]
        if taken:
            sent.append(f"{dest.name} ({', '.join(str(k) for k in taken)})")
        else:
            refused.append(f"{dest.name}: {'; '.join(why_not) or 'no objects'}")
    if not destinations:
        note = "no destination is configured"
    elif not sent:
        note = "sent nowhere: " + " | ".join(refused)
    else:
        note = "sent to " + ", ".join(sent) + (("; not to " + " | ".join(refused)) if refused else "")
    return RoutedResults(outbox, note)
