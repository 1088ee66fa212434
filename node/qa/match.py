"""Pairing the clinician's ROIs with the node's structures by name.

Names are compared by :func:`node.config_qa.name_key` (case and punctuation ignored) after the alias table
maps each to our structure's name. Each of our structures takes at most one of their ROIs: the first, in
the edited set's order, whose name maps to it (a second one is left over, and so counts as added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.config_qa import name_key


@dataclass(frozen=True)
class Pairing:
    pairs: list[tuple[str, str]]  # (our name, their name)
    deleted: list[str]  # ours with no ROI of theirs
    added: list[str]  # theirs with no structure of ours


def canonical(name: str, aliases: dict[str, str]) -> str:
    """The normalised key a name is matched by: our structure's, when the alias table knows the name."""
    key = name_key(name)
    return name_key(aliases.get(key, name))


def pair_by_name(ours: Sequence[str], theirs: Sequence[str], aliases: dict[str, str]) -> Pairing:
    """Pair ``ours`` with ``theirs`` (ROI names) through ``aliases`` (:meth:`QaConfig.alias_table`)."""
    wanted = {canonical(name, aliases): name for name in reversed(ours)}  # the first of ours wins a key
    pairs: list[tuple[str, str]] = []
    taken: set[str] = set()
    added: list[str] = []
    for name in theirs:
        key = canonical(name, aliases)
        if key in wanted and key not in taken:
            taken.add(key)
            pairs.append((wanted[key], name))
        else:
            added.append(name)
    deleted = [name for name in ours if canonical(name, aliases) not in taken]
    return Pairing(pairs, deleted, added)
