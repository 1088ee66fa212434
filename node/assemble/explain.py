"""``route --explain``: which rules and destinations match a series already received, and why.

The same decisions the assembler and the worker make (node.model.routing, node.assemble.select), laid
out for a person: every rule in order with why it matches or not (the first match decides), the
bundles that would run, and per destination which of their result objects it would receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.assemble.select import SeriesFacts, mr_facts, select_bundles
from node.config import NodeConfig
from node.model.bundle import Bundle
from node.model.enums import ObjectKind
from node.model.records import SeriesRecord
from node.model.routing import SourceFacts, first_rule


@dataclass(frozen=True)
class Explanation:
    series_uid: str
    facts: SourceFacts
    rules: list[str]  # one line per rule, in order
    decision: str
    bundles: list[str]  # the bundles that would run
    bundle_reasons: list[str]  # why the others would not
    destinations: list[str]  # one line per destination

    def lines(self) -> list[str]:
        f = self.facts
        out = [f"series {self.series_uid}: from calling AE {f.calling_ae or '(unknown)'}, modality "
               f"{f.modality or '(none)'}, study description {f.study_description!r}, series description "
               f"{f.series_description!r}", "rules (first match decides):"]
        out += [f"  {line}" for line in self.rules] or ["  (none configured)"]
        out.append(f"decision: {self.decision}")
        out.append(f"bundles: {', '.join(self.bundles) or 'none'}")
        out += [f"  not {reason}" for reason in self.bundle_reasons]
        out.append("destinations:")
        out += [f"  {line}" for line in self.destinations] or ["  (none configured)"]
        return out


def produced_objects(cfg: NodeConfig) -> list[ObjectKind]:
    """The kinds of result object a job writes under ``cfg``."""
    kinds = [ObjectKind.SEG] if cfg.write_seg else []
    kinds += [ObjectKind.RTSTRUCT] if cfg.write_rtstruct else []
    return kinds + ([ObjectKind.SC] if cfg.preview_sc else [])


def explain_series(cfg: NodeConfig, bundles: list[Bundle], series: SeriesRecord,
                   paths: Sequence[Path] = ()) -> Explanation:
    """Why each rule, bundle and destination does or does not apply; ``paths`` (the series' files) let an MR
    series be judged by the bundles' ``[select.mr]`` header rules."""
    facts = SourceFacts.of(series)
    rule_lines = []
    for rule in cfg.rules:
        why = rule.when.mismatch(facts)
        verdict = "matches" if why is None else f"does not match: {why}"
        rule_lines.append(f"{rule.name} ({rule.action}, priority {rule.priority}, when {rule.when.describe()}): "
                          f"{verdict}")
    decision = first_rule(cfg.rules, facts)
    if decision.ignored:
        return Explanation(series.series_uid, facts, rule_lines, decision.reason, [], [], [])
    chosen, reasons = select_bundles([b for b in bundles if decision.allows(b.name)],
                                     SeriesFacts(series.modality, series.sop_class_uid, series.instance_count,
                                                 mr=mr_facts(paths) if paths else None))
    reasons += [f"{b.name}: not in the rule's bundles" for b in bundles if not decision.allows(b.name)]
    kinds = produced_objects(cfg)
    dest_lines = []
    for dest in cfg.destinations:
        parts = []
        for bundle in chosen:
            taken, refused = dest.route.split(kinds, bundle.name, facts)
            shown = ", ".join(str(k) for k in taken) if taken else "nothing"
            parts.append(f"{bundle.name} → {shown}" + (f" ({'; '.join(sorted(refused))})" if refused else ""))
        dest_lines.append(f"{dest.name} ({dest}; takes {dest.route.describe()}): " + ("; ".join(parts) or "nothing"))
    return Explanation(series.series_uid, facts, rule_lines, decision.reason or "segmented (no rules configured)",
                       [b.id for b in chosen], reasons, dest_lines)
