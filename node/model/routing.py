"""Routing: which series are segmented (node-level rules) and which results go to which destination.

Pure data and pure decisions, no I/O: the assembler asks :func:`first_rule` when a series settles, the
worker asks :func:`destination_wants` for each result object and destination, and ``route --explain``
asks both for a series already received. Every decision comes with the sentence that explains it; the
index records it, ``status`` shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from node.model.enums import ObjectKind, RuleAction
from node.model.records import SeriesRecord


@dataclass(frozen=True)
class SourceFacts:
    """What routing may look at: the source series as it was received."""

    calling_ae: str
    modality: str
    study_description: str
    series_description: str

    @classmethod
    def of(cls, series: SeriesRecord) -> SourceFacts:
        """The facts of a series as the index recorded them."""
        return cls(series.calling_ae, series.modality, series.study_description, series.series_description)


@dataclass(frozen=True)
class Conditions:
    """``when``: conditions on the source series, all of which must hold (none: always)."""

    calling_ae: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    study_description: re.Pattern[str] | None = None  # searched, like Python's re.search
    series_description: re.Pattern[str] | None = None

    @property
    def empty(self) -> bool:
        return not (self.calling_ae or self.modality or self.study_description or self.series_description)

    def mismatch(self, facts: SourceFacts) -> str | None:
        """None when every condition holds, else a sentence naming the first that does not."""
        if self.calling_ae and facts.calling_ae not in self.calling_ae:
            return f"calling AE {facts.calling_ae!r} is not one of {list(self.calling_ae)}"
        if self.modality and facts.modality not in self.modality:
            return f"modality {facts.modality!r} is not one of {list(self.modality)}"
        for name, pattern, value in (("study description", self.study_description, facts.study_description),
                                     ("series description", self.series_description, facts.series_description)):
            if pattern is not None and not pattern.search(value):
                return f"{name} {value!r} does not match {pattern.pattern!r}"
        return None

    def describe(self) -> str:
        """The conditions as one phrase, for the log and ``status``."""
        parts = []
        if self.calling_ae:
            parts.append(f"calling AE in {list(self.calling_ae)}")
        if self.modality:
            parts.append(f"modality in {list(self.modality)}")
        if self.study_description is not None:
            parts.append(f"study description ~ {self.study_description.pattern!r}")
        if self.series_description is not None:
            parts.append(f"series description ~ {self.series_description.pattern!r}")
        return " and ".join(parts) or "any series"


@dataclass(frozen=True)
class Rule:
    """One of the node's ``[[rules]]``: the first whose conditions hold decides."""

    name: str
    action: RuleAction
    when: Conditions = Conditions()
    bundles: tuple[str, ...] = ()  # for SEGMENT: only these bundles (empty: every bundle that applies)
    priority: int = 0  # jobs of a series matching a higher priority are taken from the queue first


@dataclass(frozen=True)
class RuleDecision:
    rule: Rule | None  # None: no rule matched, the default applies (segment with every bundle, priority 0)
    reason: str

    @property
    def ignored(self) -> bool:
        return self.rule is not None and self.rule.action is RuleAction.IGNORE

    @property
    def priority(self) -> int:
        return self.rule.priority if self.rule is not None else 0

    def allows(self, bundle_name: str) -> bool:
        return self.rule is None or not self.rule.bundles or bundle_name in self.rule.bundles


def first_rule(rules: tuple[Rule, ...], facts: SourceFacts) -> RuleDecision:
    """The first rule whose conditions hold, with the sentence saying so."""
    for rule in rules:
        if rule.when.mismatch(facts) is None:
            what = "ignored" if rule.action is RuleAction.IGNORE else "segmented"
            scope = f" with {list(rule.bundles)}" if rule.bundles and rule.action is RuleAction.SEGMENT else ""
            return RuleDecision(rule, f"{what}{scope} by rule {rule.name!r} ({rule.when.describe()})")
    return RuleDecision(None, "no rule matched: segmented with every bundle that applies" if rules else "")


@dataclass(frozen=True)
class Route:
    """A destination's routing: which objects of which bundles, for which source series."""

    objects: frozenset[ObjectKind] = frozenset(ObjectKind)
    bundles: tuple[str, ...] = ()  # empty: every bundle
    when: Conditions = Conditions()

    @property
    def everything(self) -> bool:
        return self.objects == frozenset(ObjectKind) and not self.bundles and self.when.empty

    def mismatch(self, kind: ObjectKind, bundle_name: str, facts: SourceFacts) -> str | None:
        """None when this destination takes the object, else why not (the source series first: when it
        does not qualify, that is the whole reason)."""
        if (why := self.when.mismatch(facts)) is not None:
            return why
        if kind not in self.objects:
            return f"takes {sorted(str(o) for o in self.objects)}, not {kind}"
        if self.bundles and bundle_name not in self.bundles:
            return f"takes bundles {list(self.bundles)}, not {bundle_name}"
        return None

    def split(self, kinds: list[ObjectKind], bundle_name: str,
              facts: SourceFacts) -> tuple[list[ObjectKind], list[str]]:
        """The kinds this destination takes (in the order given), and the distinct reasons it refuses the
        others (in the order they arise)."""
        taken: list[ObjectKind] = []
        reasons: list[str] = []
        for kind in kinds:
            reason = self.mismatch(kind, bundle_name, facts)
            if reason is None:
                taken.append(kind)
            elif reason not in reasons:
                reasons.append(reason)
        return taken, reasons

    def describe(self) -> str:
        if self.everything:
            return "every result"
        objects = "/".join(sorted(str(o) for o in self.objects))
        bundles = f" of {list(self.bundles)}" if self.bundles else ""
        return f"{objects}{bundles} when {self.when.describe()}"
