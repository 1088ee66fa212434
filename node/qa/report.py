"""``qa report``: per structure over a period, how much clinicians changed the node's contours.

For each of our structures (bundle and name): n (times it came back edited or not), median Dice and
surface Dice at 2 mm, the share unchanged / minor / major / deleted, and a flag when its recent median
(the last ``qa.recent_days`` of the period) falls below its control limit: the mean − 3σ of the earlier
part of the period (at least :data:`MIN_HISTORY` values), or the configured floor, whichever is higher.
Structures the clinicians added are counted per name apart.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from node.config_qa import QaConfig
from node.model.enums import EditVerdict
from node.spool.index_qa import StructureRow

#: Earlier values a control limit needs (fewer: only the configured floor applies).
MIN_HISTORY = 5
_OURS = (EditVerdict.UNCHANGED, EditVerdict.MINOR, EditVerdict.MAJOR, EditVerdict.DELETED)
_DAY_S = 86400.0


@dataclass
class StructureSummary:
    bundle: str
    name: str
    n: int
    median_dice: float | None
    median_surface_dice: float | None  # at 2 mm
    unchanged: float  # shares of n
    minor: float
    major: float
    deleted: float
    recent_n: int = 0
    recent_median_dice: float | None = None
    recent_median_surface_dice: float | None = None
    dice_limit: float | None = None
    surface_dice_limit: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class QaReport:
    since: float | None
    until: float
    recent_from: float
    structures: list[StructureSummary]
    added: dict[str, int]  # ROI names clinicians added, and how often

    def as_dict(self) -> dict[str, object]:
        return {"since": self.since, "until": self.until, "recent_from": self.recent_from,
                "structures": [asdict(s) for s in self.structures], "added": self.added}


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def control_limit(earlier: Sequence[float], floor: float) -> float | None:
    """mean − 3σ of ``earlier`` (with at least MIN_HISTORY values), or ``floor``, whichever is higher (None: no
    limit)."""
    limits = [floor] if floor > 0 else []
    if len(earlier) >= MIN_HISTORY:
        limits.append(statistics.fmean(earlier) - 3.0 * statistics.stdev(earlier))
    return round(max(limits), 4) if limits else None


def build_report(rows: Sequence[StructureRow], cfg: QaConfig, *, until: float, since: float | None = None) -> QaReport:
    """Summarise ``rows`` (compared structures, oldest first) per structure of ours."""
    recent_from = until - cfg.recent_days * _DAY_S
    groups: dict[tuple[str, str], list[StructureRow]] = {}
    added: dict[str, int] = {}
    for row in rows:
        s = row.structure
        if s.verdict is EditVerdict.ADDED:
            added[s.name] = added.get(s.name, 0) + 1
        elif s.verdict in _OURS:
            groups.setdefault((s.bundle, s.name), []).append(row)
    summaries = []
    for (bundle, name), group in sorted(groups.items()):
        n = len(group)
        verdicts = [r.structure.verdict for r in group]
        dice = [r.structure.dice for r in group if r.structure.dice is not None]
        sdice = [r.structure.surface_dice_2mm for r in group if r.structure.surface_dice_2mm is not None]
        def share(verdict: EditVerdict, verdicts: list[EditVerdict] = verdicts, n: int = n) -> float:
            return round(verdicts.count(verdict) / n, 3)

        summary = StructureSummary(
            bundle=bundle, name=name, n=n, median_dice=_median(dice), median_surface_dice=_median(sdice),
            unchanged=share(EditVerdict.UNCHANGED), minor=share(EditVerdict.MINOR), major=share(EditVerdict.MAJOR),
            deleted=share(EditVerdict.DELETED),
        )
        recent = [r for r in group if r.compared_at >= recent_from]
        earlier = [r for r in group if r.compared_at < recent_from]
        summary.recent_n = len(recent)
        for metric, floor, label in (("dice", cfg.floor_dice, "Dice"),
                                     ("surface_dice_2mm", cfg.floor_surface_dice, "surface Dice")):
            now = [getattr(r.structure, metric) for r in recent if getattr(r.structure, metric) is not None]
            before = [getattr(r.structure, metric) for r in earlier if getattr(r.structure, metric) is not None]
            limit, median = control_limit(before, floor), _median(now)
            if metric == "dice":
                summary.recent_median_dice, summary.dice_limit = median, limit
            else:
                summary.recent_median_surface_dice, summary.surface_dice_limit = median, limit
            if limit is not None and median is not None and median < limit:
                summary.flags.append(f"recent median {label} {median:.3f} is below its control limit {limit:.3f}")
        summaries.append(summary)
    return QaReport(since, until, recent_from, summaries, dict(sorted(added.items())))


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


HEADER = ("bundle", "structure", "n", "median Dice", "median sDice 2mm", "unchanged", "minor", "major", "deleted",
          "recent n", "recent Dice", "Dice limit", "flag")


def report_rows(report: QaReport) -> list[tuple[str, ...]]:
    return [(s.bundle, s.name, str(s.n), _num(s.median_dice), _num(s.median_surface_dice), _pct(s.unchanged),
             _pct(s.minor), _pct(s.major), _pct(s.deleted), str(s.recent_n), _num(s.recent_median_dice),
             _num(s.dice_limit), "; ".join(s.flags) or "-") for s in report.structures]


def render_text(report: QaReport) -> str:
    rows = [HEADER, *report_rows(report)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not report.structures:
        lines.append("(no edited structure set was compared in the period)")
    if report.added:
        lines.append("added by clinicians: " + ", ".join(f"{name} ×{n}" for name, n in report.added.items()))
    return "\n".join(lines)


def render_csv(report: QaReport) -> str:
    """One row per structure, every figure as a number (shares as fractions)."""
    out = io.StringIO()
    names = [f.name for f in fields(StructureSummary)]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for s in report.structures:
        values = asdict(s)
        writer.writerow(["; ".join(values[n]) if n == "flags" else ("" if values[n] is None else values[n])
                         for n in names])
    return out.getvalue()
