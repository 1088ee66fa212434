"""Judging: an :class:`IndexView` of the node's settled index, :func:`evaluate` of one sent case against
it (a :class:`Verdict`), the instances that must settle first (:func:`relevant_sops`) and the per-category
table (:func:`format_table`)."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.malformed.cases import SEND_CSTORE, SEND_PROTOCOL, SEND_SERIES, Case, Sent


@dataclass
class SeriesView:
    uid: str
    state: str
    note: str
    instance_count: int
    jobs: list[dict[str, Any]]

    @property
    def final(self) -> tuple[str, str] | None:
        """('ignored', note) | ('failed', error) | ('done', '') | ('qa', note) | None while not settled.

        A structure set or SEG is not segmented: its series gets an edit-QA job, which ends done with what it
        found in its note (a set it could not compare is "rejected" there, with the reason).
        """
        if self.state == "ignored":
            return "ignored", self.note
        if self.state != "dispatched" or not self.jobs:
            return None
        if any(j["state"] not in ("done", "failed") for j in self.jobs):
            return None
        last = max(self.jobs, key=lambda j: j["id"])
        if last["state"] == "done" and last.get("kind") == "qa":
            return "qa", str(last.get("note", ""))
        return ("done", "") if last["state"] == "done" else ("failed", str(last["error"]))


class IndexView:
    """A snapshot of the node's index: instances (read-only SQLite), series and jobs (``status --json``)."""

    def __init__(self, instances: dict[str, str], status: dict[str, Any]) -> None:
        self.series_of = instances
        jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for j in status.get("jobs", []):
            jobs[j["series_uid"]].append(j)
        self.series = {
            s["series_uid"]: SeriesView(
                s["series_uid"],
                s["state"],
                s.get("note", ""),
                int(s.get("instance_count", 0)),
                jobs.get(s["series_uid"], []),
            )
            for s in status.get("series", [])
        }

    @classmethod
    def load(cls, state_dir: Path, status: dict[str, Any]) -> IndexView:
        return cls(read_instances(state_dir), status)

    def final_of_sop(self, sop: str) -> tuple[str | None, tuple[str, str] | None]:
        series = self.series_of.get(sop)
        if series is None:
            return None, None
        view = self.series.get(series)
        return series, view.final if view else None


def read_instances(state_dir: Path) -> dict[str, str]:
    """SOP Instance UID → Series Instance UID, read-only from the node's index."""
    path = state_dir / "index.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {sop: series for sop, series in db.execute("SELECT sop_instance_uid, series_uid FROM instances")}
    finally:
        db.close()


@dataclass
class Verdict:
    case: Case
    outcome: str
    ok: bool
    detail: str = ""
    elapsed_s: float = 0.0  # how long sending the case took


def _judge_success(case: Case, sop: str, view: IndexView) -> tuple[str, bool, str]:
    e = case.expect
    series, final = view.final_of_sop(sop)
    if series is None:
        return "lost", False, f"answered Success but {sop} is not in the index"
    if final is None:
        state = view.series.get(series)
        return "stuck", False, f"series {series!r} never settled (state {state.state if state else '?'})"
    kind, reason = final
    if kind == "done":
        return "job done", e.done, "" if e.done else f"series {series!r}: the job completed on malformed input"
    label = {"ignored": "ignored", "qa": "qa rejected"}.get(kind, "job failed")
    if reason.startswith("unexpected "):
        return label, False, f"unhelpful reason (an internal exception): {reason[:300]}"
    if e.reason and re.search(e.reason, reason, re.IGNORECASE):
        return label, True, reason[:200]
    return label, False, f"reason does not name the problem (wanted /{(e.reason or '')[:80]}/): {reason[:300]}"


def evaluate(sent: Sent, view: IndexView) -> Verdict:
    """Judge one sent case against the settled index."""
    verdict = _evaluate(sent, view)
    verdict.elapsed_s = sent.elapsed_s
    return verdict


