"""``[output]`` structure selection and RTSTRUCT ROI renames: which structures a site sends, to whom, under which names.

```toml
[output]
structures = ["BODY", "Liver", "SpinalCord", "Kidney_L", "Kidney_R"]   # default: every structure
[output.roi_names]              # the structure's ROI name (TG-263) or label name = the department's template name
SpinalCord = "Cord"
Kidney_L = "L Kidney"

[[destinations]]                # the TPS gets only these OARs; destinations without `structures` get [output]'s
name = "tps"
structures = ["SpinalCord", "Kidney_L", "Kidney_R"]
```

A name in a selection is a structure's label name (the SEG's segment label, e.g. ``spinal_cord``) or its
RTSTRUCT ROI name before renaming (``Label.roi_name``: TG-263 for imported TotalSegmentator bundles,
``SpinalCord``). Names are compared exactly.

Design: the selection is made at write time, and one SEG and one RTSTRUCT are written per distinct selection,
each with its own UIDs (derived from the job's and the selection's names, so a rerun yields the same ones).
Selecting at send time is not possible: a DICOM object cannot be sent in part, and rewriting one per
destination at send time would give one study two objects with the same UID and different content. Written
at job time, each object is durable, verifiable and resent as it is like any other; the site's selection
(``[output] structures``, everything by default) is always written; a destination naming its own selection
gets the objects of that one. The cost is a second write for each distinct destination selection, which is
small next to the inference. A structure left out that another structure includes (the lungs within BODY)
stays part of the including structure's mask.

A name in ``structures`` or ``[output.roi_names]`` that no installed bundle produces is an error at start
(:func:`check_output_names`), naming the unknown names and the available ones: a misspelt OAR silently
missing from the TPS is worse than a node that does not start. A bundle installed later that adds the name
only needs a restart.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from node.errors import ConfigError
from node.model.bundle import Bundle, Label
from node.model.tables import Table

#: ROI Name is LO: at most 64 characters, no backslash.
MAX_ROI_NAME = 64


@dataclass(frozen=True)
class OutputSelection:
    """``[output] structures`` and ``[output.roi_names]``."""

    structures: tuple[str, ...] | None = None  # None: every structure
    roi_names: tuple[tuple[str, str], ...] = ()  # (structure's ROI name or label name, the site's ROI name)


@dataclass(frozen=True)
class OutputPlan:
    """What one job writes: the site's selection, each other selection a destination names, and the ROI renames."""

    structures: tuple[str, ...] | None = None
    others: tuple[tuple[str, ...], ...] = ()
    roi_names: tuple[tuple[str, str], ...] = ()


def parse_structures(table: Table, key: str = "structures") -> tuple[str, ...] | None:
    """A selection: a non-empty list of distinct structure names, or None when the key is absent."""
    if key not in table:
        table.get(key, list, None)  # asked, so not reported as unknown
        return None
    names = table.strings(key)
    if not names:
        raise table.fail(key, "is empty, which would send no structure; leave it out to send every structure")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise table.fail(key, f"names {', '.join(repr(n) for n in doubled)} more than once; expected distinct names")
    return names


def parse_output_selection(output: Table) -> OutputSelection:
    """``[output] structures`` and ``[output.roi_names]`` (the other ``[output]`` keys are read in node.config)."""
    renames = output.table("roi_names")
    pairs = []
    for name in sorted(renames.data):
        new = renames.get(name, str, "")
        if not new.strip() or len(new) > MAX_ROI_NAME or "\\" in new or not new.isprintable():
            raise renames.fail(name, f"is {new!r}; expected an ROI name of 1-{MAX_ROI_NAME} printable characters "
                                     "without a backslash")
        pairs.append((name, new))
    targets = [new for _, new in pairs]
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    if doubled:
        raise ConfigError(f"{output.source}: table '{output.prefix}roi_names' gives several structures the ROI name "
                          f"{', '.join(repr(t) for t in doubled)}; expected one structure per ROI name")
    return OutputSelection(parse_structures(output), tuple(pairs))


def output_plan(selection: OutputSelection, destination_structures: Iterable[tuple[str, ...] | None]) -> OutputPlan:
    """The selections a job writes: the site's, and each distinct other one a destination names."""
    site = None if selection.structures is None else frozenset(selection.structures)
    others: dict[frozenset[str], tuple[str, ...]] = {}
    for names in destination_structures:
        if names is not None and frozenset(names) != site:
            others.setdefault(frozenset(names), names)
    return OutputPlan(selection.structures, tuple(others.values()), selection.roi_names)


def structure_names(label: Label) -> tuple[str, ...]:
    """The names a selection or a rename may use for ``label``: its ROI name (before renaming) and its label name."""
    return tuple(dict.fromkeys((label.structure_set_name, label.name)))


def check_output_names(source: str, selection: OutputSelection,
                       destinations: Iterable[tuple[str, tuple[str, ...] | None]], bundles: Iterable[Bundle]) -> None:
    """Every structure name in ``[output]`` and in a destination's ``structures`` must be one an installed bundle
    produces (checked at start, with the bundles); ``destinations``: (name, structures) of each."""
    available: dict[str, None] = {}
    for bundle in bundles:
        for label in bundle.labels:
            available.update(dict.fromkeys(structure_names(label)))
    named = [("output.structures", selection.structures or ()),
             ("output.roi_names", tuple(name for name, _ in selection.roi_names))]
    named += [(f"destinations '{name}' structures", structures or ()) for name, structures in destinations]
    for where, names in named:
        unknown = [n for n in names if n not in available]
        if unknown:
            hints = [f"{n!r} → {close[0]!r}" for n in unknown
                     if (close := difflib.get_close_matches(n, list(available), n=1, cutoff=0.75))]
            raise ConfigError(
                f"{source}: key '{where}' names {', '.join(repr(n) for n in unknown)}, which no installed bundle "
                f"produces{' (did you mean ' + ', '.join(hints) + '?)' if hints else ''}; the structures available "
                f"are: {', '.join(available) or 'none'}")

