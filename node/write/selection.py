"""A result narrowed to a site's or a destination's choice of structures (``[output] structures``; see
node/config_output.py for the design: one SEG and RTSTRUCT per distinct selection, each with its own UIDs).

A structure left out that a chosen one includes (the lungs within BODY) becomes part of the including
structure in the narrowed label volume, so the chosen structure's mask is the same as in the full result;
one that nothing chosen includes becomes background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from node.config_output import OutputPlan
from node.model.bundle import Label
from node.model.enums import SegType
from node.write.files import WrittenObject, write_results
from node.write.result import Result
from node.write.uids import ResultUids


def selection_key(structures: Iterable[str]) -> str:
    """What a selection adds to its job's key for its UIDs: the same names in any order give the same UIDs."""
    return "|structures=" + "\n".join(sorted(structures))


def chosen(labels: Iterable[Label], structures: Iterable[str] | None) -> list[Label]:
    """The labels a selection names, by label name or ROI name (before the site's renames); None: all."""
    if structures is None:
        return list(labels)
    names = set(structures)
    return [label for label in labels if label.name in names or label.structure_set_name in names]


def narrowed(result: Result, structures: Iterable[str] | None, uids: ResultUids) -> Result | None:
    """``result`` with only the structures a selection names (None: all), under ``uids``; None when it found none
    of them."""
    kept = chosen(result.found, structures)
    if not kept:
        return None
    if len(kept) == len(result.found):
        return dataclasses.replace(result, uids=uids)
    values = {label.value for label in kept}
    lookup = np.zeros(256, dtype=np.uint8)
    for value in values:
        lookup[value] = value
    merged: set[int] = set()  # kept structures that take a left-out one's pixels
    # a value left out goes to the innermost kept structure including it (fewest includes), else to background
    for label in sorted((lb for lb in result.bundle.labels if lb.value in values and lb.includes),
                        key=lambda lb: -len(lb.includes)):
        for value in label.includes:
            if value not in values:
                lookup[value] = label.value
                merged.add(label.value)
    labels = lookup[result.labels]
    keep_includes = {label.value: dataclasses.replace(label, includes=tuple(v for v in label.includes if v in values))
                     for label in result.bundle.labels if label.value in values}
    bundle = dataclasses.replace(result.bundle, labels=tuple(keep_includes.values()))
    # the outlines of a structure including none are unchanged; one including others may have gained their pixels
    outlines = {value: traced for value, traced in result.outlines.items()
                if value in values and not keep_includes[value].includes and value not in merged}
    return dataclasses.replace(result, labels=labels, bundle=bundle,
                               found=[keep_includes[label.value] for label in kept], uids=uids, outlines=outlines)


def write_selections(result: Result, out_dir: Path, plan: OutputPlan, key: str, *, write_seg: bool = True,
                     write_rtstruct: bool = True, seg_type: SegType = SegType.BINARY) -> list[WrittenObject]:
    """Write one SEG and RTSTRUCT per selection of ``plan``: the site's (under ``result.uids``), then each
    other one (under UIDs from ``key``, the job's key, and the selection). A selection that names none of the
    structures found writes nothing. Each object says which selection it holds and whether it is the site's."""
    objects: list[WrittenObject] = []
    for n, structures in enumerate((plan.structures, *plan.others)):
        uids = result.uids if n == 0 else ResultUids.for_job(key + selection_key(structures or ()))
        selected = narrowed(result, structures, uids)
        if selected is not None:
            objects += [dataclasses.replace(obj, structures=structures, site=n == 0)
                        for obj in write_results(selected, out_dir, write_seg=write_seg,
                                                 write_rtstruct=write_rtstruct, seg_type=seg_type)]
    return objects