def _evaluate(sent: Sent, view: IndexView) -> Verdict:
    case = sent.case
    e = case.expect
    if case.send == SEND_PROTOCOL:
        result = sent.protocol
        assert result is not None
        outcome = result.reaction
        problems = []
        # statuses decide only where the case is about the DIMSE answer (ok_statuses, or 'status')
        judged = bool(e.ok_statuses) or "status" in e.reactions
        status_ok = bool(result.statuses) and (
            "status" in e.reactions or all(s in e.ok_statuses for s in result.statuses)
        )
        if judged and result.statuses and not status_ok:
            problems.append("statuses " + ", ".join(f"0x{s:04X}" for s in result.statuses))
            outcome = "status " + "/".join(f"0x{s:04X}" for s in sorted(set(result.statuses)))
        elif judged and result.statuses:
            outcome = "status " + "/".join(f"0x{s:04X}" for s in sorted(set(result.statuses)))
        if not (result.reaction in e.reactions or status_ok):
            problems.append(f"reaction {result.reaction!r} ({' '.join(result.trace)[:200]}) {result.error}")
        for sop in case.sops if e.stored is not None else []:
            stored = sop in view.series_of
            if stored != e.stored:
                problems.append(f"{sop} {'stored' if stored else 'not stored'}")
        if e.series_done and case.sops:
            series, final = view.final_of_sop(case.sops[0])
            if final is None or final[0] != "done":
                problems.append(f"series {series} not done: {final}")
        return Verdict(case, outcome, not problems, "; ".join(problems))
    sops = [case.focus_sop] if case.send == SEND_CSTORE else [s for s in sent.statuses]
    statuses = [sent.statuses.get(s) for s in sops]
    errors = [sent.errors.get(s, "") for s in sops]
    if any(err.startswith("no-context") for err in errors):
        return Verdict(case, "context rejected", e.no_context, "" if e.no_context else errors[0][:200])
    failures = [s for s in statuses if s not in (0x0000, None)]
    if None in statuses:
        i = statuses.index(None)
        return Verdict(case, "no response", False, errors[i][:300])
    if failures:
        code = failures[0]
        ok = code in e.statuses and all(s in e.statuses or s == 0 for s in statuses)
        detail = "" if ok else f"status 0x{code:04X} not among {e.describe()}"
        if case.send == SEND_SERIES and ok and len(set(statuses)) > 1:
            ok, detail = False, "some instances refused, others stored: " + ", ".join(f"0x{s:04X}" for s in statuses)
        return Verdict(case, f"refused 0x{code:04X}", ok, detail)
    outcome, ok, detail = _judge_success(case, case.focus_sop, view)
    return Verdict(case, outcome, ok, detail)


def relevant_sops(sents: Sequence[Sent]) -> list[str]:
    """Instances answered Success whose series must settle before judging."""
    out = []
    for s in sents:
        if (
            s.case.send == SEND_CSTORE
            and s.statuses.get(s.case.focus_sop) == 0
            or s.case.send == SEND_SERIES
            and s.statuses.get(s.case.focus_sop) == 0
        ):
            out.append(s.case.focus_sop)
        elif s.case.send == SEND_PROTOCOL and s.case.expect.series_done and s.case.sops:
            out.append(s.case.sops[0])
    return out


def format_table(verdicts: Sequence[Verdict]) -> str:
    """Per category: cases, mismatches, time spent sending (sum over parallel senders), outcomes."""
    by_cat: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_cat[v.case.category].append(v)
    rows = [("category", "cases", "mismatches", "send s", "outcomes")]
    for cat in sorted(by_cat):
        vs = by_cat[cat]
        outcomes = Counter(v.outcome for v in vs)
        text = ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append((cat, str(len(vs)), str(sum(not v.ok for v in vs)), f"{sum(v.elapsed_s for v in vs):.0f}", text))
    rows.append(
        (
            "TOTAL",
            str(len(verdicts)),
            str(sum(not v.ok for v in verdicts)),
            f"{sum(v.elapsed_s for v in verdicts):.0f}",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
        if r is rows[0]:
            lines.append("-" * 120)
    return "\n".join(lines)
