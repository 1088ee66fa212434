"""Which destinations receive which result objects of a finished job, and the sentence saying so.

Each destination's ``route`` (objects, bundles, conditions on the source series; node.model.routing)
is asked for each object; the outbox rows record the route that took them, and the job's note says
where its results went and why any destination took nothing ("sent nowhere: …" when none did).

Structure selections (``[output] structures``, a destination's own ``structures``; node/config_output.py):
a job writes one SEG and RTSTRUCT per distinct selection. A destination naming its own selection takes the
objects written for it; the others take the site's. Previews show the whole result and go wherever a
route takes previews, but not to a destination none of whose structures was found.
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


def for_destination(dest: Destination, objects: list[WrittenObject]) -> list[WrittenObject]:
    """The objects written for ``dest``'s structure selection (its own ``structures``, else the site's); previews."""
    wanted = None if dest.structures is None else frozenset(dest.structures)

    def fits(obj: WrittenObject) -> bool:
        if object_kind(obj) is ObjectKind.SC:
            return True
        if wanted is None:
            return obj.site
        return obj.structures is not None and frozenset(obj.structures) == wanted

    mine = [obj for obj in objects if fits(obj)]
    # a destination none of whose structures was found gets no preview of the others either
    return mine if any(object_kind(obj) is not ObjectKind.SC for obj in mine) else []


def route_results(destinations: tuple[Destination, ...], bundle_name: str, objects: list[WrittenObject],
                  facts: SourceFacts) -> RoutedResults:
    outbox: list[tuple[str, Path, str, str, str]] = []
    sent: list[str] = []
    refused: list[str] = []
    for dest in destinations:
        mine = for_destination(dest, objects)
        kinds = [object_kind(obj) for obj in mine]
        taken, why_not = dest.route.split(kinds, bundle_name, facts)
        if dest.structures is not None and not any(kind is not ObjectKind.SC for kind in kinds):
            why_not = [f"none of its structures ({', '.join(dest.structures)}) was found", *why_not]
        outbox += [(dest.name, obj.path, obj.sop_instance_uid, obj.sop_class_uid, dest.route.describe())
                   for obj, kind in zip(mine, kinds, strict=True) if kind in taken]
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
